"""Publisher states, health, and the table of allowed moves between states."""

from __future__ import annotations

__all__ = ["ALLOWED", "Health", "PublisherState", "check_transition"]

import enum

from pubmon.errors import InvalidTransition


class PublisherState(enum.StrEnum):
    STOPPED = "STOPPED"  # not running, and not wanted
    STARTING = "STARTING"  # spawned, not yet healthy
    RUNNING = "RUNNING"  # healthy (or survived start_timeout with no probe)
    PAUSED = "PAUSED"  # its cgroup frozen by an operator (pause); probes suspended
    BACKOFF = "BACKOFF"  # died or failed; waiting before the next start
    STOPPING = "STOPPING"  # stop signal sent, waiting for the group to go
    EXITED = "EXITED"  # exited and, by its restart policy, not restarted
    FATAL = "FATAL"  # crash loop or permanent spawn error: only an operator's start leaves it


class Health(enum.StrEnum):
    UNKNOWN = "UNKNOWN"
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"  # fb303 WARNING
    UNHEALTHY = "UNHEALTHY"


_S = PublisherState
ALLOWED: dict[PublisherState, frozenset[PublisherState]] = {
    _S.STOPPED: frozenset({_S.STARTING}),
    _S.STARTING: frozenset({_S.RUNNING, _S.BACKOFF, _S.STOPPING, _S.EXITED, _S.FATAL}),
    _S.RUNNING: frozenset({_S.BACKOFF, _S.STOPPING, _S.EXITED, _S.FATAL, _S.PAUSED}),
    # Resumed, stopped (thawed first), or it died while frozen (a SIGKILL from outside).
    _S.PAUSED: frozenset({_S.RUNNING, _S.STOPPING, _S.BACKOFF, _S.EXITED, _S.FATAL}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPED, _S.FATAL}),
    # A stop that began because the child failed (its probe) ends in a restart decision.
    _S.STOPPING: frozenset({_S.STOPPED, _S.BACKOFF, _S.EXITED, _S.FATAL}),
    _S.EXITED: frozenset({_S.STARTING, _S.STOPPED}),
    _S.FATAL: frozenset({_S.STARTING, _S.STOPPED}),
}


def check_transition(name: str, old: PublisherState, new: PublisherState) -> None:
    """Raise InvalidTransition unless `old -> new` is in the table."""
    if new not in ALLOWED[old]:
        raise InvalidTransition(name, old, new)

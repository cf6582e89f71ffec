"""The health watch of one run: a task that probes the child and posts verdicts, nothing else.

The watch never changes the publisher. It reads the spec (each round: a reload may change the
probe's timing) and posts `Verdict`s to the publisher's inbox; the runner hands them to the state
machine, which decides what they mean (RUNNING, a health change, a kill as unhealthy). A watch is
numbered: the publisher starts a new one for each run (and on resume, or a reload of the probe),
and a verdict from a replaced watch, already queued, is dropped by its number.

While STARTING it probes fast (the first after 20 ms, doubling up to the interval), so a child
that is healthy at once is RUNNING within a few tens of ms rather than a whole interval later;
then one round every `interval`, however long the check took (a hung child's check takes the
whole timeout): detection is interval * failure_threshold + timeout. Without a probe, the run is
up once it survived start_timeout.

What a steady round costs the daemon besides the check (issue 16; A/B on a shared 2-core box,
100 publishers probed every second: 0.36 ms of CPU per probe before, 0.105 after): rounds start
on a grid shared by all watches, so the probes due together share a loop pass, and a healthy
round that changed nothing posts nothing (see `_probe_loop`).
"""

from __future__ import annotations

__all__ = ["Verdict", "Watched", "watch"]

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from pubmon.config.model import PublisherSpec
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.probe import Probe, make_probe
from pubmon.core.process import OrphanReaper
from pubmon.core.stats import Histogram

S = PublisherState
_STARTING_POLL_FIRST = 0.02  # the first probe while STARTING; doubles up to the interval
# Steady rounds start on a grid of min(_GRID, interval / 10) s of the clock, shared by every
# watch: rounds due within one step run in one loop pass (one timer wake, their replies read
# in a few epoll waits) instead of one pass each. Each round starts less than a step (at most
# a tenth of its interval) after it was due; the schedule does not drift (see _on_grid).
_GRID = 0.1


@dataclass(eq=False, slots=True)
class Verdict:
    watch: int  # which watch task sent it: a verdict of a replaced one is dropped
    kind: Literal["up", "health", "start-timeout", "unhealthy"]
    health: Health = Health.UNKNOWN
    details: str = ""


class Watched(Protocol):
    """What a watch reads of its publisher, when it needs it (never a copy: a reload may change
    the spec while it runs)."""

    @property
    def spec(self) -> PublisherSpec: ...
    @property
    def state(self) -> PublisherState: ...
    @property
    def probe_seconds(self) -> Histogram: ...  # each check's round-trip time, for /metrics
    @property
    def run_started(self) -> float | None: ...  # clock() when the current process started
    @property
    def health(self) -> Health: ...  # what the runner made of the verdicts so far
    @property
    def details(self) -> str: ...


async def watch(
    pub: Watched,
    number: int,
    announce: bool,
    *,
    post: Callable[[Verdict], None],
    reaper: OrphanReaper | None,
    clock: Callable[[], float],
) -> None:
    """The health watch of one run: posts verdicts; the runner decides what they mean.
    `announce`: hand the data source over (the probe's `on_first_healthy`) once healthy."""
    spec = pub.spec
    probe = make_probe(spec, reaper=reaper)
    if probe is None:
        if pub.state == S.STARTING:
            if spec.start_timeout > 0:
                await asyncio.sleep(spec.start_timeout)
            post(Verdict(number, "up", Health.UNKNOWN, f"survived {spec.start_timeout:g} s"))
        return
    try:
        await _probe_loop(pub, probe, number, announce, post, clock)
    finally:
        await probe.close()


async def _probe_loop(
    pub: Watched,
    probe: Probe,
    number: int,
    announce: bool,
    post: Callable[[Verdict], None],
    clock: Callable[[], float],
) -> None:
    started = pub.run_started if pub.run_started is not None else clock()
    deadline = started + pub.spec.start_timeout
    delay = _STARTING_POLL_FIRST
    starting = pub.state == S.STARTING
    failures = 0
    planned: float | None = None  # when the last steady round was due, off the grid
    # The last "health" verdict this watch posted, as (health, details); None after any other.
    # A healthy round that would post the same again, while the publisher still shows it, is
    # not posted: handling it changed nothing but woke the runner and fired `changed` (which
    # wakes the daemon's STATUS= and the HTTP exit scan, O(N) each) once per probe. That was
    # most of a probe's daemon CPU at steady state (issue 16). Failures are always posted.
    posted: tuple[Health, str] | None = None
    while True:
        p = pub.spec.probe  # re-read each round: a reload may change its timing
        began = clock()
        health = await probe.check()
        pub.probe_seconds.observe(clock() - began)
        if starting:
            if health in (Health.HEALTHY, Health.DEGRADED):
                post(Verdict(number, "up", health, probe.details or f"probe says {health}"))
                posted = None
                starting = announce = False
                await _handoff(probe)
            elif clock() >= deadline:
                why = (
                    f"not healthy within start_timeout {pub.spec.start_timeout:g} s: "
                    f"{probe.last_error or health}"
                )
                post(Verdict(number, "start-timeout", Health.UNHEALTHY, why))
                return
            else:
                await asyncio.sleep(min(delay, max(0.0, deadline - clock())))
                delay = min(delay * 2, p.interval)
                continue
        elif health == Health.UNHEALTHY:
            failures += 1
            why = f"probe failed {failures}/{p.failure_threshold}: {probe.last_error}"
            if failures >= p.failure_threshold:
                post(Verdict(number, "unhealthy", Health.UNHEALTHY, why))
                return
            post(Verdict(number, "health", Health.UNHEALTHY, why))
            posted = None
        else:
            failures = 0
            now = (health, probe.details)
            if not (now == posted and _shows(pub, now)):
                post(Verdict(number, "health", health, probe.details))
                posted = now
            if announce:
                announce = False
                await _handoff(probe)
        # Rounds start every `interval`, however long the check took (a hung child's
        # check takes the whole timeout): detection is interval * threshold + timeout (+ less
        # than one grid step). A check that overran its interval: the next round at once.
        planned = max((began if planned is None else planned) + p.interval, clock())
        await asyncio.sleep(max(0.0, _on_grid(planned, p.interval) - clock()))


def _on_grid(when: float, interval: float) -> float:
    """The first point of the shared grid at or after `when`. `when` itself is kept off the
    grid (planned + interval), so rounding never accumulates."""
    step = min(_GRID, interval / 10)
    return math.ceil(when / step) * step


def _shows(pub: Watched, verdict: tuple[Health, str]) -> bool:
    """Whether `pub` is RUNNING with this health and details: posting `verdict` again (the
    last one this watch posted, so none of its own is queued behind it) would change nothing."""
    return pub.state == S.RUNNING and (pub.health, pub.details) == verdict


async def _handoff(probe: Probe) -> None:
    hook = getattr(probe, "on_first_healthy", None)
    if hook is not None:
        await hook()

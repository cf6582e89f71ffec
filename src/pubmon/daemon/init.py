"""pubmon as an init: PID 1 of a container's PID namespace, or `pubmon daemon --init`.

What an init owes its namespace beyond supervising publishers:
- reaping every zombie re-parented to it, whoever started it: the daemon is a child subreaper
  already (pubmon.daemon.reaping), and its `OrphanReaper` reaps by pid whatever asyncio does
  not own, so a publisher's exit status is never taken from asyncio's pidfd watcher;
- handlers for every signal it is sent (the kernel drops a default-action signal sent to PID 1;
  `signals.HANDLED` covers SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1 and SIGUSR2);
- at the end, after the publishers stopped, the rest (`end_the_rest`): every other process of
  the namespace (as PID 1, when /proc is the namespace's own) or every descendant (--init) gets
  SIGTERM, up to `REST_GRACE` s to exit (reaped as they do), then SIGKILL. tini and dumb-init
  exit at once and let the kernel SIGKILL whatever a daemonized helper was still writing.
"""

from __future__ import annotations

__all__ = ["REST_GRACE", "end_the_rest", "is_pid1", "remaining"]

import asyncio
import logging
import os
import signal
from pathlib import Path

from pubmon.core.reaper import OrphanReaper, children_of

logger = logging.getLogger(__name__)

REST_GRACE = 5.0  # seconds the other processes get between SIGTERM and SIGKILL
_KILL_WAIT = 2.0  # after SIGKILL: how long to wait for them to be gone
_POLL = 0.02


def is_pid1() -> bool:
    return os.getpid() == 1


def _own_proc() -> bool:
    """Whether /proc shows our PID namespace (a container mounts its own; `unshare --pid`
    without --mount-proc does not, and then /proc lists the host's processes)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _state(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 : raw.rindex(")") + 3]


def remaining() -> set[int]:
    """Live processes other than us: the namespace's (PID 1 with its own /proc), else our
    descendants. Zombies are not counted: ours are reaped, others go with their parent."""
    me = os.getpid()
    if me == 1 and _own_proc():
        pids = {int(d) for d in os.listdir("/proc") if d.isdigit()} - {me}
    else:
        pids, todo = set(), [me]
        while todo:
            for child in children_of(todo.pop()):
                if child not in pids:
                    pids.add(child)
                    todo.append(child)
    return {p for p in pids if _state(p) not in (None, "Z")}


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


async def _wait_gone(reaper: OrphanReaper, seconds: float, term: set[int] | None) -> set[int]:
    """Reap and poll until nothing remains or `seconds` passed; SIGTERM newcomers if `term`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        reaper.sweep()
        left = remaining()
        if term is not None and left - term:
            _signal(left - term, signal.SIGTERM)
            term |= left
        if not left or loop.time() >= deadline:
            return left
        await asyncio.sleep(_POLL)  # a bounded poll of /proc: no event says "all gone"


async def end_the_rest(reaper: OrphanReaper, grace: float = REST_GRACE) -> set[int]:
    """SIGTERM every remaining process, SIGKILL what is left after `grace` s, reap them all.
    Call once the publishers have stopped. Returns the pids that survived SIGKILL (D state)."""
    left = remaining()
    if not left:
        reaper.sweep()
        return set()
    logger.info(
        "%d other process(es) left: SIGTERM, SIGKILL in %g s: %s", len(left), grace, sorted(left)
    )
    _signal(left, signal.SIGTERM)
    _signal(left, signal.SIGCONT)
    left = await _wait_gone(reaper, grace, set(left))
    if not left:
        return set()
    logger.warning("killing %d process(es) that outlived SIGTERM: %s", len(left), sorted(left))
    for _ in range(3):  # a process may fork while it is being killed
        _signal(left, signal.SIGKILL)
        left = await _wait_gone(reaper, _KILL_WAIT / 3, None)
        if not left:
            return set()
    logger.error("%d process(es) survived SIGKILL: %s", len(left), sorted(left))
    return left

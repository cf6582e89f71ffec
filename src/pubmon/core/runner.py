"""A publisher's runner: the one task that handles its inbox, its timer, its health-watch task,
and the process steps of a spawn and a stop.

The state machine (pubmon.core.publisher) decides; the runner carries out the mechanics:
- `Runner.run()` takes the messages one at a time, in order, and hands each to the state
  machine; a spawn that is due happens only once the inbox is empty (a stop posted meanwhile
  goes first). It is the publisher's task in the supervisor's TaskGroup, and it owns a TaskGroup
  of its own for the watch task: a publisher removed or a daemon that ends takes them all down.
- One timer at a time (backoff, the stop's SIGKILL escalation, the bound after SIGKILL) that
  posts a `Timer` to the inbox. Each set or cancel bumps a token, so a timer already queued
  when it was cancelled or replaced is recognised as stale and dropped (`fired()`).
- The health watch (pubmon.core.watch) of the current run: starting one replaces the last, and
  its number tells a queued verdict of the replaced one from a current one (`current_watch()`).
- The process steps, which hold no state of the publisher's: the stop signal, SIGKILL to the
  tree, and after the leader exited the end of the run (the rest of the group killed at once as
  systemd's KillMode=mixed does, the cgroup emptied, the pipes drained, bounded); a cgroup
  prepared for a spawn (thawed, emptied of an earlier run's tree, limits written).
"""

from __future__ import annotations

__all__ = [
    "CGROUP_EMPTY_BOUND",
    "DRAIN_TIMEOUT",
    "Runner",
    "Timer",
    "TimerKind",
    "finish_run",
    "kill_tree",
    "prepare_cgroup",
    "send_stop",
]

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pubmon.config.model import Limits
from pubmon.core.cgroup import Cgroup
from pubmon.core.process import Child
from pubmon.errors import SpawnError

logger = logging.getLogger(__name__)

M = TypeVar("M")
DRAIN_TIMEOUT = 2.0  # after the group is gone, how long pipes may stay open (an escaped holder)
CGROUP_EMPTY_BOUND = 5.0  # after cgroup.kill, how long the cgroup may stay populated

TimerKind = Literal["backoff", "kill", "stuck"]


@dataclass(eq=False, slots=True)
class Timer:
    token: int
    kind: TimerKind


class Runner(Generic[M]):
    """The inbox (messages `M`, and the runner's own `Timer`s), the timer and the watch task
    of one publisher. Written and read by the publisher's runner task only, except `post()`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inbox: asyncio.Queue[M | Timer] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: TimerKind | None = None
        self._timer_token = 0
        self._watch_task: asyncio.Task[None] | None = None
        self._watches = 0
        self._tg: asyncio.TaskGroup | None = None

    def post(self, msg: M | Timer) -> None:
        self.inbox.put_nowait(msg)

    async def run(
        self,
        *,
        begin: Callable[[], None],
        handle: Callable[[M | Timer], Awaitable[None]],
        spawn_due: Callable[[], bool],
        spawn: Callable[[], Awaitable[None]],
        end: Callable[[list[M | Timer]], None],
    ) -> None:
        """Hand the inbox to `handle` until cancelled; `spawn` when `spawn_due()` and nothing
        waits. `begin` runs once the watch TaskGroup is up; `end`, on the way out, gets the
        messages never handled (their callers must still get an answer)."""
        try:
            async with asyncio.TaskGroup() as tg:  # its watch tasks
                self._tg = tg
                begin()
                while True:
                    while not self.inbox.empty():
                        await handle(self.inbox.get_nowait())
                    if spawn_due():
                        await spawn()
                        continue
                    await handle(await self.inbox.get())
        finally:
            self.cancel_timer()
            unhandled = []
            while not self.inbox.empty():
                unhandled.append(self.inbox.get_nowait())
            end(unhandled)

    # --- the timer -----------------------------------------------------------------------------

    def set_timer(self, kind: TimerKind, delay: float) -> None:
        self.cancel_timer()
        self._timer_token += 1
        msg = Timer(self._timer_token, kind)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, delay), self.inbox.put_nowait, msg)
        self._timer_kind = kind

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_token += 1  # one already queued is stale now

    def fired(self, msg: Timer) -> bool:
        """Whether `msg` is the current timer's (then it is spent), not a stale one."""
        if msg.token != self._timer_token:
            return False
        self._timer = None
        return True

    def pending_timer(self) -> tuple[TimerKind, float] | None:
        """The timer set and not yet fired: its kind and its loop.time() (an upgrade's)."""
        if self._timer is None or self._timer_kind is None:
            return None
        return self._timer_kind, self._timer.when()

    # --- the watch task --------------------------------------------------------------------------

    def start_watch(self, watch: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        """Replace the watch task by `watch(number)`."""
        self.stop_watch()
        self._watches += 1
        assert self._tg is not None
        self._watch_task = self._tg.create_task(watch(self._watches), name=f"watch {self.name}")

    def stop_watch(self) -> None:
        self._watches += 1  # verdicts of the old one, already queued, are dropped
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None

    def current_watch(self, number: int) -> bool:
        return number == self._watches


# --- process steps --------------------------------------------------------------------------------


def send_stop(child: Child, stop_signal: signal.Signals) -> None:
    """The stop signal to its group (and SIGCONT, so that a stopped group can act on it)."""
    child.signal(stop_signal)
    if stop_signal not in (signal.SIGKILL, signal.SIGCONT):
        # A stopped (SIGSTOP, SIGTSTP) process would keep the signal pending until the
        # SIGKILL; continue the group so it can act on it, as systemd does.
        child.signal(signal.SIGCONT)


def kill_tree(name: str, child: Child, cgroup: Cgroup | None) -> None:
    """SIGKILL to its group, and with a cgroup cgroup.kill (escapees of the group included)."""
    child.signal(signal.SIGKILL)
    _kill_cgroup(name, cgroup)


def _kill_cgroup(name: str, cg: Cgroup | None) -> None:
    """cgroup.kill: SIGKILL to every process of its tree, escapees included."""
    if cg is not None:
        try:
            cg.kill()
        except OSError as exc:
            logger.error("%s: cannot kill cgroup %s: %s", name, cg.path, exc)


async def finish_run(name: str, child: Child, cgroup: Cgroup | None) -> None:
    """The leader exited: what remains of its group (grandchildren) is killed at once, as
    systemd's KillMode=mixed does (a SIGKILL'd process cannot refuse); with a cgroup, what is
    left of the tree is killed and waited for; its pipes are drained (bounded) and closed."""
    child.signal(signal.SIGKILL)
    if cgroup is not None:
        _kill_cgroup(name, cgroup)
        if not await cgroup.wait_empty(CGROUP_EMPTY_BOUND):
            logger.error(
                "%s pid %d: cgroup %s still holds pids %s %g s after cgroup.kill",
                name,
                child.pid,
                cgroup.path,
                cgroup.pids(),
                CGROUP_EMPTY_BOUND,
            )
    if not await child.drain(DRAIN_TIMEOUT):
        logger.warning(
            "%s pid %d: its output pipes are still held open by a process outside its "
            "group after %g s; closing them",
            name,
            child.pid,
            DRAIN_TIMEOUT,
        )
    child.close()


async def prepare_cgroup(name: str, cg: Cgroup, limits: Limits) -> float:
    """Its cgroup, thawed, empty and with the limits written, for a spawn to join; returns its
    CPU seconds so far (the cgroup outlives runs: a run's share is counted from here).
    SpawnError when the tree of an earlier run will not leave it."""
    try:
        cg.create()
        if cg.frozen():
            cg.freeze(False)  # a process that joins a frozen group is frozen at once
        if cg.populated():
            cg.kill()
            if not await cg.wait_empty(CGROUP_EMPTY_BOUND):
                raise SpawnError(
                    name,
                    f"its cgroup {cg.path} still holds pids {cg.pids()} of an earlier run "
                    f"{CGROUP_EMPTY_BOUND:g} s after cgroup.kill",
                    permanent=False,
                )
        for problem in cg.apply(limits):
            logger.debug("%s: %s", name, problem)  # said at start and reload
        return cg.cpu_seconds()
    except OSError as exc:
        why = f"cannot prepare its cgroup {cg.path}: {exc.strerror or exc}"
        raise SpawnError(name, why, permanent=False) from exc

"""Reaping the daemon's children that asyncio does not own: orphans re-parented to the subreaper.

By pid, never with `waitpid(-1)`, which would steal the exit statuses asyncio is waiting for;
shortly after each exit of a child of ours, and on a timer (see `OrphanReaper`). Not on
SIGCHLD: a thousand children ending at once would overflow the loop's signal wakeup socket (a
few hundred one-byte writes fill it) and lose the bytes of other signals, an operator's second
SIGTERM among them.
"""

from __future__ import annotations

__all__ = ["OrphanReaper", "Tracked", "children_of"]

import asyncio
import os
import signal
from pathlib import Path
from typing import Protocol


class Tracked(Protocol):
    """What the reaper needs of a child of ours (`process.Child`, `adopted.AdoptedChild`)."""

    @property
    def pid(self) -> int: ...

    @property
    def exited(self) -> asyncio.Future[int]: ...


def children_of(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.update(int(p) for p in text.split())
    return out


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2 : raw.rindex(")") + 3] == "Z"


class OrphanReaper:
    """Reaps the daemon's children that asyncio does not own (orphans re-parented to us).

    asyncio owns every pid that `spawn()` returned until its exit is reported; a spawn in flight
    may not be tracked yet, so sweeps wait while `spawning > 0` and run again afterwards.
    A sweep runs `SOON` after an owned child exits (its orphans are killed with its group right
    then) and every `PERIOD` while children of ours that asyncio does not own are around (an
    escaped grandchild may end at any time), else every `QUIET_PERIOD`: a grandchild can become
    ours with no exit of a publisher (its own parent, a publisher's child, exited), and reading
    the list of 1000 children costs ~0.7 ms.
    """

    SOON = 0.1
    PERIOD = 1.0
    QUIET_PERIOD = 5.0

    def __init__(self) -> None:
        self._owned: set[int] = set()
        self.spawning = 0
        self.reaped = 0
        self._deferred = False
        self._strays = False  # the last sweep met children that asyncio does not own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._periodic: asyncio.TimerHandle | None = None
        self._soon: asyncio.TimerHandle | None = None

    def spawn_done(self) -> None:
        self.spawning -= 1
        if not self.spawning and self._deferred:
            self.sweep()

    def track(self, child: Tracked) -> None:
        self._owned.add(child.pid)
        child.exited.add_done_callback(lambda _: self._exited(child.pid))

    def _exited(self, pid: int) -> None:
        self._owned.discard(pid)
        if self._loop is not None and self._soon is None:  # one sweep for a burst of exits
            self._soon = self._loop.call_later(self.SOON, self._sweep_soon)

    def _sweep_soon(self) -> None:
        self._soon = None
        self.sweep()

    def _tick(self) -> None:
        self.sweep()
        self._schedule()

    def _schedule(self) -> None:
        assert self._loop is not None
        period = self.PERIOD if self._strays else self.QUIET_PERIOD
        self._periodic = self._loop.call_later(period, self._tick)

    def sweep(self) -> int:
        """Reap every zombie child of ours that asyncio does not own. Returns how many."""
        if self.spawning:
            self._deferred = True
            return 0
        self._deferred = False
        count = 0
        strays = children_of(os.getpid()) - self._owned
        self._strays = bool(strays)
        for pid in strays:
            if not _is_zombie(pid):
                continue
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got:
                count += 1
        self.reaped += count
        return count

    def kill_strays(self) -> set[int]:
        """SIGKILL every live child of ours that asyncio does not own (shutdown). Returns them."""
        strays = {p for p in children_of(os.getpid()) - self._owned if not _is_zombie(p)}
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return strays

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def uninstall(self) -> None:
        for handle in (self._periodic, self._soon):
            if handle is not None:
                handle.cancel()
        self._loop = self._periodic = self._soon = None

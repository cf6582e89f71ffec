"""The memory check of `memory_restart`: which publishers to read each second, and when.

The verdict (above memory_restart for memory_restart_after seconds: restart, reason "memory")
is the publisher's own (`Publisher.check_memory`); this module decides who is looked at. At
1000 publishers with memory_restart, reading each one's memory every second cost 0.9-1.5 % of
a core here (about 5 µs a publisher in cgroups, 8 µs on the /proc path: two or three small
reads and their parsing), and the issue wants no measurable idle CPU. So:

- With the memory controller (publisher cgroups offering memory.current), nobody is read while
  quiet. The cgroup's `memory.high` is a tripwire at memory_restart: the kernel counts `high`
  in memory.events when an allocation crosses it, and reports the change of memory.events as
  a file modification (cgroup v2's own notification), which one inotify fd (`FileWatch`)
  brings to the loop. The publisher is then "hot": the tripwire is lifted at once (memory.high
  back to "max": held there, the kernel would reclaim or swap it to stay below, and it would
  never be seen above) and it is read each second until it is at or below memory_restart
  again, when the tripwire is set again (only then: memory.high written below the memory in
  use makes the writer reclaim it before the write returns). Where
  `limits.memory_high` is set at or below memory_restart, that limit is the tripwire (any
  crossing of memory_restart crosses it first) and is never touched; set above it, lowering it
  is not ours to do: that publisher is read each second.
- Without it (this machine: cgroup2 without the memory controller, or no cgroup at all), the
  RSS of the tree is read each second, as cheaply as it goes: one statm read per process known
  from the last look at the tree, which is taken every few reads (`usage.REWALK`).
"""

from __future__ import annotations

__all__ = ["MemorySweep"]

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pubmon.config.model import PublisherSpec
from pubmon.core.cgroup import Cgroup
from pubmon.host.cgroupfs import FileWatch

logger = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two sweeps: memory_restart is checked at least this often
_SLICE = 100  # publishers read between two yields to the loop


class Watched(Protocol):
    """What the sweep needs of a publisher (pubmon.core.publisher.Publisher)."""

    name: str
    spec: PublisherSpec
    cgroup: Cgroup | None

    @property
    def pid(self) -> int | None: ...

    def check_memory(self, now: float) -> int | None: ...


@dataclass
class _Trip:
    key: tuple[int | None, int, int | None]  # (pid, memory_restart, limits.memory_high)
    cgroup: Cgroup
    wd: int
    ours: bool  # memory.high is set by us (lifted when it trips), not the operator's limit
    hot: bool = True  # read at each sweep (it tripped, or was just armed)
    armed: bool = False  # ours, and memory.high is at memory_restart now


class MemorySweep:
    """Run `run(publishers)` as a task; cancelling it closes the watch."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.reads = 0  # check_memory calls: what the tripwires save shows here
        self.trips = 0  # tripwires the kernel set off
        self.tripped = asyncio.Event()  # set at each trip (tests wait on it)
        self._trips: dict[str, _Trip] = {}
        self._names: dict[int, str] = {}  # inotify wd -> publisher name
        self._watch: FileWatch | None = None
        self._unarmed: set[str] = set()  # said once why it is read each second

    async def run(self, publishers: Callable[[], Iterable[Watched]]) -> None:
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.sweep(publishers())
        finally:
            self.close()

    async def sweep(self, publishers: Iterable[Watched]) -> None:
        now = time.monotonic()
        seen, n = set(), 0
        for pub in publishers:
            limit = pub.spec.memory_restart
            if limit is None:
                continue
            seen.add(pub.name)
            trip = self._tripwire(pub, limit)
            if trip is not None and not trip.hot:
                continue
            used = pub.check_memory(now)
            self.reads += 1
            if trip is not None and used is not None and used <= limit:
                self._rearm(trip, limit)
            n += 1
            if n % _SLICE == 0:
                await asyncio.sleep(0)
        for name in self._trips.keys() - seen:  # removed, or memory_restart unset by a reload
            self._drop(name)

    def _tripwire(self, pub: Watched, limit: int) -> _Trip | None:
        """The armed tripwire of `pub`'s current run, or None: read it every sweep."""
        cg = pub.cgroup
        if cg is None or "memory" not in cg.controllers or pub.pid is None:
            return None
        high = pub.spec.limits.memory_high
        key = (pub.pid, limit, high)
        trip = self._trips.get(pub.name)
        if trip is not None and trip.key == key:
            return trip
        if trip is not None:
            self._drop(pub.name)
        if high is not None and high > limit:
            if pub.name not in self._unarmed:
                self._unarmed.add(pub.name)
                logger.info(
                    "%s: memory read each second: limits.memory_high (%d) is above "
                    "memory_restart (%d), so memory.high cannot tell when it is crossed",
                    pub.name,
                    high,
                    limit,
                )
            return None
        try:
            if self._watch is None:
                self._watch = FileWatch()
                asyncio.get_running_loop().add_reader(self._watch.fd, self._woken)
            wd = self._watch.add(os.path.join(cg.path, "memory.events"))
        except OSError as exc:
            if pub.name not in self._unarmed:
                self._unarmed.add(pub.name)
                logger.warning("%s: memory read each second: no tripwire: %s", pub.name, exc)
            return None
        trip = self._trips[pub.name] = _Trip(key, cg, wd, ours=high is None)
        self._names[wd] = pub.name
        # Hot: read once now. memory.high is written only once a read found the memory
        # below memory_restart (`_rearm`): set below what is in use, the write itself would
        # reclaim memory of the publisher's, in this thread, before it returns.
        return trip

    def _woken(self) -> None:
        assert self._watch is not None
        for wd in self._watch.read():
            trip = self._trips.get(self._names.get(wd, ""))
            if trip is None or trip.wd != wd:
                continue
            trip.hot = True
            self.trips += 1
            self.tripped.set()
            if trip.armed:
                # Lifted at once, even if it was hot already: held at memory.high, the kernel
                # would reclaim (or swap) it to stay below, and it would never be seen above.
                self._lift(trip)

    def _rearm(self, trip: _Trip, limit: int) -> None:
        """At or below memory_restart again: quiet until the tripwire trips."""
        try:
            if trip.ours:
                trip.cgroup.set_memory_high(limit)
                trip.armed = True
            # It may have crossed between the read and the write: then stay hot.
            trip.hot = trip.cgroup.memory_current() > limit
        except (OSError, ValueError):
            trip.hot = True
        if trip.hot and trip.armed:
            self._lift(trip)

    @staticmethod
    def _lift(trip: _Trip) -> None:
        trip.armed = False
        try:
            trip.cgroup.set_memory_high(None)
        except OSError:
            pass  # the cgroup went with its publisher

    def _drop(self, name: str) -> None:
        trip = self._trips.pop(name)
        self._names.pop(trip.wd, None)
        if self._watch is not None:
            self._watch.remove(trip.wd)
        if trip.armed:
            self._lift(trip)

    def close(self) -> None:
        if self._watch is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watch.fd)
            except RuntimeError:
                pass
            self._watch.close()
            self._watch = None
        self._trips.clear()
        self._names.clear()

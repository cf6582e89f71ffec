"""All publishers: requests by name, reloads by diff, ordered shutdown, snapshots.

    async with Supervisor(config) as sup:     # spawns every autostart publisher
        await sup.wait_settled()              # the first round is over (sd_notify READY=1)
        await sup.restart("feed:0")
    # leaving the block stops everything, dependents before their dependencies

The supervisor itself has three states: RUNNING, STOPPING (once `begin_stopping()` or
`stop_all()` is called: start, restart, reload and add are refused with InvalidState, stops
still go through) and CLOSED (everything stopped or given up on). Every publisher runner is a
task in the supervisor's TaskGroup. A publisher's crash is data (a state change and a restart
decision), never an exception; only pubmon bugs escape the group.

Nothing here is process-wide: the Supervisor does not make the process a child subreaper, swap
asyncio's child watcher, or reap children it did not spawn, so a program may embed one and keep
its own children's exit statuses. The daemon does that set-up (pubmon.daemon.reaping) and gives
the Supervisor its orphan reaper (`reaper=`), which the spawns keep informed of the pids asyncio
owns.
"""

from __future__ import annotations

__all__ = ["Leftover", "Supervisor", "SupervisorState"]

import asyncio
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from types import TracebackType
from typing import NamedTuple

from pubmon.config.diff import ConfigDiff, diff_configs
from pubmon.config.model import Config, PublisherSpec
from pubmon.core.cgroup import Cgroups
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.memsweep import MemorySweep
from pubmon.core.publisher import KILL_BOUND, Outcome, Publisher, PublisherSnapshot, Pulse
from pubmon.core.reaper import OrphanReaper
from pubmon.errors import InvalidState, UnknownPublisher

logger = logging.getLogger(__name__)

S = PublisherState
_TERMINAL = (S.BACKOFF, S.EXITED, S.FATAL)
REQUEST_GRACE = 5.0  # how long an operator's request waits beyond the publisher's own timeouts


class SupervisorState(enum.StrEnum):
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    CLOSED = "CLOSED"


class Leftover(NamedTuple):
    """A publisher whose child a shutdown could not end."""

    name: str
    pid: int | None
    details: str


class Supervisor:
    """Owns the publishers of one config. Use as an async context manager."""

    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        cgroups: Cgroups | None = None,
        reaper: OrphanReaper | None = None,
    ) -> None:
        self.config = config
        self.cgroups = cgroups  # a cgroup per publisher below it (pubmon.core.cgroup), or None
        self.publishers: dict[str, Publisher] = {}
        self.changed = Pulse()
        # The program's orphan reaper (pubmon.daemon.reaping), told of every spawn, or None.
        self.reaper = reaper
        self.state = SupervisorState.RUNNING
        self.started_at = time.time()
        self.leftovers: list[Leftover] = []
        self._rng = rng
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg = asyncio.TaskGroup()
        self._reload_lock = asyncio.Lock()
        self._dependents: dict[str, list[Publisher]] = {}  # program -> who depends on it
        # program -> its instances by name, in status order: a dependent's every spawn asks
        # whether its dependencies' instances run, and a scan of all publishers made each
        # ask O(N) (starting a db and 2000 dependents in-process: 1.4 s of CPU, now 1.2 s).
        self._programs: dict[str, dict[str, Publisher]] = {}
        self._sweep: asyncio.Task[None] | None = None
        self.memory_sweep = MemorySweep()  # memory_restart: who is read each second, and when
        # Called when a publisher ends for good (EXITED or FATAL): the daemon's critical check.
        self.on_ended: Callable[[Publisher], None] = lambda _: None

    def __repr__(self) -> str:
        running = sum(p.state == S.RUNNING for p in self.publishers.values())
        return f"<Supervisor {self.state} {running}/{len(self.publishers)} running>"

    @property
    def stopping(self) -> bool:
        return self.state != SupervisorState.RUNNING

    async def __aenter__(self) -> Supervisor:
        await self._tg.__aenter__()
        for spec in self.config.publishers:
            self._add(spec)
        self._index()
        self._sweep = self._tg.create_task(
            # A lambda: a reload replaces the dict.
            self.memory_sweep.run(lambda: self.publishers.values()),
            name="memory sweep",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.state != SupervisorState.CLOSED:
                await self.stop_all(self.config.daemon.shutdown_timeout)
        finally:
            self.state = SupervisorState.CLOSED
            for task in self._tasks.values():
                task.cancel()
            if self._sweep is not None:
                self._sweep.cancel()
            try:
                await self._tg.__aexit__(exc_type, exc, tb)
            finally:
                for pub in self.publishers.values():
                    pub.output.close()
                    if pub.cgroup is not None:
                        pub.cgroup.remove()

    # --- lookup -------------------------------------------------------------------------------

    def get(self, name: str) -> Publisher:
        try:
            return self.publishers[name]
        except KeyError:
            raise UnknownPublisher(name) from None

    def resolve(self, names: Iterable[str]) -> list[Publisher]:
        """Instance names, or program names meaning all their instances. UnknownPublisher else."""
        out: list[Publisher] = []
        for name in names:
            if name in self.publishers:
                out.append(self.publishers[name])
                continue
            group = self._instances(name)
            if not group:
                raise UnknownPublisher(name)
            out.extend(group)
        return out

    def snapshots(self) -> list[PublisherSnapshot]:
        return [p.snapshot() for p in self.publishers.values()]

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pub in self.publishers.values():
            out.update(pub.counters())
        return out

    # --- operator's requests ------------------------------------------------------------------

    async def start(self, name: str) -> PublisherSnapshot:
        self._refuse_if_stopping("start")
        pub = self.get(name)
        await self._bounded(pub, pub.start())
        return pub.snapshot()

    async def stop(self, name: str) -> PublisherSnapshot:
        if self.state == SupervisorState.CLOSED:
            raise InvalidState("pubmon has stopped")
        pub = self.get(name)
        await self._bounded(pub, pub.stop())
        return pub.snapshot()

    async def restart(self, name: str) -> PublisherSnapshot:
        self._refuse_if_stopping("restart")
        pub = self.get(name)
        await self._bounded(pub, pub.restart())
        return pub.snapshot()

    async def pause(self, name: str) -> PublisherSnapshot:
        """Freeze its cgroup (InvalidState without one, or unless RUNNING)."""
        self._refuse_if_stopping("pause")
        pub = self.get(name)
        await self._bounded(pub, pub.pause())
        return pub.snapshot()

    async def resume(self, name: str) -> PublisherSnapshot:
        self._refuse_if_stopping("resume")
        pub = self.get(name)
        await self._bounded(pub, pub.resume())
        return pub.snapshot()

    def _refuse_if_stopping(self, what: str) -> None:
        if self.stopping:
            raise InvalidState(f"pubmon is {self.state}: {what} refused")

    @staticmethod
    def _bound(pub: Publisher) -> float:
        """How long a request's caller waits for its outcome. A stop may take stop_timeout,
        then KILL_BOUND before a child that outlived its SIGKILL is reported stuck: the answer
        then names its pid and /proc state."""
        spec = pub.spec
        return spec.start_timeout + spec.stop_timeout + KILL_BOUND + REQUEST_GRACE

    async def _bounded(self, pub: Publisher, request: Awaitable[Outcome]) -> Outcome | None:
        # The request itself stays in force; only the caller stops waiting for its outcome.
        bound = self._bound(pub)
        try:
            async with asyncio.timeout(bound):
                outcome: Outcome = await request
        except TimeoutError:
            _gave_up(pub, bound)
            return None
        return outcome

    # --- the whole set ------------------------------------------------------------------------

    def _add(self, spec: PublisherSpec) -> Publisher:
        self._refuse_if_stopping("adding a publisher")
        pub = Publisher(
            spec,
            log_dir=self.config.daemon.log_dir,
            changed=self.changed,
            deps_ready=self._deps_ready,
            on_transition=self._on_transition,
            reaper=self.reaper,
            cgroup=self.cgroups.publisher(spec.name) if self.cgroups else None,
            rng=self._rng,
        )
        self.publishers[spec.name] = pub
        task = self._tg.create_task(pub.run(), name=f"publisher {spec.name}")
        task.add_done_callback(lambda _: self.changed.fire())  # see _all_halted
        self._tasks[spec.name] = task
        return pub

    def _index(self) -> None:
        """Index the publishers by program: their instances, and who depends on them."""
        self._dependents = {}
        self._programs = {}
        for p in self.publishers.values():
            self._programs.setdefault(p.spec.program, {})[p.name] = p
            for dep in p.spec.depends_on:
                self._dependents.setdefault(dep, []).append(p)

    def _instances(self, program: str) -> Collection[Publisher]:
        instances = self._programs.get(program)
        return () if instances is None else instances.values()

    def _deps_ready(self, spec: PublisherSpec) -> bool:
        return all(p.state == S.RUNNING for dep in spec.depends_on for p in self._instances(dep))

    def _on_transition(self, pub: Publisher) -> None:
        self._wake_dependents(pub)
        if pub.state in (S.EXITED, S.FATAL):
            self.on_ended(pub)

    def _wake_dependents(self, pub: Publisher) -> None:
        """`pub` changed state: a publisher waiting for it to be RUNNING may start now."""
        for p in self._dependents.get(pub.spec.program, ()):
            p.nudge()

    def _settled(self, pub: Publisher) -> bool:
        if not pub.wanted or pub.state in (S.RUNNING, *_TERMINAL):
            return True
        if pub.state != S.STOPPED:
            return False
        # Waiting for a dependency that is not coming: as settled as it will get.
        deps = [d for dep in pub.spec.depends_on for d in self._instances(dep)]
        return any(d.state in _TERMINAL or not d.wanted for d in deps)

    async def _wait_settled_each(self, pubs: list[Publisher]) -> None:
        """A reload's wait for the publishers it added: until each one settled, or its own
        `_bound` passed (then it is named, as `_bounded` does).

        One waiter for all, as `wait_settled`: a waiter per publisher on `changed` re-checked
        every added publisher on each of their changes, O(N^2) for a reload adding N
        (tests/test_scaling.py counted `_settled` 255 -> 3720 times for 15 -> 60 added; a
        reload adding 1000 `sleep` publishers took 3.6 s of CPU, now 0.5 s, measured
        in-process, 2-core box at load ~3). Each fire looks only at the pending publisher
        with the earliest deadline."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = deque(sorted(pubs, key=self._bound))

        def all_done() -> bool:
            now = loop.time()
            while pending:
                head = pending[0]
                if not self._settled(head):
                    bound = self._bound(head)
                    if now < start + bound:
                        return False
                    _gave_up(head, bound)
                pending.popleft()
            return True

        while not all_done():
            try:
                async with asyncio.timeout_at(start + self._bound(pending[0])):
                    await self.changed.wait_for(all_done)
            except TimeoutError:
                pass  # all_done() names the publisher whose bound passed

    async def wait_settled(self) -> None:
        """Wait until every wanted publisher is RUNNING or has failed at least once (also
        those a reload added meanwhile)."""
        while True:
            await self.changed.wait_for_each(list(self.publishers.values()), self._settled)
            if all(self._settled(p) for p in self.publishers.values()):
                return

    def summary(self) -> str:
        """One line for sd_notify STATUS= and getStatusDetails."""
        pubs = self.publishers.values()
        wanted = [p for p in pubs if p.wanted or p.state in (S.RUNNING, S.FATAL)]
        running = sum(p.state == S.RUNNING for p in pubs)
        fatal = sum(p.state == S.FATAL for p in pubs)
        unhealthy = sum(p.health == Health.UNHEALTHY for p in pubs)
        text = f"{running}/{len(wanted)} publishers running, {fatal} fatal"
        if unhealthy:
            text += f", {unhealthy} unhealthy"
        paused = sum(p.state == S.PAUSED for p in pubs)
        if paused:
            text += f", {paused} paused"
        stuck = sum(p.stuck for p in pubs)
        if stuck:
            text += f", {stuck} stuck after SIGKILL"
        return text

    def begin_stopping(self) -> None:
        """From now on start, restart, reload and add are refused."""
        if self.state == SupervisorState.RUNNING:
            self.state = SupervisorState.STOPPING

    async def stop_all(self, timeout: float | None = None) -> list[Leftover]:
        """Stop every publisher, dependents first; SIGKILL all that remain after `timeout`,
        and give up on any child still there KILL_BOUND later (returned, and logged)."""
        self.begin_stopping()
        pubs = list(self.publishers.values())
        # One line for all: each publisher's RUNNING -> STOPPING line (which said only "pubmon
        # is stopping") is at DEBUG; its STOPPING -> STOPPED line, with how it ended, stays.
        logger.info("stopping %d publishers, dependents first", len(pubs))
        try:
            async with asyncio.timeout(timeout):
                await self._stop_in_order(pubs, quiet=True)
        except TimeoutError:
            logger.warning("shutdown_timeout %g s passed; killing what is left", timeout)
            self.kill_all()
            try:
                async with asyncio.timeout(KILL_BOUND + 1.0):
                    await self._all_halted(pubs)
            except TimeoutError:
                pass
        self.leftovers = [
            Leftover(p.name, p.child.pid if p.child else None, p.details)
            for p in pubs
            if not self._halted(p)
        ]
        for left in self.leftovers:
            logger.error("left behind: %s pid %s: %s", left.name, left.pid, left.details)
        self.state = SupervisorState.CLOSED
        return self.leftovers

    def _halted(self, pub: Publisher) -> bool:
        runner = self._tasks.get(pub.name)
        return pub.halted() or runner is None or runner.done()

    async def _all_halted(self, pubs: Iterable[Publisher]) -> None:
        """Wait until every one of `pubs` halted, or its runner ended (a pubmon bug must not
        hang shutdown). One waiter for all: a task per publisher was a fifth of stopping 1000."""
        await self.changed.wait_for_each(pubs, self._halted)

    async def _stop_in_order(self, pubs: list[Publisher], *, quiet: bool = False) -> None:
        dependents = self._dependents
        remaining = set(pubs)
        while remaining:
            # A publisher may stop once nothing that depends on it is still running.
            level = [
                p
                for p in remaining
                if not any(d in remaining for d in dependents.get(p.spec.program, ()))
            ] or list(remaining)  # a cycle cannot pass config checks; never hang on one
            for p in level:
                p.shutdown(quiet=quiet)
            await self._all_halted(level)
            remaining.difference_update(level)

    def kill_all(self) -> None:
        """SIGKILL every publisher's group now (the second SIGTERM)."""
        self.begin_stopping()
        for pub in self.publishers.values():
            pub.kill()

    async def reload(
        self, new: Config, on_applied: Callable[[ConfigDiff], None] = lambda _: None
    ) -> ConfigDiff:
        """Apply a validated config: add, remove, restart (spawn settings changed) or update
        live, per FIELD_EFFECTS, then wait (bounded) for the outcome. Refused with
        InvalidState once stopping. `on_applied` is called once every change has been posted,
        before the first await: from then on the reload has happened, even if its caller
        stops waiting (a shutdown cancels it) before the publishers settle."""
        self._refuse_if_stopping("reload")
        async with self._reload_lock:
            self._refuse_if_stopping("reload")
            diff = diff_configs(self.config, new)
            old_config, self.config = self.config, new
            if new.daemon.log_dir != old_config.daemon.log_dir:
                logger.warning("daemon.log_dir changed: takes effect at the next daemon start")
            # Everything is posted before the first await: a shutdown that begins while this
            # reload waits finds every publisher of the new config in place, and stops it.
            removed = [self.publishers[c.name] for c in diff.changes if c.change == "removed"]
            specs = {spec.name: spec for spec in new.publishers}  # Config.publisher() scans
            posted: list[tuple[Publisher, asyncio.Future[Outcome] | None]] = []
            for c in diff.changes:
                if c.change == "added":
                    pub = self._add(specs[c.name])
                    if pub.wanted:
                        posted.append((pub, None))  # None: wait until it settled
                elif c.change in ("restarted", "updated"):
                    pub = self.publishers[c.name]
                    spec = specs[c.name]
                    answer = pub.update(spec, c.top, restart=c.change == "restarted")
                    posted.append((pub, answer))
            # Reorder to the new config's order (status lists it so), removed ones last.
            order = {spec.name: i for i, spec in enumerate(new.publishers)}
            self.publishers = dict(
                sorted(self.publishers.items(), key=lambda kv: order.get(kv[0], len(order)))
            )
            self._index()
            on_applied(diff)
            await self._stop_in_order(removed)
            for pub in removed:
                task = self._tasks.pop(pub.name)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                pub.output.close()
                if pub.cgroup is not None:
                    pub.cgroup.remove()
                del self.publishers[pub.name]
                self._programs[pub.spec.program].pop(pub.name, None)
            await asyncio.gather(
                self._wait_settled_each([p for p, a in posted if a is None]),
                *(self._bounded(p, a) for p, a in posted if a is not None),
            )
            logger.info(
                "reloaded %s: %d added, %d removed, %d restarted, %d updated, %d unchanged",
                new.path,
                len(diff.added),
                len(diff.removed),
                len(diff.changed),
                len(diff.policy_only),
                len(diff.unchanged),
            )
            self.changed.fire()
            return diff


def _gave_up(pub: Publisher, bound: float) -> None:
    logger.info("%s: still %s after %g s; not waiting any longer", pub.name, pub.state, bound)

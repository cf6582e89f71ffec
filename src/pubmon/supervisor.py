"""All publishers: start/stop/restart by name, reloads by diff, ordered shutdown, snapshots.

    async with Supervisor(config) as sup:     # spawns every autostart publisher
        await sup.wait_settled()              # the first round is over (sd_notify READY=1)
        await sup.restart("feed:0")
    # leaving the block stops everything, dependents before their dependencies

Every publisher runner is a task in the supervisor's TaskGroup. A publisher's crash is data (a
state change and a restart decision), never an exception; only pubmon bugs escape the group.
"""

from __future__ import annotations

__all__ = ["Supervisor"]

import asyncio
import logging
import os
import random
import time
from collections.abc import Iterable
from types import TracebackType

from .config import Config, ConfigDiff, PublisherSpec, diff_configs
from .errors import UnknownPublisher
from .lifecycle import Health, PublisherState
from .publisher import Publisher, PublisherSnapshot, Pulse, StopFunc, stop_child
from .spawn import OrphanReaper, become_subreaper, install_child_watcher

logger = logging.getLogger(__name__)

S = PublisherState
_TERMINAL = (S.BACKOFF, S.EXITED, S.FATAL)
REQUEST_GRACE = 5.0  # how long an operator's request waits beyond the publisher's own timeouts


class Supervisor:
    """Owns the publishers of one config. Use as an async context manager."""

    def __init__(
        self, config: Config, *, stop: StopFunc = stop_child, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.publishers: dict[str, Publisher] = {}
        self.changed = Pulse()
        self.reaper = OrphanReaper()
        self.stopping = False
        self.started_at = time.time()
        self._stop = stop
        self._rng = rng
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tg = asyncio.TaskGroup()
        self._reload_lock = asyncio.Lock()

    def __repr__(self) -> str:
        running = sum(p.state == S.RUNNING for p in self.publishers.values())
        return f"<Supervisor {running}/{len(self.publishers)} running>"

    async def __aenter__(self) -> Supervisor:
        loop = asyncio.get_running_loop()
        install_child_watcher()
        become_subreaper()
        self.reaper.install(loop)
        await self._tg.__aenter__()
        for spec in self.config.publishers:
            self._add(spec)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop_all(self.config.daemon.shutdown_timeout)
        finally:
            for task in self._tasks.values():
                task.cancel()
            try:
                await self._tg.__aexit__(exc_type, exc, tb)
            finally:
                self._final_sweep()
                self.reaper.uninstall()
                for pub in self.publishers.values():
                    pub.output.close()

    def _final_sweep(self) -> None:
        # Anything left among our children now is an orphaned grandchild that escaped its group
        # (setsid): it is ours to end, and its zombie ours to reap.
        strays = self.reaper.kill_strays()
        if strays:
            logger.warning("killed %d stray descendant(s) at shutdown: %s", len(strays), strays)
        for pid in strays:
            try:
                os.waitpid(pid, 0)  # SIGKILL'd: a zombie within microseconds
            except ChildProcessError:
                pass
        self.reaper.sweep()

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
            group = [p for p in self.publishers.values() if p.spec.program == name]
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
        pub = self.get(name)
        await self._bounded(pub, pub.start())
        return pub.snapshot()

    async def stop(self, name: str) -> PublisherSnapshot:
        pub = self.get(name)
        await self._bounded(pub, pub.stop())
        return pub.snapshot()

    async def restart(self, name: str) -> PublisherSnapshot:
        pub = self.get(name)
        await self._bounded(pub, pub.restart())
        return pub.snapshot()

    async def _bounded(self, pub: Publisher, request: object) -> None:
        # The request itself stays in force; only the caller stops waiting for its outcome.
        spec = pub.spec
        bound = spec.start_timeout + spec.stop_timeout + REQUEST_GRACE
        assert asyncio.iscoroutine(request)
        try:
            async with asyncio.timeout(bound):
                await request
        except TimeoutError:
            logger.info(
                "%s: still %s after %g s; not waiting any longer", pub.name, pub.state, bound
            )

    # --- the whole set ------------------------------------------------------------------------

    def _add(self, spec: PublisherSpec) -> Publisher:
        pub = Publisher(
            spec,
            log_dir=self.config.daemon.log_dir,
            changed=self.changed,
            deps_ready=self._deps_ready,
            reaper=self.reaper,
            stop=self._stop,
            rng=self._rng,
        )
        self.publishers[spec.name] = pub
        task = self._tg.create_task(pub.run(), name=f"publisher {spec.name}")
        task.add_done_callback(lambda _: self.changed.fire())  # see _all_halted
        self._tasks[spec.name] = task
        return pub

    def _instances(self, program: str) -> list[Publisher]:
        return [p for p in self.publishers.values() if p.spec.program == program]

    def _deps_ready(self, spec: PublisherSpec) -> bool:
        return all(p.state == S.RUNNING for dep in spec.depends_on for p in self._instances(dep))

    def _settled(self, pub: Publisher) -> bool:
        if not pub.wanted or pub.state in (S.RUNNING, *_TERMINAL):
            return True
        if pub.state != S.STOPPED:
            return False
        # Waiting for a dependency that is not coming: as settled as it will get.
        deps = [d for dep in pub.spec.depends_on for d in self._instances(dep)]
        return any(d.state in _TERMINAL or not d.wanted for d in deps)

    async def wait_settled(self) -> None:
        """Wait until every wanted publisher is RUNNING or has failed at least once."""
        await self.changed.wait_for_each(self.publishers.values(), self._settled)

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
        return text

    async def stop_all(self, timeout: float | None = None) -> None:
        """Stop every publisher, dependents first; SIGKILL all that remain after `timeout`."""
        self.stopping = True
        pubs = list(self.publishers.values())
        try:
            async with asyncio.timeout(timeout):
                await self._stop_in_order(pubs)
        except TimeoutError:
            logger.warning("shutdown_timeout %g s passed; killing what is left", timeout)
            self.kill_all()
            await self._all_halted(pubs)

    async def _all_halted(self, pubs: Iterable[Publisher]) -> None:
        """Wait until every one of `pubs` halted, or its runner ended (a pubmon bug must not
        hang shutdown). One waiter for all: a task per publisher was a fifth of stopping 1000."""

        def halted(pub: Publisher) -> bool:
            runner = self._tasks.get(pub.name)
            return pub.halted() or runner is None or runner.done()

        await self.changed.wait_for_each(pubs, halted)

    async def _stop_in_order(self, pubs: list[Publisher]) -> None:
        dependents: dict[str, list[Publisher]] = {}  # program -> publishers that depend on it
        for p in self.publishers.values():
            for dep in p.spec.depends_on:
                dependents.setdefault(dep, []).append(p)
        remaining = set(pubs)
        while remaining:
            # A publisher may stop once nothing that depends on it is still running.
            level = [
                p
                for p in remaining
                if not any(d in remaining for d in dependents.get(p.spec.program, ()))
            ] or list(remaining)  # a cycle cannot pass config checks; never hang on one
            for p in level:
                p.stop_soon()
            await self._all_halted(level)
            remaining.difference_update(level)

    def kill_all(self) -> None:
        """SIGKILL every publisher's group now (the second SIGTERM)."""
        self.stopping = True
        for pub in self.publishers.values():
            pub.kill_now()

    async def reload(self, new: Config) -> ConfigDiff:
        """Apply a validated config: start added, stop removed, restart changed, update policy."""
        async with self._reload_lock:
            diff = diff_configs(self.config, new)
            old_config, self.config = self.config, new
            if new.daemon.log_dir != old_config.daemon.log_dir:
                logger.warning("daemon.log_dir changed: takes effect at the next daemon start")
            removed = [self.publishers[n] for n in diff.removed]
            await self._stop_in_order(removed)
            for pub in removed:
                task = self._tasks.pop(pub.name)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                pub.output.close()
                del self.publishers[pub.name]
            for name in diff.policy_only:
                self.publishers[name].update_policy(self._spec(new, name))
            restarts = []
            for name in diff.changed:
                pub = self.publishers[name]
                pub.spec = self._spec(new, name)
                pub.output.reconfigure(pub.spec.log)
                if pub.wanted or pub.child is not None:
                    restarts.append(self._bounded(pub, pub.restart()))
            added = [self._add(self._spec(new, name)) for name in diff.added]
            starts = [self._bounded(p, p.wait_started_if_wanted()) for p in added]
            await asyncio.gather(*restarts, *starts)
            logger.info(
                "reloaded %s: %d added, %d removed, %d changed, %d policy-only, %d unchanged",
                new.path,
                len(diff.added),
                len(diff.removed),
                len(diff.changed),
                len(diff.policy_only),
                len(diff.unchanged),
            )
            self.changed.fire()
            return diff

    @staticmethod
    def _spec(config: Config, name: str) -> PublisherSpec:
        spec = config.publisher(name)
        assert spec is not None
        return spec

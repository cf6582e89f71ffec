"""`pubmon daemon`: the top TaskGroup and the order things start and stop in.

Start: take the config lock, install signal handlers (before anything can be signalled), open
the listeners (a live control socket means another daemon: refuse before spawning anything),
start the supervisor (which spawns autostart publishers), wait for the first round to settle,
tell systemd READY=1 (once: never before the first round settled, even if a reload came first).
While the supervisor runs, the process is a child subreaper with the pidfd child watcher and an
orphan reaper (pubmon.daemon.reaping): set up here, by the program, never by the Supervisor.

Reloads (SIGHUP, `reloadConfig`, `reinitialize`) are queued to one worker and run one at a time;
SIGHUPs that arrive while one is queued are one reload. Each reload validates the file, applies
[control] and [monitor] (Listeners.reconfigure: a bind failure fails the reload with nothing
changed), then the publishers (Supervisor.reload). systemd hears RELOADING=1 then READY=1 only
while the daemon is running and ready.

Stop (first SIGTERM): STOPPING=1, the supervisor refuses start/restart/reload from now on, the
reload worker is cancelled and waited for (a reload never overlaps the ordered stop), then the
publishers stop dependents-first under shutdown_timeout while the listeners still answer. A child
that outlives its SIGKILL by KILL_BOUND is given up on: the daemon still ends, within
shutdown_timeout + KILL_BOUND, exits 1 and names it. After STOPPING=1 systemd hears only STATUS=
and EXTEND_TIMEOUT_USEC=, the latter only while stops are making progress. A second SIGTERM
kills every group at once.

A publisher with `critical = true` that ends for good (EXITED, or FATAL) stops the daemon the
same way, and the daemon exits with its status (code, or 128 + signal) so that Kubernetes
restarts the pod and systemd applies Restart=; the log and getStatusDetails name it.
As an init (PID 1, or --init) the daemon then ends every other process (`_init.end_the_rest`),
and with `[daemon] log_stdout` publisher lines go to its stdout (`_stdout`).
"""

from __future__ import annotations

__all__ = ["EXIT_LEFT_BEHIND", "EXIT_OK", "Daemon", "exit_status"]

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from pubmon.config.diff import ConfigDiff, ReloadReport, daemon_changes
from pubmon.config.load import load_config
from pubmon.config.model import Config
from pubmon.core import stdout as _stdout
from pubmon.core.cgroup import Cgroups, limit_problems
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.procstats import ProcStats
from pubmon.core.publisher import Publisher
from pubmon.core.reaper import OrphanReaper
from pubmon.core.supervisor import Leftover, Supervisor
from pubmon.daemon import init as _init
from pubmon.daemon.lock import DaemonLock, acquire_lock
from pubmon.daemon.notify import Notifier
from pubmon.daemon.reaping import reaping
from pubmon.daemon.signals import GRACEFUL, SignalQueue
from pubmon.daemon.upgrade import Handover, Upgrader
from pubmon.errors import ConfigError, ConfigProblem, InvalidState, StartupError, UpgradeRefused
from pubmon.service.handler import Listeners

if TYPE_CHECKING:
    from pubmon.http.server import HttpServer  # [http] hook

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LEFT_BEHIND = 1  # a graceful stop had to give up on a child that would not die
STDOUT_FLUSH = 2.0  # at exit, how long publisher lines still buffered for stdout may take


def exit_status(returncode: int | None) -> int:
    """A child's status as a shell reports it: its code, 128 + signal, or 1 if it never ran."""
    if returncode is None:
        return 1
    return 128 - returncode if returncode < 0 else returncode & 0xFF


class Daemon:
    """One daemon run. `await Daemon(config).run()` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        *,
        signals: SignalQueue | None = None,
        notifier: Notifier | None = None,
        init: bool = False,
    ) -> None:
        self.config = config
        self.pid1 = _init.is_pid1()
        self.init = init or self.pid1  # reap and end every process of the namespace / subtree
        self.signals = signals or SignalQueue()
        self.notifier = notifier or Notifier()
        self.supervisor: Supervisor | None = None
        self.started_at = time.time()
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error = ""
        self.loop_lag_ms = 0
        self.ready = asyncio.Event()  # the first autostart round has settled
        self.forced = False
        self.exit_code: int | None = None  # set by a critical publisher that ended for good
        self.ended_by = ""  # which publisher ended the daemon, and how
        self.stdout: _stdout.StdoutSink | None = None
        self.listeners: Listeners | None = None
        self.procstats = ProcStats()  # [http] hook: /proc figures shared by /metrics and status
        self.http: HttpServer | None = None  # [http] hook
        self.cgroups: Cgroups | None = None  # the cgroup subtree publishers run in, if any
        # Orphans re-parented to us (a child subreaper while it runs: pubmon.daemon.reaping).
        self.reaper = OrphanReaper()
        if self.init:  # every orphan of the namespace lands here: reap within 1 s
            self.reaper.QUIET_PERIOD = self.reaper.PERIOD
        self._stop = asyncio.Event()
        # Reloads to run: a caller's future, or None for a SIGHUP (nobody waits for it).
        self._reloads: asyncio.Queue[asyncio.Future[ReloadReport] | None] = asyncio.Queue()
        self._sighup_queued = False
        self._applied: ReloadReport | None = None  # the reload under way, once applied
        self._status_cache = (-1, "")  # (supervisor.changed.fires, verdict)
        # [upgrade] hooks: `pubmon upgrade` / SIGUSR2, and what a previous image handed over.
        self.upgrader = Upgrader(self)
        self.lock: DaemonLock | None = None
        self.reload_busy = False
        self._handover: Handover | None = None
        self._tg: asyncio.TaskGroup | None = None

    # --- requests (signals, RPC) --------------------------------------------------------------

    def request_stop(self, exit_code: int | None = None) -> None:
        if exit_code is not None and not self.stopping:
            self.exit_code = exit_code
        self._stop.set()

    def _on_ended(self, pub: Publisher) -> None:
        """A publisher went EXITED or FATAL: a critical one ends the daemon."""
        if not pub.spec.critical or self.stopping:
            return
        never_ran = pub.state == PublisherState.FATAL and pub.details.startswith("cannot start")
        code = exit_status(None if never_ran else pub.last_exit)
        self.ended_by = f"critical publisher {pub.name} {pub.state}: {pub.details}"
        logger.error("%s; stopping pubmon, exit status %d", self.ended_by, code)
        self.request_stop(code)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def reload_queued(self) -> bool:
        """[upgrade] hook: a reload asked for (SIGHUP, reloadConfig) and not begun yet."""
        return not self._reloads.empty()

    def request_reload(self) -> None:
        """SIGHUP or `reinitialize`: reload soon; several before it runs are one reload."""
        if self.stopping:
            logger.warning("reload refused: pubmon is stopping")
            return
        if not self._sighup_queued:
            self._sighup_queued = True
            self._reloads.put_nowait(None)

    async def reload(self) -> ReloadReport:
        """Reload and say what changed; ConfigError (the old config keeps running),
        StartupError (a listener could not be rebound) or InvalidState (stopping)."""
        if self.stopping:
            raise InvalidState("pubmon is stopping: reload refused")
        answer: asyncio.Future[ReloadReport] = asyncio.get_running_loop().create_future()
        self._reloads.put_nowait(answer)
        return await asyncio.shield(answer)

    async def _reload_worker(self) -> None:
        current: asyncio.Future[ReloadReport] | None = None
        try:
            while True:
                current = await self._reloads.get()
                if current is None:
                    self._sighup_queued = False
                self._applied = None
                self.reload_busy = True
                try:
                    report = await self._reload_once()
                except (ConfigError, StartupError, InvalidState) as exc:
                    if current is not None and not current.done():
                        current.set_exception(exc)
                else:
                    if current is not None and not current.done():
                        current.set_result(report)
                finally:
                    self.reload_busy = False
                current = None
        finally:
            # Cancelled at shutdown. A reload that had applied its changes says so (the
            # shutdown now stops what it started, in order); one that had not, and every
            # queued one, are refused: nothing of them was done.
            if current is not None and not current.done() and self._applied is not None:
                diff, lines = self._applied
                current.set_result(ReloadReport(diff, [*lines, "pubmon began stopping"]))
            refused = InvalidState("pubmon is stopping: reload refused")
            pending = [current]
            while not self._reloads.empty():
                pending.append(self._reloads.get_nowait())
            for answer in pending:
                if answer is not None and not answer.done():
                    answer.set_exception(refused)

    async def _reload_once(self) -> ReloadReport:
        assert self.supervisor is not None and self.listeners is not None
        announce = self.ready.is_set()
        if announce:
            self.notifier.reloading()
        try:
            new = load_config(self.config.path)
            for warning in new.warnings:
                logger.warning("%s: %s", new.path, warning)
            self._check_limits(new)
            lines = daemon_changes(self.config, new)
            lines += await self.listeners.reconfigure(new)

            def applied(diff: ConfigDiff) -> None:
                self._applied = ReloadReport(diff, lines)
                self.config = new
                self.reloads += 1
                self.last_reload_error = ""

            diff = await self.supervisor.reload(new, applied)
        except (ConfigError, StartupError) as exc:
            self.reload_failures += 1
            self.last_reload_error = str(exc)
            logger.error("reload failed, still running the previous config: %s", exc)
            raise
        finally:
            if announce:
                self.notifier.ready(self.status_details())  # dropped once STOPPING=1 went out
        if self.http is not None:  # [http] hook: apply [http] changes live
            lines += await self.http.reconfigure(new)
        elif new.http.listen:
            lines.append(f"http.listen: {new.http.listen!r} (takes effect at the next start)")
        self.notifier.status(self.status_details())
        return ReloadReport(diff, lines)

    def _check_limits(self, config: Config) -> None:
        """Cgroup limits that cannot be applied here (no cgroup, no controller): a warning
        each, or, for a publisher with `limits.require = true`, a ConfigError naming them."""
        specs = ((s.program, s.limits) for s in config.publishers)
        required = []
        for program, why, require in limit_problems(self.cgroups, specs):
            if require:
                required.append(ConfigProblem(f"publisher.{program}.{why.split(':', 1)[0]}", why))
            else:
                logger.warning("%s: publisher.%s.%s (not applied)", config.path, program, why)
        if required:
            raise ConfigError(config.path, required)

    def reopen_logs(self) -> None:
        assert self.supervisor is not None
        for pub in self.supervisor.publishers.values():
            pub.output.reopen()
        logger.info("log files reopened")

    def fb303_status(self) -> str:
        """STARTING, ALIVE, WARNING or STOPPING (fb303 names)."""
        if self.stopping:
            return "STOPPING"
        if not self.ready.is_set() or self.supervisor is None:
            return "STARTING"
        # Every change of a publisher's state or health fires `changed`: until the next one,
        # the verdict over 1000 publishers stands (getStatus is what monitors poll).
        fires = self.supervisor.changed.fires
        if self._status_cache[0] != fires:
            self._status_cache = (fires, self._rollup(self.supervisor))
        return self._status_cache[1]

    @staticmethod
    def _rollup(supervisor: Supervisor) -> str:
        for pub in supervisor.publishers.values():
            if pub.wanted and (
                pub.state != PublisherState.RUNNING
                or pub.health in (Health.UNHEALTHY, Health.DEGRADED)
            ):
                return "WARNING"
            if pub.state == PublisherState.FATAL:
                return "WARNING"
        return "ALIVE"

    def status_details(self) -> str:
        text = self.supervisor.summary() if self.supervisor else "starting"
        if self.ended_by:
            text += f"; stopping: {self.ended_by}"
        if self.last_reload_error:
            text += f"; last reload failed: {self.last_reload_error}"
        return text

    def access_counters(self) -> dict[str, int]:  # access helper: access.denied.<listener>.*
        return self.listeners.refusals.counters() if self.listeners is not None else {}

    def counters(self) -> dict[str, int]:
        out = {
            "daemon.uptime_s": int(time.time() - self.started_at),
            "daemon.reloads": self.reloads,
            "daemon.reload_failures": self.reload_failures,
            "daemon.loop_lag_ms": self.loop_lag_ms,
        }
        if self.supervisor is not None:
            out.update(self.supervisor.counters())
        if self.stdout is not None:
            out["daemon.stdout_lines"] = self.stdout.lines
            out["daemon.stdout_dropped"] = self.stdout.dropped
        out.update(self.upgrader.counters())
        return out

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> int:
        self._handover = Handover.from_environ()  # [upgrade] hook: started by an upgrade
        if self._handover is not None:
            self._handover.restore_daemon(self, self.upgrader)
        kept = self._handover.lock() if self._handover is not None else None
        lock = self.lock = kept or acquire_lock(self.config.path)
        try:
            with self.signals:
                if os.environ.get("PUBMON_TEST_WEDGE") == "1":
                    # Test-only: SIGUSR2 blocks the event loop for good, as a deadlock would.
                    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, time.sleep, 1e6)
                if self._wants_stdout():
                    self.stdout = _stdout.StdoutSink(1)
                    _stdout.install(self.stdout)
                code = await self._run()
        finally:
            if self.stdout is not None:
                _stdout.uninstall(STDOUT_FLUSH)
            lock.close()
            self.notifier.close()
        return code

    async def _run(self) -> int:
        left: list[Leftover] = []
        # [upgrade] hook: the groups of publishers carried over are not stale.
        self.cgroups = Cgroups.setup(self.config.daemon.cgroup, sweep=self._handover is None)
        try:
            self._check_limits(self.config)
        except ConfigError as exc:
            raise StartupError(f"limits that cannot be applied: {exc}") from exc
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            background = [
                tg.create_task(self._dispatch_signals(), name="signals"),
                tg.create_task(self._measure_loop_lag(), name="loop lag"),
                tg.create_task(self.notifier.watchdog(), name="watchdog"),
            ]
            listeners = Listeners(self, self.config)

            async def start_listeners() -> None:
                await listeners.start()
                self.listeners = listeners
                if self.config.http.listen:  # [http] hook (issue 13): 4 lines here, 2 below
                    from pubmon.http.server import (
                        HttpServer,  # aiohttp is imported only when it is used
                    )

                    self.http = HttpServer(self, self.config)
                    await self.http.start()
                    background.append(tg.create_task(self.http.run(), name="http"))

            try:
                if self._handover is None:
                    await start_listeners()
                sup = Supervisor(self.config, cgroups=self.cgroups, reaper=self.reaper)
                async with reaping(self.reaper), sup:
                    self.supervisor = sup
                    sup.on_ended = self._on_ended
                    if self._handover is not None:  # [upgrade] hook: before any runner runs
                        await self._handover.connect(self._handover.restore(sup))
                        # Only now: what connected meanwhile waits in the handed-over
                        # listeners' backlog, and is answered by the adopted state.
                        await start_listeners()
                        self._handover.serving()  # the pause ends: RPC answered, pipes read
                    logger.info("pubmon %d started with %s", os.getpid(), self.config.path)
                    reloads = tg.create_task(self._reload_worker(), name="reloads")
                    background.append(reloads)
                    if self._handover is None:  # [upgrade] hook: taken over = ready again
                        await _first(sup.wait_settled(), self._stop.wait())
                    if not self.stopping:
                        self.ready.set()
                        self.notifier.ready(self.status_details())
                        logger.info("ready: %s", sup.summary())
                        if self._handover is not None:  # [upgrade] hook
                            self._handover.finish(self.upgrader)
                            self._handover = None
                        background.append(tg.create_task(self._report_status(), name="status"))
                    await self._stop.wait()
                    for task in background:
                        if task.get_name() == "status":
                            task.cancel()  # from now on STATUS= says "stopping"
                    logger.info("stopping: %s", sup.summary())
                    self.notifier.stopping(f"stopping: {sup.summary()}")
                    sup.begin_stopping()
                    reloads.cancel()  # a reload never overlaps the ordered stop
                    await asyncio.wait([reloads])
                    background.append(tg.create_task(self._extend_stop_timeout(), name="extend"))
                    left = await sup.stop_all(self.config.daemon.shutdown_timeout)
                    if self.init:
                        await _init.end_the_rest(self.reaper)
            finally:
                if self.http is not None:  # [http] hook
                    await self.http.close()
                await listeners.close()
                for task in background:
                    task.cancel()
        if self.cgroups is not None:  # [cgroup] hook: the supervisor leaf and empty groups go
            self.cgroups.release()
        if left:
            names = ", ".join(f"{x.name} (pid {x.pid}: {x.details})" for x in left)
            logger.error("pubmon %d stopped, leaving behind %s", os.getpid(), names)
            return self.exit_code or EXIT_LEFT_BEHIND
        if self.exit_code is not None:
            logger.info(
                "pubmon %d stopped (%s): exit %d", os.getpid(), self.ended_by, self.exit_code
            )
            return self.exit_code
        logger.info("pubmon %d stopped", os.getpid())
        return EXIT_OK

    def _wants_stdout(self) -> bool:
        daemon = self.config.daemon
        if daemon.log_stdout is not None:
            return daemon.log_stdout
        return self.pid1 and daemon.log_dir is None

    async def _dispatch_signals(self) -> None:
        while True:
            sig = await self.signals.get()
            if sig in GRACEFUL:
                if not self.stopping:
                    logger.info("%s: stopping gracefully (send it again to kill at once)", sig.name)
                    self.request_stop()
                elif self.supervisor is not None:
                    logger.warning("%s again: killing every publisher now", sig.name)
                    self.forced = True
                    self.supervisor.kill_all()
            elif sig == signal.SIGHUP:
                self.request_reload()
            elif sig == signal.SIGUSR1 and self.supervisor is not None:
                self.reopen_logs()
            elif sig == signal.SIGUSR2 and self._tg is not None:  # [upgrade] hook
                self._tg.create_task(self._upgrade_on_signal(), name="upgrade")

    async def _upgrade_on_signal(self) -> None:
        """SIGUSR2: upgrade in place; a refusal is logged (by the upgrader) and nothing else."""
        try:
            await self.upgrader.upgrade()
        except (UpgradeRefused, InvalidState) as exc:
            logger.warning("SIGUSR2: no upgrade: %s", exc)

    async def _report_status(self) -> None:
        # STATUS= follows the publishers, at most five times a second.
        assert self.supervisor is not None
        while True:
            await self.supervisor.changed.wait()
            self.notifier.status(self.status_details())
            await asyncio.sleep(0.2)

    async def _extend_stop_timeout(self) -> None:
        # Ask systemd for more time only while the stop is making progress: the number still
        # running fell, or a publisher is within its own stop bounds (stop_timeout, then
        # KILL_BOUND after SIGKILL). A child stuck after SIGKILL gets no more time.
        assert self.supervisor is not None
        pubs = list(self.supervisor.publishers.values())
        left = len(pubs) + 1
        while True:
            now_left = sum(not p.halted() for p in pubs)
            stopping = any(p.state == PublisherState.STOPPING and not p.stuck for p in pubs)
            if now_left < left or stopping:
                self.notifier.extend_timeout(5.0)
            left = now_left
            await asyncio.sleep(2.0)

    async def _measure_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(1.0)
            self.loop_lag_ms = max(0, int((loop.time() - before - 1.0) * 1000))


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of `aws` finishes; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

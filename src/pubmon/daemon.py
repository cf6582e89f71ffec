"""`pubmon daemon`: the top TaskGroup and the order things start and stop in.

Start: take the config lock, install signal handlers (before anything can be signalled), open
the listeners (a live control socket means another daemon: refuse before spawning anything),
start the supervisor (which spawns autostart publishers), wait for the first round to settle,
tell systemd READY=1. Stop (first SIGTERM): STOPPING=1, stop the publishers dependents-first
under shutdown_timeout while the listeners still answer (status says STOPPING; mutating calls
are refused), then close the listeners. A second SIGTERM kills every group at once.
"""

from __future__ import annotations

__all__ = ["Daemon", "acquire_lock"]

import asyncio
import errno
import hashlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable

from .config import Config, ConfigDiff, load_config
from .errors import ConfigError, StartupError
from .lifecycle import Health, PublisherState
from .notify import Notifier
from .service import Listeners
from .signals import GRACEFUL, SignalQueue
from .supervisor import Supervisor

logger = logging.getLogger(__name__)

EXIT_OK = 0


def acquire_lock(path: str) -> socket.socket:
    """One daemon per config file: bind an abstract unix socket named after its real path.

    The kernel frees the name when the holder dies, however it dies; it needs no writable
    directory (under systemd /etc is read-only) and, unlike an flock on the file, an editor
    that replaces the file by a rename cannot defeat it. Keep the returned socket open.
    """
    real = os.path.realpath(path)
    name = "\0pubmon-lock:" + hashlib.sha256(real.encode()).hexdigest()[:40]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(name)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise StartupError(f"cannot take the lock for {real}: {exc}") from exc
        raise StartupError(
            f"another pubmon daemon is already running with {path} (it holds the lock for {real})"
        ) from None
    return sock


class Daemon:
    """One daemon run. `await Daemon(config).run()` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        *,
        signals: SignalQueue | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
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
        self.listeners: Listeners | None = None
        self._stop = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._status_cache = (-1, "")  # (supervisor.changed.fires, verdict)

    # --- requests (signals, RPC) --------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_reload(self) -> None:
        self._reload_wanted.set()

    async def reload(self) -> ConfigDiff:
        """Re-read the config file; on any error keep running the old one and raise ConfigError."""
        assert self.supervisor is not None
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
            if self.listeners is not None:  # access helper (issue 10 item 6): [control]/[monitor]
                await self.listeners.reconfigure(new)  # lines in listeners.last_changes
            diff = await self.supervisor.reload(new)
        except ConfigError as exc:
            self.reload_failures += 1
            self.last_reload_error = str(exc)
            logger.error("reload failed, still running the previous config: %s", exc)
            raise
        finally:
            self.notifier.ready(self.status_details())
        self.config = new
        self.reloads += 1
        self.last_reload_error = ""
        self.notifier.status(self.status_details())
        return diff

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
        return out

    # --- the run ------------------------------------------------------------------------------

    async def run(self) -> int:
        lock = acquire_lock(self.config.path)
        try:
            with self.signals:
                if os.environ.get("PUBMON_TEST_WEDGE") == "1":
                    # Test-only: SIGUSR2 blocks the event loop for good, as a deadlock would.
                    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, time.sleep, 1e6)
                await self._run()
        finally:
            lock.close()
            self.notifier.close()
        return EXIT_OK

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            background = [
                tg.create_task(self._dispatch_signals(), name="signals"),
                tg.create_task(self._reload_worker(), name="reloads"),
                tg.create_task(self._measure_loop_lag(), name="loop lag"),
                tg.create_task(self.notifier.watchdog(), name="watchdog"),
            ]
            listeners = Listeners(self, self.config)
            try:
                await listeners.start()
                self.listeners = listeners
                async with Supervisor(self.config) as sup:
                    self.supervisor = sup
                    logger.info("pubmon %d started with %s", os.getpid(), self.config.path)
                    await _first(sup.wait_settled(), self._stop.wait())
                    if not self.stopping:
                        self.ready.set()
                        self.notifier.ready(self.status_details())
                        logger.info("ready: %s", sup.summary())
                        background.append(tg.create_task(self._report_status(), name="status"))
                    await self._stop.wait()
                    for task in background:
                        if task.get_name() == "status":
                            task.cancel()  # from now on STATUS= says "stopping"
                    logger.info("stopping: %s", sup.summary())
                    self.notifier.stopping(f"stopping: {sup.summary()}")
                    background.append(tg.create_task(self._extend_stop_timeout(), name="extend"))
            finally:
                await listeners.close()
                for task in background:
                    task.cancel()
        logger.info("pubmon %d stopped", os.getpid())

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

    async def _reload_worker(self) -> None:
        # One reload at a time; a storm of SIGHUPs while one runs becomes one more reload.
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            if self.stopping or self.supervisor is None:
                continue
            try:
                await self.reload()
            except ConfigError:
                pass  # logged and counted; the old config keeps running

    async def _report_status(self) -> None:
        # STATUS= follows the publishers, at most five times a second.
        assert self.supervisor is not None
        while True:
            await self.supervisor.changed.wait()
            self.notifier.status(self.status_details())
            await asyncio.sleep(0.2)

    async def _extend_stop_timeout(self) -> None:
        # While publishers are still stopping within their own stop_timeout, or the number
        # still running keeps falling, ask systemd for more time; a stuck stop gets none.
        assert self.supervisor is not None
        pubs = list(self.supervisor.publishers.values())
        left = len(pubs) + 1
        while True:
            now_left = sum(not p.halted() for p in pubs)
            stopping = any(p.state == PublisherState.STOPPING for p in pubs)
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

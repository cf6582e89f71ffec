"""sd_notify without libsystemd: READY, RELOADING, STOPPING, STATUS, EXTEND_TIMEOUT, WATCHDOG.

Everything is a no-op unless systemd set NOTIFY_SOCKET. Once STOPPING=1 is out, READY=1 and
RELOADING=1 are never sent again (a reload still finishing must not tell systemd "ready" to a
unit that is deactivating): only STATUS=, EXTEND_TIMEOUT_USEC= and WATCHDOG=1.
Sends are non-blocking datagrams: a full queue drops the message rather than stall the loop.
The watchdog is pinged from a task on the event loop, never a thread, so a wedged loop stops
the pings and systemd kills the daemon.
"""

from __future__ import annotations

__all__ = ["Notifier"]

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Talks to the service manager named by `env` (os.environ by default)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if path.startswith("@"):
            self._address = b"\0" + path[1:].encode()  # abstract namespace
        elif path.startswith("/"):
            self._address = path
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if self._sock is not None and usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_interval = int(usec) / 2e6
            except ValueError:
                logger.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        self._last_status = ""
        self.stopping_sent = False

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except (BlockingIOError, OSError) as exc:
            logger.debug("sd_notify %s failed: %s", fields, exc)
            return False
        return True

    def ready(self, status: str) -> None:
        if self.stopping_sent:
            return
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd wants MONOTONIC_USEC in the same datagram as RELOADING=1.
        if self.stopping_sent:
            return
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}", "STATUS=reloading")

    def stopping(self, status: str = "stopping") -> None:
        self.stopping_sent = True
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2 for ever; returns at once when not asked to."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

"""Health probes: ask a running publisher whether it is healthy.

A probe answers one question per call, `check()`, with a Health. It never raises: a refused
connection, a timeout or a bad answer is UNHEALTHY, with the reason kept in `last_error`.
The publisher's runner decides what failures mean (thresholds, start_timeout).
"""

from __future__ import annotations

__all__ = ["ExecProbe", "Probe", "TcpProbe", "make_probe"]

import asyncio
import logging
from typing import Protocol

from .config import ProbeSpec, PublisherSpec
from .lifecycle import Health

logger = logging.getLogger(__name__)


class Probe(Protocol):
    last_error: str
    details: str

    async def check(self) -> Health: ...
    async def close(self) -> None: ...


class TcpProbe:
    """Healthy when a TCP connection to host:port succeeds within the timeout."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.last_error = ""
        self.details = ""

    async def check(self) -> Health:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self.last_error = f"connect {self.host}:{self.port}: {exc or 'timed out'}"
            return Health.UNHEALTHY
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return Health.HEALTHY

    async def close(self) -> None:
        pass


class ExecProbe:
    """Healthy when the command exits 0 within the timeout (killed otherwise)."""

    def __init__(self, argv: tuple[str, ...], timeout: float) -> None:
        self.argv, self.timeout = argv, timeout
        self.last_error = ""
        self.details = ""

    async def check(self) -> Health:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                process_group=0,
            )
        except OSError as exc:
            self.last_error = f"{self.argv[0]}: {exc.strerror or exc}"
            return Health.UNHEALTHY
        try:
            async with asyncio.timeout(self.timeout):
                code = await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.last_error = f"{self.argv[0]} timed out after {self.timeout:g} s"
            return Health.UNHEALTHY
        if code != 0:
            self.last_error = f"{self.argv[0]} exited {code}"
            return Health.UNHEALTHY
        return Health.HEALTHY

    async def close(self) -> None:
        pass


def make_probe(spec: PublisherSpec) -> Probe | None:
    """The probe for a publisher, or None for kind "none"."""
    p: ProbeSpec = spec.probe
    port = p.port  # config resolved it: the probe's own port, or the instance's
    if p.kind == "none":
        return None
    if p.kind == "tcp":
        assert port is not None, "config guarantees a port"
        return TcpProbe(p.host, port, p.timeout)
    if p.kind == "exec":
        return ExecProbe(p.command, p.timeout)
    raise NotImplementedError("fb303 probes")

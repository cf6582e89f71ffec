"""Shared by the Thrift tests (codec, server, clients): the service, two publishers' info, a
handler of a few PubmonService methods, a server on loopback that runs it, and `plain` to compare
thriftpy2's values with decoded ones."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pubmon.errors import PermissionDenied
from pubmon.thrift import idl
from pubmon.thrift.codec import Struct
from pubmon.thrift.server import ThriftClient, ThriftServer

pm = idl.pubmon()
SVC = pm.PubmonService

INFO_A = pm.PublisherInfo(
    name="feed:0", program="feed", state="RUNNING", pid=4242, health="HEALTHY", restarts=2,
    lastExit=-9, lastExitReason="killed by SIGKILL", uptime=12.5, port=9101, statusDetails="ok ✓",
)  # fmt: skip
INFO_B = pm.PublisherInfo(
    name="idle", program="sleep", state="STOPPED", pid=0, health="UNKNOWN", restarts=0,
    lastExitReason="", uptime=0.0, port=0, statusDetails="",
)  # fmt: skip


class Handler:
    """A few PubmonService methods, plain and async; getVersion is deliberately missing."""

    def __init__(self) -> None:
        self.options: dict[str, str] = {}
        self.shutdown_called = asyncio.Event()
        self.reinitialized = asyncio.Event()
        self.profile_started = asyncio.Event()
        self.profile_cancelled = asyncio.Event()

    def getStatus(self) -> int:
        return idl.FbStatus.ALIVE

    async def getName(self) -> str:
        return "pubmon-test"

    def getCounters(self) -> dict[str, int]:
        return {"rpc.calls": 3, "big": 2**40, "negative": -1}

    def getOptions(self) -> dict[str, str]:
        return {"ü": "ñ", "empty": ""}

    async def listPublishers(self) -> list[Any]:
        return [INFO_A, INFO_B]

    async def getPublisher(self, name: str) -> Any:
        if name == INFO_A.name:
            return INFO_A
        raise pm.UnknownPublisher(message=f"no publisher named {name!r}")

    async def startPublisher(self, name: str, noWait: bool | None = None) -> Any:
        return INFO_A

    async def reloadConfig(self, noWait: bool | None = None) -> Any:
        return pm.ReloadResult(added=["new"], removed=[], changed=["feed:0"], unchanged=["idle"])

    def tailLog(self, name: str, after: int, max_lines: int) -> Any:
        lines = [
            pm.LogLine(seq=after + 1 + i, time=1.5 + i, stream="stdout", text=f"line {i} ☃",
                       partial=i == 1)
            for i in range(max_lines)
        ]  # fmt: skip
        return pm.LogChunk(lines=lines, nextSeq=after + max_lines, missed=7)

    async def setOption(self, key: str, value: str) -> None:
        self.options[key] = value

    def getOption(self, key: str) -> str:
        raise RuntimeError("boom")  # undeclared

    async def getCpuProfile(self, seconds: int) -> str:
        self.profile_started.set()
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.profile_cancelled.set()
            raise
        return "profile"

    def shutdown(self) -> None:
        self.shutdown_called.set()

    async def reinitialize(self) -> None:
        self.reinitialized.set()

    def reopenLogs(self) -> None:
        raise PermissionDenied("the handler says no")


@contextlib.asynccontextmanager
async def serving(handler: object | None = None, **kw: Any) -> AsyncIterator[tuple[Any, int]]:
    server = ThriftServer(SVC, handler or Handler(), name="test", **kw)
    try:
        port = await server.start_tcp("127.0.0.1", 0)
        assert server.ready.is_set()
        yield server, port
    finally:
        await server.close()


async def connect(port: int, service: Any = SVC, **kw: Any) -> ThriftClient:
    return await ThriftClient.connect(service, host="127.0.0.1", port=port, **kw)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the server has closed the connection (EOF or reset) within timeout."""
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return True


def plain(value: Any) -> Any:
    """A thriftpy2 value or a decoded one, as dicts and lists, to compare the two."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "thrift_spec"):
        return {f[1]: plain(getattr(value, f[1])) for f in value.thrift_spec.values()}
    if isinstance(value, Struct):
        return {k: plain(v) for k, v in vars(value).items()}
    return value

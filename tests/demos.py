"""A demo publisher (pubmon.demo) for tests to talk to: served in this process, or reached over
Thrift on its port."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from pubmon.demo import Demo
from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient, ThriftServer

SVC = idl.publisher().PublisherService


@asynccontextmanager
async def client(
    port: int, transport: Literal["framed", "buffered"] = "framed"
) -> AsyncIterator[ThriftClient]:
    c = await ThriftClient.connect(
        SVC, host="127.0.0.1", port=port, timeout=2.0, transport=transport
    )
    try:
        yield c
    finally:
        await c.close()


@asynccontextmanager
async def in_process_demo(
    demo: Demo | None = None, **server_kw: Any
) -> AsyncIterator[tuple[Demo, ThriftServer, int]]:
    """A Demo handler served in this process by ThriftServer on a free port."""
    demo = demo or Demo("inproc", out=io.StringIO())
    server = ThriftServer(SVC, demo, name="inproc", **server_kw)
    port = await server.start_tcp("127.0.0.1", 0)
    try:
        yield demo, server, port
    finally:
        await server.close()


async def option_is(port: int, key: str, want: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout), client(port) as c:
        while await c.call("getOption", key) != want:
            await asyncio.sleep(0.02)

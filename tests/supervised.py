"""A Supervisor run in-process for tests, and waits on its publishers: each wait is for a state,
a predicate or output lines under a timeout, never a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from children import config
from pubmon.config.model import PublisherSpec
from pubmon.core.lifecycle import PublisherState
from pubmon.core.publisher import Publisher
from pubmon.core.supervisor import Supervisor


@asynccontextmanager
async def running(*specs: PublisherSpec, log_dir: Path | None = None) -> AsyncIterator[Supervisor]:
    async with Supervisor(config(*specs, log_dir=str(log_dir) if log_dir else None)) as sup:
        yield sup


async def until(pub: Publisher, predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        await pub.wait_until(predicate)


async def lines_seen(pub: Publisher, n: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while pub.output.last_seq < n:
            await pub.output.wait_beyond(pub.output.last_seq)


async def in_state(pub: Publisher, *states: PublisherState, timeout: float = 10) -> None:
    await until(pub, lambda: pub.state in states, timeout)

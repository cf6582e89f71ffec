"""A Supervisor run in-process for tests, set up as the daemon sets it up, and waits on its
publishers: each wait is for a state, a predicate or output lines under a timeout, never a sleep.

The daemon makes its process a child subreaper, installs the pidfd child watcher and runs the
orphan reaper (pubmon.daemon.reaping), and gives the Supervisor that reaper; a Supervisor alone
does none of it (tests/test_embedding.py). The core's tests run it the daemon's way, so orphans
are reaped and strays killed at the end as in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from children import config
from pubmon.config.model import Config, PublisherSpec
from pubmon.core.lifecycle import PublisherState
from pubmon.core.publisher import Publisher
from pubmon.core.supervisor import Supervisor
from pubmon.daemon.reaping import reaping


@asynccontextmanager
async def supervising(config: Config, **kw: Any) -> AsyncIterator[Supervisor]:
    """`async with Supervisor(config, **kw)`, inside the daemon's process-wide set-up."""
    async with reaping() as reaper, Supervisor(config, reaper=reaper, **kw) as sup:
        yield sup


@asynccontextmanager
async def running(*specs: PublisherSpec, log_dir: Path | None = None) -> AsyncIterator[Supervisor]:
    async with supervising(config(*specs, log_dir=str(log_dir) if log_dir else None)) as sup:
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

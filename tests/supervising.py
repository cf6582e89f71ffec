"""A Supervisor set up as the daemon sets it up, for the tests of the supervision core.

The daemon makes its process a child subreaper, installs the pidfd child watcher and runs the
orphan reaper (pubmon.daemon.reaping), and gives the Supervisor that reaper; a Supervisor alone
does none of it (tests/test_embedding.py). The core's tests run it the daemon's way, so orphans
are reaped and strays killed at the end as in production.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pubmon.config.model import Config
from pubmon.core.supervisor import Supervisor
from pubmon.daemon.reaping import reaping


@asynccontextmanager
async def supervising(config: Config, **kw: Any) -> AsyncIterator[Supervisor]:
    """`async with Supervisor(config, **kw)`, inside the daemon's process-wide set-up."""
    async with reaping() as reaper, Supervisor(config, reaper=reaper, **kw) as sup:
        yield sup

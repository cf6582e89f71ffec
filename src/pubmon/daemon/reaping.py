"""The daemon makes its process the reaper of its descendants; a Supervisor never does.

What `reaping()` sets up is process-wide, so it belongs to the program, not to the library class
(pubmon.core.supervisor) that another program may embed:
- PR_SET_CHILD_SUBREAPER: an orphaned grandchild (a publisher that daemonizes, an escapee of
  its group) is re-parented to us instead of PID 1, so that it is seen, reaped, and at the end
  killed;
- asyncio's pidfd child watcher for the loop (3.11 defaults to a thread per child);
- the orphan reaper (pubmon.core.reaper), which reaps by pid what asyncio does not own: the
  Supervisor is given it (its spawns tell it which pids asyncio owns), and when the block ends
  (the publishers stopped) what is left among our children is an orphan that escaped its group:
  it is SIGKILLed and reaped.

An embedded Supervisor, without this, spawns and stops its publishers the same way and touches
nothing else: the program's own children, their exit statuses and its child watcher stay its
own (tests/test_embedding.py).
"""

from __future__ import annotations

__all__ = ["reaping"]

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pubmon.core.process import become_subreaper, install_child_watcher
from pubmon.core.reaper import OrphanReaper

logger = logging.getLogger(__name__)


@asynccontextmanager
async def reaping(reaper: OrphanReaper | None = None) -> AsyncIterator[OrphanReaper]:
    """Make this process a child subreaper using the pidfd child watcher, and run `reaper` (a
    new one if None) on the running loop for the block; give it to the Supervisor."""
    reaper = reaper if reaper is not None else OrphanReaper()
    install_child_watcher()
    become_subreaper()
    reaper.install(asyncio.get_running_loop())
    try:
        yield reaper
    finally:
        try:
            _final_sweep(reaper)
        finally:
            reaper.uninstall()


def _final_sweep(reaper: OrphanReaper) -> None:
    # Anything left among our children now is an orphaned grandchild that escaped its group
    # (setsid): it is ours to end, and its zombie ours to reap.
    strays = reaper.kill_strays()
    if strays:
        logger.warning("killed %d stray descendant(s) at shutdown: %s", len(strays), strays)
    for pid in strays:
        try:
            os.waitpid(pid, 0)  # SIGKILL'd: a zombie within microseconds
        except ChildProcessError:
            pass
    reaper.sweep()

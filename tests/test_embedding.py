"""A Supervisor embedded in another program leaves the program's process alone.

The daemon makes its process a child subreaper, swaps asyncio's child watcher and reaps (and at
the end kills) children it did not spawn (pubmon.daemon.reaping); a Supervisor on its own does
none of that, so the embedding program keeps its own children and their exit statuses.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import warnings
from collections.abc import Iterator

import pytest

from children import config, spec
from pubmon.core.lifecycle import PublisherState
from pubmon.core.supervisor import Supervisor

S = PublisherState
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_libc = ctypes.CDLL(None, use_errno=True)


def _subreaper() -> int:
    flag = ctypes.c_int(-1)
    assert _libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0
    return flag.value


def _set_subreaper(value: int) -> None:
    assert _libc.prctl(_PR_SET_CHILD_SUBREAPER, value, 0, 0, 0) == 0


def _child_watcher() -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy().get_child_watcher()


@pytest.fixture
def not_a_subreaper() -> Iterator[None]:
    """The test process as an ordinary program (conftest makes pytest a subreaper)."""
    before = _subreaper()
    _set_subreaper(0)
    try:
        yield
    finally:
        _set_subreaper(before)


@pytest.mark.usefixtures("not_a_subreaper")
async def test_an_embedded_supervisor_leaves_subreaper_watcher_and_foreign_children_alone() -> None:
    watcher = _child_watcher()
    # The program's own children: one already exited (a zombie until the program waits for
    # it), one still running when the Supervisor ends.
    exited = subprocess.Popen(["sh", "-c", "exit 7"])
    running = subprocess.Popen(["sh", "-c", "read line; exit 5"], stdin=subprocess.PIPE)
    try:
        # Wait for the exit without reaping it (WNOWAIT): the status stays the program's.
        os.waitid(os.P_PID, exited.pid, os.WEXITED | os.WNOWAIT)
        async with Supervisor(config(spec("a"))) as sup:
            pub = sup.get("a")
            async with asyncio.timeout(10):
                await pub.wait_until(lambda: pub.state == S.RUNNING)
            assert _subreaper() == 0
            assert _child_watcher() is watcher
            # A publisher's exit is when a reaper would sweep for orphans.
            await sup.stop("a")
            assert pub.last_exit == -signal.SIGTERM  # its own status reached asyncio
        # Leaving the block is when a reaper would kill strays and reap zombies.
        assert _subreaper() == 0
        assert _child_watcher() is watcher
        assert running.poll() is None, "the program's running child was killed"
        assert running.stdin is not None
        running.stdin.close()
        assert running.wait(timeout=10) == 5
        assert exited.wait(timeout=10) == 7  # 0 if something else had reaped it
    finally:
        for proc in (exited, running):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

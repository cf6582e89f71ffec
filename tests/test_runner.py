"""A publisher's runner (pubmon.core.runner) carrying out a stop: the stop signal with SIGCONT,
so that a SIGSTOPped child can act on it, and SIGKILL once stop_timeout has passed, not before."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from children import IGNORE_TERM, SLEEP, config, spec
from procs import state
from pubmon.core.lifecycle import PublisherState
from supervised import in_state, lines_seen, running, supervising

S = PublisherState


async def test_ignoring_sigterm_is_killed_after_stop_timeout_not_before() -> None:
    stubborn = spec("stubborn", IGNORE_TERM, stop_timeout=0.6)
    async with running(stubborn) as sup:
        pub = sup.get("stubborn")
        await in_state(pub, S.RUNNING)
        await lines_seen(pub, 1)  # SIGTERM is now ignored
        t0 = time.monotonic()
        await sup.stop("stubborn")
        took = time.monotonic() - t0
        assert pub.last_exit == -signal.SIGKILL
        assert 0.6 <= took < 0.6 + 10  # not before stop_timeout, not much after


async def test_stopping_a_sigstopped_publisher_delivers_the_stop_signal() -> None:
    # A stop continues the group after the stop signal, as systemd does: else the signal sits
    # pending in the stopped process for all of stop_timeout and SIGKILL (exit -9) ends it with
    # no chance to clean up. Found by the chaos run (a SIGSTOPped demo publisher failed its probes).
    async with supervising(config(spec("frozen", SLEEP, stop_timeout=5.0))) as sup:
        pub = sup.get("frozen")
        async with asyncio.timeout(5):
            await pub.wait_until(lambda: pub.state == S.RUNNING)
        pid = pub.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        async with asyncio.timeout(5):
            while state(pid) != "T":
                await asyncio.sleep(0.01)
        t0 = time.monotonic()
        snap = await sup.stop("frozen")
        assert time.monotonic() - t0 < 2.0  # not the 5 s stop_timeout
        assert snap.state == S.STOPPED
        assert snap.last_exit == -signal.SIGTERM

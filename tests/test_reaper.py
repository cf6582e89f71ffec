"""The orphan reaper (pubmon.core.reaper): grandchildren re-parented to the supervisor are
reaped or killed, and never an exit status that asyncio is waiting for."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from children import ORPHANER, SLEEP, config, spec
from procs import alive, children, state
from pubmon.core.lifecycle import PublisherState
from pubmon.core.reaper import OrphanReaper
from supervised import in_state, lines_seen, running, supervising

S = PublisherState


async def test_orphaned_grandchild_is_killed_with_its_group_and_reaped() -> None:
    async with running(spec("orphaner", ORPHANER, restart="never")) as sup:
        pub = sup.get("orphaner")
        await in_state(pub, S.EXITED)
        grandchild = int(pub.output.last(1).lines[0].text)
        # The leader exited; the rest of its group was killed and the orphan (re-parented to us,
        # the subreaper) reaped: neither alive nor a zombie.
        async with asyncio.timeout(5):
            while state(grandchild) is not None:
                await asyncio.sleep(0.01)
        assert grandchild not in children(os.getpid())


async def test_a_grandchild_orphaned_while_its_publisher_runs_is_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The publisher's own child exits and leaves its child (a grandchild of ours) re-parented
    # to us, the subreaper, while the publisher keeps running: no exit of ours says "sweep".
    # The periodic sweep reaps it when it ends (its quiet period shortened for the test).
    monkeypatch.setattr(OrphanReaper, "QUIET_PERIOD", 0.2)
    script = "sh -c 'sleep 0.3 & echo $!'; exec sleep 3600"
    async with running(spec("parent", ("sh", "-c", script))) as sup:
        pub = sup.get("parent")
        await lines_seen(pub, 1)
        orphan = int(pub.output.last(1).lines[0].text)
        async with asyncio.timeout(10):
            while state(orphan) is not None:  # alive, then a zombie, then reaped
                await asyncio.sleep(0.02)
        assert pub.state == S.RUNNING and orphan not in children(os.getpid())


async def test_escaped_grandchild_is_killed_at_shutdown() -> None:
    # setsid puts the grandchild out of reach of killpg; shutdown still ends it.
    escaper = spec("escaper", ("sh", "-c", "setsid sleep 3600 & echo started; exec sleep 3600"))
    async with running(escaper) as sup:
        pub = sup.get("escaper")
        await lines_seen(pub, 1)
        leader = pub.pid
    assert leader is not None
    leftovers = [p for p in children(os.getpid()) if alive(p)]
    assert leftovers == []


async def test_instant_exits_keep_their_status_while_spawns_overlap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The orphan reaper's deferred sweep never reaps a child spawned but not tracked yet: when
    # it did, asyncio reported "exit status already read" and returncode 255.
    specs = [spec(f"e{i}", ("sh", "-c", "exit 3"), restart="never") for i in range(40)]
    async with running(*specs) as sup:
        for pub in sup.publishers.values():
            await in_state(pub, S.EXITED)
        assert {p.last_exit for p in sup.publishers.values()} == {3}
    assert "already read" not in caplog.text


async def test_an_operators_signal_gets_through_hundreds_of_exits_at_once() -> None:
    # Child exits do not signal the loop. When every exit raised SIGCHLD and the orphan reaper
    # handled it through the loop's signal wakeup socket, a few hundred one-byte writes filled
    # that socket; past that, signal numbers were dropped (an operator's second SIGTERM among
    # them), and CPython 3.11 once spun for ever reporting the overflow. Found by profiling a
    # stop of 1000 publishers.
    n = 400
    specs = [spec(f"p{i:03d}", SLEEP, start_timeout=0.0, restart="never") for i in range(n)]
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    async with supervising(config(*specs)) as sup:
        await sup.wait_settled()
        pids = [p.pid for p in sup.publishers.values()]
        assert all(pids)

        def all_die_then_a_signal() -> None:
            # While the loop is busy (one long pass), the children die one after the other
            # (each SIGCHLD delivered before the next death: pending signals do not pile up),
            # then USR1 comes.
            for pid in pids:
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                while state(pid) not in ("Z", None):
                    time.sleep(0.0002)
            os.kill(os.getpid(), signal.SIGUSR1)

        loop.add_signal_handler(signal.SIGUSR1, got.set)
        try:
            loop.call_soon(all_die_then_a_signal)
            async with asyncio.timeout(5):
                await got.wait()
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
        async with asyncio.timeout(10):
            for pub in sup.publishers.values():
                await pub.wait_until(lambda p=pub: p.state == S.EXITED)  # type: ignore[misc]

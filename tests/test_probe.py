"""Probes (fb303, tcp, exec), in-process and under a real Supervisor.

The supervised children are real demo publishers (`python -m pubmon.demo`). Every wait is for a
state, an event or a counter under asyncio.timeout; probe rounds are counted by the demo's own
`demo.status_calls` counter, read over Thrift. No sleep stands in for synchronisation.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from children import SLEEP, py, spec
from demos import client, in_process_demo, option_is
from procs import alive
from pubmon.config.model import ProbeSpec, PublisherSpec
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.probe import ExecProbe, Fb303Probe, TcpProbe, _by, make_probe
from pubmon.core.publisher import Publisher
from pubmon.demo import free_ports
from pubmon.errors import RpcError
from pubmon.thrift.idl import FbStatus
from supervised import running, until

S = PublisherState
DEMO = (sys.executable, "-m", "pubmon.demo")
INTERVAL, TIMEOUT, THRESHOLD, STOP_TIMEOUT = 0.2, 0.2, 3, 1.0
FAST_FB303 = ProbeSpec(
    kind="fb303", interval=INTERVAL, timeout=TIMEOUT, failure_threshold=THRESHOLD
)
URL = "tcp://upstream.test:1234"


# --- helpers ----------------------------------------------------------------------------------


def demo_spec(
    name: str, port: int, *extra: str, probe: ProbeSpec = FAST_FB303, **kw: object
) -> PublisherSpec:
    """A demo publisher probed with fb303 on its port: fast probes, stop_timeout 1 s."""
    kw.setdefault("start_timeout", 5.0)
    kw.setdefault("stop_timeout", STOP_TIMEOUT)
    command = (*DEMO, f"--pub_port={port}", f"--name={name}", *extra)
    return spec(name, command, port=port, probe=replace(probe, port=port), **kw)


async def tell(port: int, key: str, value: str) -> None:
    async with client(port) as c:
        await c.call("setOption", key, value)


async def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a value that changes without notice (details refreshed by probe rounds)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def running_again(pub: Publisher, old: int | None, timeout: float = 10) -> None:
    """Until a new process (not `old`) is RUNNING."""
    await until(pub, lambda: pub.state == S.RUNNING and pub.pid not in (None, old), timeout)


async def counter_reaches(port: int, key: str, n: int, timeout: float = 10) -> int:
    """Poll the demo's counter over Thrift until it is >= n; returns it."""
    async with asyncio.timeout(timeout), client(port) as c:
        while True:
            value = await c.call("getCounter", key)
            assert isinstance(value, int)
            if value >= n:
                return value
            await asyncio.sleep(0.02)


def output_of(pub: Publisher) -> list[str]:
    return [line.text for line in pub.output.last(500).lines]


# --- fb303 under a Supervisor: the "must be true" -------------------------------------


async def test_hung_demo_is_detected_and_restarted_within_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pubmon.core.publisher")
    (port,) = free_ports(1)
    async with running(demo_spec("hangs", port)) as sup:
        pub = sup.get("hangs")
        await running_again(pub, None)
        old = pub.pid
        await tell(port, "hang", "1")
        t0, wall0 = time.monotonic(), time.time()
        await until(pub, lambda: len(pub.start_times) >= 2)
        respawned = pub.start_times[-1] - t0
        # A wedged loop does not act on SIGTERM: it took the SIGKILL after stop_timeout.
        assert pub.last_exit == -signal.SIGKILL
        await running_again(pub, old)
        healthy_again = time.monotonic() - t0
        assert pub.probe_failures >= THRESHOLD and pub.restarts == 1
    (verdict,) = [r for r in caplog.records if "is unhealthy" in r.getMessage()]
    detected = verdict.created - wall0
    bound = INTERVAL * THRESHOLD + TIMEOUT + STOP_TIMEOUT
    print(
        f"hang: judged unhealthy after {detected:.3f} s, respawned after {respawned:.3f} s, "
        f"RUNNING again after {healthy_again:.3f} s (bound {bound:g} s + 1 s margin)"
    )
    assert f"probe failed {THRESHOLD}/{THRESHOLD}: " in verdict.getMessage()
    assert respawned <= bound + 1.0, (respawned, bound)
    assert old is not None and not alive(old)


async def test_warning_is_degraded_and_never_restarted() -> None:
    (port,) = free_ports(1)
    async with running(demo_spec("warns", port)) as sup:
        pub = sup.get("warns")
        await running_again(pub, None)
        await until(pub, lambda: pub.health == Health.HEALTHY)
        pid = pub.pid
        await tell(port, "status", "WARNING")
        await until(pub, lambda: pub.health == Health.DEGRADED)
        async with client(port) as c:
            seen = await c.call("getCounter", "demo.status_calls")
        assert isinstance(seen, int)
        # Twice the threshold in probe rounds, all answered WARNING.
        await counter_reaches(port, "demo.status_calls", seen + 2 * THRESHOLD)
        await until(pub, lambda: pub.health == Health.DEGRADED)
        assert (pub.pid, pub.state, pub.restarts) == (pid, S.RUNNING, 0)
        assert "WARNING: set by setOption" in pub.details
        await tell(port, "status", "ALIVE")
        await until(pub, lambda: pub.health == Health.HEALTHY)
        assert pub.pid == pid


async def test_dead_is_restarted() -> None:
    (port,) = free_ports(1)
    async with running(demo_spec("dies", port)) as sup:
        pub = sup.get("dies")
        await running_again(pub, None)
        old = pub.pid
        t0 = time.monotonic()
        await tell(port, "status", "DEAD")
        await running_again(pub, old)
        print(f"DEAD: RUNNING again after {time.monotonic() - t0:.3f} s")
        assert pub.restarts == 1
        assert pub.last_exit == 0  # stopped with SIGTERM, which the demo honours at once
        async with client(port) as c:
            assert await c.call("getStatus") == FbStatus.ALIVE  # a fresh process


async def test_data_source_reaches_the_publisher_after_each_restart() -> None:
    (port,) = free_ports(1)
    async with running(demo_spec("fed", port, data_source=URL)) as sup:
        pub = sup.get("fed")
        # crash=now exits with status 3; crash=TERM dies by SIGTERM (not the graceful exit 0).
        for round_, (how, exit_status) in enumerate(
            [("now", 3), ("TERM", -signal.SIGTERM), (None, 0)]
        ):
            await running_again(pub, None)
            await option_is(port, "data_source", URL)
            await eventually(lambda: pub.details == f"ALIVE: publishing from {URL}")
            async with client(port) as c:
                assert await c.call("getCounter", "demo.start_publishers_calls") == 1
            texts = output_of(pub)
            assert texts.count(f"startPublishers {URL}") == round_ + 1
            if how is None:
                break
            old = pub.pid
            await tell(port, "crash", how)
            await running_again(pub, old)
            assert pub.last_exit == exit_status
        assert pub.restarts == 2


async def test_starting_is_tolerated_until_start_timeout() -> None:
    (port,) = free_ports(1)
    async with running(demo_spec("slow", port, "--startup_delay=0.6", start_timeout=3)) as sup:
        pub = sup.get("slow")
        await running_again(pub, None)
        assert time.monotonic() - pub.start_times[0] >= 0.6
        assert pub.restarts == 0 and pub.health == Health.HEALTHY


async def test_starting_past_start_timeout_is_killed_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pubmon.core.publisher")
    (port,) = free_ports(1)
    # start_timeout leaves a loaded machine time to start the demo's interpreter and listen:
    # a run that ends before it listens says "cannot connect", not what this test pins.
    async with running(demo_spec("stuck", port, "--startup_delay=60", start_timeout=2.0)) as sup:
        pub = sup.get("stuck")
        await until(pub, lambda: len(pub.start_times) >= 2)
        assert pub.restarts >= 1 and pub.state in (S.STARTING, S.BACKOFF)
    why = [r.getMessage() for r in caplog.records if "is unhealthy" in r.getMessage()]
    pinned = "not healthy within start_timeout 2 s: child reports STARTING"
    assert any(pinned in w for w in why), why


async def test_buffered_transport_and_spew() -> None:
    (port,) = free_ports(1)
    probe = replace(FAST_FB303, transport="buffered")
    async with running(demo_spec("buf", port, "--transport=buffered", probe=probe)) as sup:
        pub = sup.get("buf")
        await running_again(pub, None)
        await until(pub, lambda: pub.health == Health.HEALTHY)
        async with client(port, "buffered") as c:
            await c.call("setOption", "spew", "5000")
        async with asyncio.timeout(10):
            while "spew 5000/5000" not in output_of(pub):
                await pub.output.wait_beyond(pub.output.last_seq)
        texts = output_of(pub)
        spewed = [t for t in texts if t.startswith("spew ")]
        assert spewed[-3:] == ["spew 4998/5000", "spew 4999/5000", "spew 5000/5000"]
        snap = await sup.stop("buf")
    assert snap.state == S.STOPPED and pub.last_exit == 0  # SIGTERM: a prompt, clean exit


# --- Fb303Probe against an in-process demo -----------------------------------------------------


async def test_fb303_probe_verdicts_cost_and_one_connection() -> None:
    async with in_process_demo() as (demo, server, port):
        probe = Fb303Probe("127.0.0.1", port, 1.0)
        try:
            assert await probe.check() == Health.HEALTHY
            assert probe.calls == 2  # new status: getStatus + getStatusDetails
            assert probe.details.startswith("ALIVE: ")
            assert await probe.check() == Health.HEALTHY
            assert probe.calls == 3  # steady ALIVE: one call per round
            demo.options["status"] = "WARNING"
            for _ in range(2):
                assert await probe.check() == Health.DEGRADED
            assert probe.calls == 7  # degraded: details every round
            assert probe.details.startswith("WARNING: set by setOption")
            for status in ("STARTING", "DEAD", "STOPPING", "STOPPED"):
                demo.options["status"] = status
                assert await probe.check() == Health.UNHEALTHY
                assert probe.last_error.startswith(f"child reports {status}: {status}: ")
            demo.options["status"] = "ALIVE"
            assert await probe.check() == Health.HEALTHY
            assert probe.last_error == ""
            assert server.connections_total == 1  # one persistent connection throughout
        finally:
            await probe.close()
        assert probe.status == FbStatus.ALIVE


async def test_fb303_probe_reconnects_after_the_child_closes_it_idle() -> None:
    async with in_process_demo(idle_timeout=0.05) as (_, server, port):
        probe = Fb303Probe("127.0.0.1", port, 1.0)
        try:
            assert await probe.check() == Health.HEALTHY
            async with asyncio.timeout(5):
                while server.connections:  # the server closes our idle connection
                    await asyncio.sleep(0.01)
            assert await probe.check() == Health.HEALTHY  # no failure for a stale connection
            assert server.connections_total == 2
        finally:
            await probe.close()


async def test_fb303_probe_failures_name_the_cause() -> None:
    (closed,) = free_ports(1)
    probe = Fb303Probe("127.0.0.1", closed, 0.5)
    assert await probe.check() == Health.UNHEALTHY
    assert "cannot connect to 127.0.0.1:" in probe.last_error
    await probe.close()

    # A server that accepts and never answers: UNHEALTHY within the timeout, not later.
    conns: list[asyncio.StreamWriter] = []

    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)

    silent = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    probe = Fb303Probe("127.0.0.1", port, 0.2)
    try:
        t0 = time.monotonic()
        assert await probe.check() == Health.UNHEALTHY
        took = time.monotonic() - t0
        assert 0.2 <= took < 5, took  # the timeout, not some much later give-up
        assert "no reply within 0.2 s" in probe.last_error or "no answer" in probe.last_error
    finally:
        await probe.close()
        for w in conns:
            w.close()
        silent.close()
        await silent.wait_closed()

    # The wrong transport: a buffered probe of a framed child.
    async with in_process_demo() as (_, _, port):
        probe = Fb303Probe("127.0.0.1", port, 0.3, "buffered")
        try:
            assert await probe.check() == Health.UNHEALTHY
        finally:
            await probe.close()


async def test_a_stall_of_our_own_loop_does_not_fail_the_probe_of_a_child_that_answered() -> None:
    # The daemon's loop stalls now and then (a spawn under load waits for the child's exec: up
    # to ~1 s measured). When a stall outlasts the probe's timeout with a getStatus in flight,
    # the timer and the child's answer are read in the same loop turn: the answer must win.
    # Found by the chaos soak: healthy demo publishers were judged unhealthy and killed.
    (port,) = free_ports(1)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon.demo", f"--pub_port={port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    probe = Fb303Probe("127.0.0.1", port, timeout=0.3)
    try:
        async with asyncio.timeout(20):
            while await probe.check() != Health.HEALTHY:
                await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for _ in range(3):
            # Block our loop for twice the timeout just after the request goes out.
            loop.call_soon(time.sleep, 0.6)
            assert await probe.check() == Health.HEALTHY, probe.last_error
        # A child that really is wedged still fails within the timeout (plus a short grace).
        child.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert await probe.check() == Health.UNHEALTHY
        assert time.monotonic() - t0 < 5  # gave up at its timeout, did not hang
        assert "no answer within 0.3 s" in probe.last_error
    finally:
        await probe.close()
        child.kill()
        await child.wait()


async def test_a_probe_call_that_fails_as_its_check_is_cancelled_is_not_reported_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A getStatus whose connect is refused in the same loop turn as its check is cancelled (the
    # child has just died and the runner stops watching it) must not be logged as "Task
    # exception was never retrieved". Found by the chaos run.
    async def refused() -> None:
        raise RpcError("cannot connect")

    check = asyncio.ensure_future(_by(asyncio.get_running_loop().time() + 5, refused()))
    await asyncio.sleep(0)  # the check started its call, which has not run yet
    check.cancel()  # the call fails, then the check is cancelled: both in the next turn
    with pytest.raises(asyncio.CancelledError):
        await check
    del check
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_fb303_probe_start_publishers_success_and_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with in_process_demo() as (demo, _, port):
        probe = Fb303Probe("127.0.0.1", port, 1.0, data_source=URL, name="fed probe")
        try:
            assert await probe.check() == Health.HEALTHY
            await probe.on_first_healthy()
            assert demo.options["data_source"] == URL and demo.start_publishers_calls == 1
            assert await probe.check() == Health.HEALTHY
            assert probe.details == f"ALIVE: publishing from {URL}"  # refreshed once after it
            assert isinstance(demo.out, io.StringIO)
            assert demo.out.getvalue() == f"startPublishers {URL}\n"
        finally:
            await probe.close()

    caplog.set_level(logging.INFO, logger="pubmon.core.probe")
    async with in_process_demo() as (demo, _, port):
        demo.options["start_publishers_error"] = "upstream down"
        probe = Fb303Probe("127.0.0.1", port, 1.0, data_source=URL, name="fed probe")
        try:
            assert await probe.check() == Health.HEALTHY
            await probe.on_first_healthy()
            note = f"startPublishers({URL}) failed: refused: upstream down"
            assert note in probe.details
            # The publisher keeps running: later rounds stay healthy and keep the note.
            assert await probe.check() == Health.HEALTHY
            assert note in probe.details and probe.details.startswith("ALIVE: ")
        finally:
            await probe.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"fed probe: {note}; it keeps running without its data source until it "
                      "is restarted"]  # fmt: skip


# --- tcp and exec probes ------------------------------------------------------------------------


async def test_tcp_probe_healthy_and_refused() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = TcpProbe("127.0.0.1", port, 1.0)
        assert await probe.check() == Health.HEALTHY and probe.last_error == ""
    finally:
        server.close()
        await server.wait_closed()
    assert await probe.check() == Health.UNHEALTHY
    assert probe.last_error.startswith(f"connect 127.0.0.1:{port}: ")


async def test_tcp_probe_under_a_supervisor() -> None:
    good, nobody = free_ports(2)
    tcp = ProbeSpec(kind="tcp", interval=INTERVAL, timeout=TIMEOUT, failure_threshold=THRESHOLD)
    listening = demo_spec("listens", good, probe=tcp)
    silent = spec("silent", SLEEP, start_timeout=0.3, probe=replace(tcp, port=nobody))
    async with running(listening, silent) as sup:
        pub = sup.get("listens")
        await running_again(pub, None)
        assert pub.health == Health.HEALTHY
        bad = sup.get("silent")
        await until(bad, lambda: len(bad.start_times) >= 2)
        assert bad.restarts >= 1 and bad.state != S.RUNNING


async def test_exec_probe_healthy_failing_and_missing() -> None:
    assert await ExecProbe(("true",), 1.0).check() == Health.HEALTHY
    failing = ExecProbe(("sh", "-c", "echo first; echo 'disk full' >&2; exit 2"), 1.0)
    assert await failing.check() == Health.UNHEALTHY
    assert failing.last_error == "sh exited 2: disk full"
    missing = ExecProbe(("/nonexistent/probe",), 1.0)
    assert await missing.check() == Health.UNHEALTHY
    assert "/nonexistent/probe" in missing.last_error
    assert "No such file" in missing.last_error


async def test_exec_probe_timeout_kills_its_whole_group() -> None:
    # The command starts a grandchild, reports its pid, then hangs.
    probe = ExecProbe(("sh", "-c", "sleep 60 & echo $!; sleep 60"), 0.3)
    t0 = time.monotonic()
    assert await probe.check() == Health.UNHEALTHY
    assert time.monotonic() - t0 < 10  # not the 60 s of its sleeps
    assert probe.last_error == "sh timed out after 0.3 s"
    assert probe.last_pid is not None and not alive(probe.last_pid)


async def test_exec_probe_runs_like_a_publisher_own_group_and_pdeathsig() -> None:
    code = (
        "import ctypes, os, sys\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig))\n"  # PR_GET_PDEATHSIG
        "print(sig.value, os.getpgid(0) == os.getpid(), os.environ['PUBMON_PUBLISHER'])\n"
        "sys.exit(0 if sig.value == 9 and os.getpgid(0) == os.getpid() else 1)\n"
    )
    probe = ExecProbe(py(code), 5.0, name="checked")
    assert await probe.check() == Health.HEALTHY, probe.last_error
    assert probe.details == f"{int(signal.SIGKILL)} True checked"


async def test_exec_probe_under_a_supervisor() -> None:
    exec_probe = ProbeSpec(
        kind="exec", interval=INTERVAL, timeout=1.0, failure_threshold=THRESHOLD,
        command=("true",),
    )  # fmt: skip
    good = spec("good", SLEEP, start_timeout=2, probe=exec_probe)
    bad = spec("bad", SLEEP, start_timeout=0.3, probe=replace(exec_probe, command=("false",)))
    async with running(good, bad) as sup:
        await running_again(sup.get("good"), None)
        assert sup.get("good").health == Health.HEALTHY
        b = sup.get("bad")
        await until(b, lambda: len(b.start_times) >= 2)
        assert b.state != S.RUNNING


async def test_make_probe_builds_each_kind() -> None:
    base = spec("p", SLEEP, port=9101, data_source=URL)
    assert make_probe(base) is None
    fb = make_probe(replace(base, probe=ProbeSpec(kind="fb303", port=9101, transport="buffered")))
    assert isinstance(fb, Fb303Probe)
    assert (fb.port, fb.transport, fb.data_source) == (9101, "buffered", URL)
    tcp = make_probe(replace(base, probe=ProbeSpec(kind="tcp", port=9102)))
    assert isinstance(tcp, TcpProbe) and tcp.port == 9102
    ex = make_probe(replace(base, probe=ProbeSpec(kind="exec", command=("true",))))
    assert isinstance(ex, ExecProbe) and ex.argv == ("true",)


# --- the demo config ---------------------------------------------------------------------------

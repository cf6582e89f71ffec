"""`pubmon upgrade` / SIGUSR2 against a real daemon: same pid, publishers carried over.

Writers print numbered lines until a stop file appears, then one "end <count>" line: the log
file and the ring must hold 0 .. count-1 then the end line, in order, once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from children import IGNORE_TERM, py
from control import control, poll
from daemons import RunningDaemon, daemon_header, run_daemon, toml_publisher
from procs import alive, children, wait_gone
from pubmon.errors import RpcError
from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient

WRITER = py(
    "import os, sys, time\n"
    "stop = sys.argv[1]\n"
    "i = 0\n"
    "while not os.path.exists(stop):\n"
    "    os.write(1, ''.join('%d\\n' % j for j in range(i, i + 100)).encode())\n"
    "    i += 100\n"
    "    time.sleep(0.01)\n"
    "os.write(1, b'end %d\\n' % i)\n"
    "time.sleep(3600)\n"
)


def writer(tmp: Path) -> list[str]:
    return [*WRITER, str(tmp / "stop")]


def write_config(tmp: Path, body: str, **header: Any) -> Path:
    path = tmp / "pubmon.toml"
    path.write_text(daemon_header(tmp, socket=True, **header) + body)
    return path


async def counters(sock: Path) -> dict[str, int]:
    async with control(sock, timeout=10) as c:
        got: dict[str, int] = await c.call("getCounters")
        return got


async def upgrade(d: RunningDaemon, sock: Path) -> dict[str, int]:
    """One upgrade over RPC; returns the counters the new image reports."""
    async with control(sock) as c:
        r = await c.call("upgrade")
    before = r.upgradesBefore

    async def done() -> dict[str, int] | None:
        try:
            got = await counters(sock)
        except Exception:
            return None
        return got if got.get("daemon.upgrades", 0) > before else None

    got: dict[str, int] = await poll(done, "the new image counted the upgrade", timeout=30)
    return got


def _last_line(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - 64))
        tail = f.read()
    return tail.rstrip(b"\n").rsplit(b"\n", 1)[-1].decode() if tail.endswith(b"\n") else ""


def check_log(path: Path) -> int:
    """The file holds 0 .. n-1 then "end n", once each, in order; returns n."""
    lines = path.read_text().splitlines()
    assert lines, path
    assert lines[-1].startswith("end "), lines[-3:]
    n = int(lines[-1].split()[1])
    body = lines[:-1]
    if body != [str(i) for i in range(n)]:
        seen = [int(x) for x in body]
        gaps = [(a, b) for a, b in itertools.pairwise(seen) if b != a + 1]
        raise AssertionError(f"{path.name}: {len(body)} lines for {n}; breaks at {gaps[:5]}")
    return n


async def follow(sock: Path, name: str, out: list[Any]) -> None:
    """A `tail -f` by cursor that reconnects when the daemon is between images."""
    cursor = 0
    while True:
        try:
            async with control(sock, timeout=10) as c:
                while True:
                    chunk = await c.call("tailLog", name, cursor, 10000)
                    assert chunk.missed == 0, chunk.missed
                    out.extend(chunk.lines)
                    cursor = chunk.nextSeq
                    if out and out[-1].text.startswith("end "):
                        return
        except RpcError as exc:  # the exec closed the connection: reconnect, same cursor
            if "no reply" in str(exc):
                raise
            await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_twenty_writers_through_ten_upgrades(tmp_path: Path) -> None:
    n = 20
    body = "".join(
        toml_publisher(f"w{i}", writer(tmp_path), log={"ring_lines": 2_000_000}) for i in range(n)
    )
    config = write_config(tmp_path, body)
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(config) as d:
        pids = await d.wait_publishers(n)
        lines: list[Any] = []
        follower = asyncio.ensure_future(follow(sock, "w0", lines))
        for _ in range(10):
            got = await upgrade(d, sock)
            assert got["daemon.last_upgrade_adopted"] == n
            assert d.publisher_pids() == pids
        assert d.proc.returncode is None
        (tmp_path / "stop").touch()
        async with asyncio.timeout(60):
            await follower
        logs = tmp_path / "logs"

        async def ended() -> bool:
            return all(_last_line(logs / f"w{i}.log").startswith("end ") for i in range(n))

        await poll(ended, "every writer wrote its end line", timeout=30)
        counts = {f"w{i}": check_log(logs / f"w{i}.log") for i in range(n)}
        assert [x.seq for x in lines] == list(range(1, len(lines) + 1))
        assert [x.text for x in lines] == [
            *map(str, range(counts["w0"])),
            f"end {counts['w0']}",
        ]
        async with control(sock) as c:
            for name, count in counts.items():
                info = await c.call("getPublisher", name)
                assert info.restarts == 0 and info.state == "RUNNING", info
                chunk = await c.call("tailLog", name, -1, 1)
                assert chunk.nextSeq == count + 1
                assert chunk.lines[0].text == f"end {count}"
            got = await c.call("getCounters")
        assert got["daemon.upgrades"] == 10
        assert d.publisher_pids() == pids
        assert "pubmon" in " ".join(d.stderr[-50:])


SLEEPER = ["sleep", "3600"]


def small_config(tmp: Path, **keys: Any) -> Path:
    body = "".join(toml_publisher(f"s{i}", SLEEPER, **keys) for i in range(3))
    return write_config(tmp, body)


async def test_a_failed_check_leaves_the_daemon_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBMON_TEST_UPGRADE_CHECK_FAIL", "pubmon is broken on disk")
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(small_config(tmp_path)) as d:
        pids = await d.wait_publishers(3)
        async with control(sock) as c:
            with pytest.raises(idl.pubmon().UpgradeRefused) as caught:
                await c.call("upgrade")
            assert "pubmon is broken on disk" in caught.value.message
            got = await c.call("getCounters")
        assert got["daemon.upgrades"] == 0 and got["daemon.upgrade_failures"] == 1
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pubmon", "upgrade", "--socket", str(sock),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert cli.returncode != 0
        assert b"pubmon is broken on disk" in err, err
        d.signal(signal.SIGUSR2)
        await d.wait_log("SIGUSR2: no upgrade: the new code refused: pubmon is broken on disk")
        assert d.proc.returncode is None
        assert d.publisher_pids() == pids
        assert not any("re-executing" in line for line in d.stderr)


async def test_sigusr2_and_a_child_that_exits_between_the_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old image SIGKILLs s1 after writing the state, before the exec: the new image
    # finds a zombie, reaps it, and applies the restart policy.
    monkeypatch.setenv("PUBMON_TEST_UPGRADE_KILL", "s1")
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(small_config(tmp_path, restart="always")) as d:
        pids = await d.wait_publishers(3)
        d.signal(signal.SIGUSR2)
        await d.wait_log("publishers carried over", timeout=30)

        async def restarted() -> Any:
            async with control(sock) as c:
                info = await c.call("getPublisher", "s1")
            return info if info.state == "RUNNING" and info.pid != pids["s1"] else None

        info = await poll(restarted, "s1 restarted by the new image", timeout=20)
        assert info.lastExit == -signal.SIGKILL and info.restarts == 1, info
        now = d.publisher_pids()
        assert now["s0"] == pids["s0"] and now["s2"] == pids["s2"]
        assert not alive(pids["s1"])
        async with control(sock) as c:
            got = await c.call("getCounters")
        assert got["daemon.upgrades"] == 1 and got["daemon.last_upgrade_adopted"] == 3
        assert got["publisher.s1.exits"] == 1
        # The parent-death signal is still armed: the daemon kept its pid.
        now = d.publisher_pids()
        d.signal(signal.SIGKILL)
        await wait_gone(set(now.values()), timeout=10)


@pytest.mark.parametrize("corrupt", ["blob", "publisher:s1"])
async def test_a_corrupt_state_orphans_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt: str
) -> None:
    monkeypatch.setenv("PUBMON_TEST_UPGRADE_CORRUPT", corrupt)
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(small_config(tmp_path)) as d:
        pids = await d.wait_publishers(3)
        async with control(sock) as c:
            await c.call("upgrade")
        await d.wait_log("publishers carried over", timeout=30)
        lost = {"s1"} if corrupt != "blob" else {"s0", "s1", "s2"}
        for name in lost:  # stopped by pid, not left behind anywhere
            assert not alive(pids[name]), name
        now = await d.wait_publishers(3)
        for name in {"s0", "s1", "s2"} - lost:
            assert now[name] == pids[name]
        for name in lost:
            assert now[name] != pids[name]
        assert set(children(d.pid)) == set(now.values())
        async with control(sock) as c:
            got = await c.call("getCounters")
        log = "\n".join(x for x in d.stderr if "upgrade" in x)
        assert got["daemon.last_upgrade_lost"] == len(lost), log
        assert got["daemon.last_upgrade_adopted"] == 3 - len(lost)
        assert any("upgrade: " in line and "ERROR" in line for line in d.stderr)


async def test_a_client_that_connects_during_the_pause_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv("PUBMON_TEST_UPGRADE_HOLD", str(hold))  # the new image waits for it
    sock = tmp_path / "pubmon.sock"
    config = small_config(tmp_path)
    config.write_text(config.read_text().replace('listen = ""', 'listen = "127.0.0.1:0"'))
    async with run_daemon(config) as d:
        await d.wait_publishers(3)
        line = await d.wait_log("monitor listening on 127.0.0.1:")
        port = int(line.rsplit(":", 1)[1].split()[0])
        async with control(sock) as c:
            await c.call("upgrade")

        async def in_new_image() -> bool:
            return b"PUBMON_UPGRADE_FD" in Path(f"/proc/{d.pid}/environ").read_bytes()

        await poll(in_new_image, "the daemon re-executed")
        # Before the new image has its handlers: stays pending (blocked across the exec),
        # and is a reload once it has them, not the end of the daemon.
        d.signal(signal.SIGHUP)
        svc = idl.pubmon().PubmonService
        # Both connect into the backlogs of the handed-over sockets (unix and TCP, same port).
        async with (
            control(sock) as c,
            await ThriftClient.connect(svc, host="127.0.0.1", port=port, timeout=30) as t,
        ):
            call = asyncio.ensure_future(c.call("listPublishers"))
            over_tcp = asyncio.ensure_future(t.call("listPublishers"))
            await asyncio.sleep(0.2)  # the calls wait: nobody serves the sockets yet
            assert not call.done() and not over_tcp.done()
            hold.unlink()
            infos = await call  # answered by the new image, from the adopted state
            assert len(await over_tcp) == 3
        assert [(i.name, i.state) for i in infos] == [(f"s{i}", "RUNNING") for i in range(3)]

        async def counted() -> bool:
            got = await counters(sock)
            return got["daemon.upgrades"] == 1 and got["daemon.reloads"] == 1

        await poll(counted, "the new image counted the upgrade and the SIGHUP's reload")
        assert d.proc.returncode is None


async def test_an_edited_config_is_reloaded_first(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(config) as d:
        pids = await d.wait_publishers(3)
        config.write_text(config.read_text() + toml_publisher("extra", SLEEPER))
        async with control(sock) as c:
            with pytest.raises(idl.pubmon().UpgradeRefused) as caught:
                await c.call("upgrade")
            assert "extra (added)" in caught.value.message
            assert "pubmon reload" in caught.value.message
            await c.call("reloadConfig")
        got = await upgrade(d, sock)
        assert got["daemon.last_upgrade_adopted"] == 4
        now = d.publisher_pids()
        assert {k: now[k] for k in pids} == pids and "extra" in now


async def test_backoff_and_counters_carry_over(tmp_path: Path) -> None:
    body = toml_publisher(
        "crash",
        ["sh", "-c", "echo crashing; exit 3"],
        backoff={"initial": 3.0, "max": 3.0, "jitter": 0},
    )
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(write_config(tmp_path, body)) as d:

        async def in_backoff() -> Any:
            async with control(sock) as c:
                info = await c.call("getPublisher", "crash")
            return info if info.state == "BACKOFF" else None

        before = await poll(in_backoff, "crash in BACKOFF", timeout=20)
        async with control(sock) as c:
            seq = (await c.call("tailLog", "crash", -1, 1)).nextSeq
        await upgrade(d, sock)
        async with control(sock) as c:
            info = await c.call("getPublisher", "crash")
        if info.restarts == before.restarts:  # the upgrade took less than the backoff
            # Still waiting for the same deadline: not respawned by the new image, not reset.
            assert info.state == "BACKOFF" and info.backoffUntil == before.backoffUntil, info
            assert info.stateSince == before.stateSince  # not the upgrade's time
            assert info.lastExit == 3

        async def restarted() -> Any:
            async with control(sock) as c:
                got = await c.call("getPublisher", "crash")
                chunk = await c.call("tailLog", "crash", seq, 10)
            return (got, chunk) if got.restarts > before.restarts and chunk.lines else None

        after, chunk = await poll(restarted, "the backoff timer fired", timeout=20)
        assert after.restarts == before.restarts + 1
        # Its next run began when the backoff said, not at the upgrade (nor was it forgotten).
        assert chunk.lines[0].seq == seq + 1 and chunk.lines[0].text == "crashing"
        assert chunk.lines[0].time >= before.backoffUntil - 0.05, (chunk, before)


async def test_calls_in_flight_are_answered_before_the_exec(tmp_path: Path) -> None:
    # A stop waiting for a child that ignores SIGTERM (stop_timeout 60 s: still waiting
    # however slow the upgrade's check), and a `tail -f` long poll, are in flight when the
    # upgrade execs: both are answered on their connections (the stop with "pubmon is
    # upgrading: ... accepted and goes on"), and the stop goes on in the new image.
    body = toml_publisher("stubborn", IGNORE_TERM, stop_timeout=60) + toml_publisher(
        "quiet", SLEEPER
    )
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(write_config(tmp_path, body)) as d:
        pids = await d.wait_publishers(2)

        async def ignoring() -> bool:
            async with control(sock) as c:
                chunk = await c.call("tailLog", "stubborn", 0, 10)
            return any("ignoring SIGTERM" in x.text for x in chunk.lines)

        await poll(ignoring, "stubborn ignores SIGTERM")
        m = idl.pubmon()
        svc = m.PubmonService
        stopper = await ThriftClient.connect(svc, unix_socket=str(sock), timeout=60)
        tailer = await ThriftClient.connect(svc, unix_socket=str(sock), timeout=60)
        try:
            stop = asyncio.ensure_future(stopper.call("stopPublisher", "stubborn"))
            async with control(sock) as c:

                async def stopping() -> bool:
                    return (await c.call("getPublisher", "stubborn")).state == "STOPPING"

                await poll(stopping, "stubborn STOPPING")
                seq = (await c.call("tailLog", "quiet", -1, 1)).nextSeq
                await c.call("upgrade")
            # Long polls one after the other: the one in flight at the cut is answered early;
            # one sent after the cut is refused ("retry"); none is dropped before the exec.
            outcomes = []
            while not stop.done():
                try:
                    chunk = await tailer.call("tailLog", "quiet", seq, 10)
                except RpcError as exc:
                    outcomes.append(str(exc))
                    break
                assert chunk.lines == [] and chunk.nextSeq == seq
                outcomes.append("answered")
            with pytest.raises(m.InvalidState) as caught:
                await stop
        finally:
            for client in (stopper, tailer):  # the exec closed them
                with contextlib.suppress(RpcError, ConnectionError):
                    await client.close()
        assert outcomes[:-1] == ["answered"] * (len(outcomes) - 1), outcomes
        assert outcomes[-1] == "answered" or "pubmon is upgrading: retry" in outcomes[-1], outcomes
        text = caught.value.message
        assert text.startswith("pubmon is upgrading: the stop of stubborn was accepted"), text

        async def upgraded() -> bool:
            try:
                got = await counters(sock)
            except RpcError:  # accepted by the old image in its last moment: closed by the exec
                return False
            return got.get("daemon.upgrades") == 1

        await poll(upgraded, "the new image counted the upgrade", timeout=30)
        async with control(sock) as c:
            info = await c.call("getPublisher", "stubborn")
            assert info.state == "STOPPING" and info.pid == pids["stubborn"], info  # goes on
            await c.call("signalPublisher", "stubborn", "KILL")  # rather than wait 60 s

        async def stopped() -> Any:
            async with control(sock) as c:
                info = await c.call("getPublisher", "stubborn")
            return info if info.state == "STOPPED" else None

        info = await poll(stopped, "the stop carried on by the new image", timeout=20)
        assert info.lastExit == -signal.SIGKILL, info
        assert d.publisher_pids()["quiet"] == pids["quiet"]
        assert not alive(pids["stubborn"])


async def test_the_dashboards_recent_exits_carry_over(tmp_path: Path) -> None:
    import json

    import aiohttp

    from pubmon.demo import free_ports

    (port,) = free_ports(1)
    # Its runs last 1 s: the dashboard's recorder (it starts at READY=1) sees every exit.
    body = toml_publisher(
        "crash", ["sh", "-c", "sleep 1; exit 3"], backoff={"initial": 0.1, "max": 0.1, "jitter": 0}
    )
    config = write_config(tmp_path, f'[http]\nlisten = "127.0.0.1:{port}"\n' + body)
    sock = tmp_path / "pubmon.sock"

    async def recent() -> list[Any]:
        url = f"http://127.0.0.1:{port}/events/crash"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            async for line in r.content:
                if line.startswith(b"data: ") and b'"recent_exits"' in line:
                    got: list[Any] = json.loads(line[6:])["recent_exits"]
                    return got
        raise AssertionError("no state event")

    async with run_daemon(config) as d:

        async def exited_twice() -> bool:
            return (await counters(sock)).get("publisher.crash.exits", 0) >= 2

        await poll(exited_twice, "crash exited twice", timeout=30)
        async with control(sock) as c:
            await c.call("stopPublisher", "crash")
        exits = (await counters(sock))["publisher.crash.exits"]

        async def recorded() -> list[Any] | None:
            got = await recent()
            return got if sum(x["count"] for x in got) == exits else None

        before = await poll(recorded, "the dashboard recorded every exit", timeout=30)
        got = await upgrade(d, sock)
        assert got["publisher.crash.exits"] == exits
        assert await recent() == before
        assert before[0]["status"] == 3


@pytest.mark.parametrize("reads", ["1", "0"])
async def test_an_older_pubmon_on_disk_gets_a_state_format_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: str
) -> None:
    # The code on disk reads only format 1 (an operator going back): the daemon writes that;
    # it reads none of ours: refused, and nothing changes.
    monkeypatch.setenv("PUBMON_TEST_UPGRADE_READS", reads)
    sock = tmp_path / "pubmon.sock"
    async with run_daemon(small_config(tmp_path)) as d:
        pids = await d.wait_publishers(3)
        if reads == "0":
            async with control(sock) as c:
                with pytest.raises(idl.pubmon().UpgradeRefused) as caught:
                    await c.call("upgrade")
            assert "cannot read state format 1 (it reads 0)" in caught.value.message
        else:
            got = await upgrade(d, sock)
            assert got["daemon.last_upgrade_adopted"] == 3 and got["daemon.last_upgrade_lost"] == 0
            await d.wait_log("accepts the state (format 1)")
        assert d.publisher_pids() == pids

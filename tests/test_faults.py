"""Bad input and hostile conditions, each with its expected result, nothing else disturbed.

A full log directory, a log directory removed or made unwritable, publishers that cannot be
spawned, SIGHUP storms, clients that never read their replies, tailLog cursors far away.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from control import call_frame, control, fd_count, fill, immutable, poll, rss_kib, tmpfs
from daemons import RunningDaemon, run_daemon, toml_publisher
from procs import alive
from pubmon.demo import free_ports
from pubmon.thrift import idl
from pubmon.thrift.idl import FbStatus

SLEEP = ["sleep", "3600"]
# ~1000 fixed-width numbered lines a second: a torn line is shorter than 8 digits.
TALKER = [
    sys.executable,
    "-c",
    "import os, time\n"
    "i = 0\n"
    "while True:\n"
    "    os.write(1, b'%08d\\n' % i)\n"
    "    i += 1\n"
    "    if i % 10 == 0: time.sleep(0.01)\n",
]
BIG_LOG = {"max_bytes": 50_000_000}
RUDE = 120  # clients that never read their replies


def header(tmp: Path, listen: str = "") -> str:
    return (
        f'[daemon]\nshutdown_timeout = 30\nlog_dir = "{tmp / "logs"}"\n'
        f'[control]\nsocket = "{tmp / "pubmon.sock"}"\n'
        f'[monitor]\nlisten = "{listen}"\n'
    )


def write_config(tmp: Path, body: str, listen: str = "") -> Path:
    path = tmp / "pubmon.toml"
    path.write_text(header(tmp, listen) + body)
    return path


@asynccontextmanager
async def talker_and_bystander(
    tmp: Path,
) -> AsyncIterator[tuple[RunningDaemon, Any, dict[str, int], Path]]:
    """A daemon running a fast talker and a sleeping bystander, once the talker's log file has
    its first lines: (daemon, control client, their pids, the talker's log file)."""
    body = toml_publisher("talker", TALKER, log=BIG_LOG) + toml_publisher("bystander", SLEEP)
    async with (
        run_daemon(write_config(tmp, body)) as d,
        control(tmp / "pubmon.sock") as c,
    ):
        pids = await d.wait_publishers(2)
        log = tmp / "logs" / "talker.log"
        await poll(lambda: _async(len(numbers_in(log)) > 50), "talker's first lines")
        yield d, c, pids, log


async def drops_keep_coming(c: Any) -> None:
    """Wait until the talker's dropped lines are counted, and then until more are."""
    dropped = await poll(lambda: counter(c, "publisher.talker.log_dropped"), "drops counted")
    await poll(lambda: _gt(counter(c, "publisher.talker.log_dropped"), dropped), "more drops")


async def lines_keep_coming(log: Path, what: str) -> None:
    """Wait until the log file holds 200 more lines than it does now."""
    last = numbers_in(log)[-1]
    await poll(lambda: _async(numbers_in(log)[-1] > last + 200), what)


def numbers_in(path: Path) -> list[int]:
    """The whole (8-digit) numbered lines of a talker's log file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [int(line) for line in data.split(b"\n")[:-1] if len(line) == 8 and line.isdigit()]


async def counter(c: Any, key: str) -> int:
    value: int = (await c.call("getCounters"))[key]
    return value


async def states(c: Any) -> dict[str, str]:
    return {i.name: i.state for i in await c.call("listPublishers")}


async def stop_and_count(c: Any, name: str, log: Path) -> tuple[list[int], dict[str, int]]:
    """Stop `name` (its pipes drained), then its whole lines on file and its counters."""
    await c.call("stopPublisher", name)
    counters = await c.call("getCounters")
    p = f"publisher.{name}."
    return numbers_in(log), {k[len(p) :]: v for k, v in counters.items() if k.startswith(p)}


def assert_nothing_lost_silently(whole: list[int], counts: dict[str, int]) -> None:
    # Every line the daemon read is on file or counted as dropped. A write cut short by the full
    # disk leaves at most one torn line per episode, which is counted as dropped although the
    # file may show it whole (cut just before its newline): hence the 0..1 allowance.
    assert whole == sorted(set(whole)), "lines repeated or out of order"
    assert 0 <= len(whole) + counts["log_dropped"] - counts["log_lines"] <= 1, (
        len(whole),
        counts,
    )


async def test_full_log_dir_counts_drops_keeps_running_and_resumes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    with tmpfs(logs, "1m"):
        async with talker_and_bystander(tmp_path) as (d, c, pids, log):
            fill(logs / "filler")
            await drops_keep_coming(c)
            assert await states(c) == {"talker": "RUNNING", "bystander": "RUNNING"}
            assert d.publisher_pids() == pids
            assert await c.call("getStatus") == FbStatus.ALIVE  # only a disk is full

            (logs / "filler").unlink()
            await lines_keep_coming(log, "writing resumes")
            before = await counter(c, "publisher.talker.log_dropped")
            await lines_keep_coming(log, "more lines on file")
            assert await counter(c, "publisher.talker.log_dropped") == before  # stopped dropping
            whole, counts = await stop_and_count(c, "talker", log)
            assert d.publisher_pids() == {"bystander": pids["bystander"]}
            d.signal(signal.SIGTERM)
            assert await d.wait_exit() == 0
    assert_nothing_lost_silently(whole, counts)
    assert counts["log_dropped"] > 0
    assert any(b - a > 1 for a, b in itertools.pairwise(whole)), "no gap on file?"
    # One warning when dropping starts, one line when it stops: not one per lost line.
    assert _count(d, "talker: cannot write log file") == 1
    assert _count(d, "talker: writing log file") == 1


async def test_log_dir_removed_at_runtime_is_recreated_with_safe_modes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    async with talker_and_bystander(tmp_path) as (d, c, pids, log):
        # Moved away first, so the daemon can't recreate a file inside a half-removed folder.
        logs.rename(tmp_path / "gone")
        shutil.rmtree(tmp_path / "gone")
        await poll(lambda: _async(len(numbers_in(log)) > 100), "a new log file")
        assert logs.stat().st_mode & 0o777 == 0o750
        assert log.stat().st_mode & 0o777 == 0o640
        assert d.publisher_pids() == pids
        assert await states(c) == {"talker": "RUNNING", "bystander": "RUNNING"}
        assert await counter(c, "publisher.talker.log_dropped") == 0


async def test_log_file_made_unwritable_counts_drops_and_resumes(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    async with talker_and_bystander(tmp_path) as (d, c, pids, log):
        with immutable(log, logs):  # not even root may write, create or rename there
            await drops_keep_coming(c)
            assert d.publisher_pids() == pids
            assert await states(c) == {"talker": "RUNNING", "bystander": "RUNNING"}
        await lines_keep_coming(log, "writing resumes")
        whole, counts = await stop_and_count(c, "talker", log)
    assert_nothing_lost_silently(whole, counts)
    assert counts["log_dropped"] > 0
    assert _count(d, "talker: cannot write log file") == 1


async def test_unknown_user_or_unexecutable_command_is_fatal_with_reason_rest_run(
    tmp_path: Path,
) -> None:
    not_exec = tmp_path / "not-exec"
    not_exec.write_text("#!/bin/sh\nexit 0\n")
    not_exec.chmod(0o644)
    body = (
        toml_publisher("nouser", SLEEP, user="pubmon-test-no-such-user")
        + toml_publisher("noexec", [str(not_exec)])
        + toml_publisher("fine", SLEEP)
    )
    async with (
        run_daemon(write_config(tmp_path, body)) as d,
        control(tmp_path / "pubmon.sock") as c,
    ):
        await d.wait_publishers(1)
        infos = {i.name: i for i in await c.call("listPublishers")}
        assert infos["fine"].state == "RUNNING"
        assert infos["nouser"].state == "FATAL"
        assert "user 'pubmon-test-no-such-user' does not exist" in infos["nouser"].statusDetails
        assert infos["noexec"].state == "FATAL"
        assert "Permission denied" in infos["noexec"].statusDetails
        # Permanent: no restarts, and an operator's start gets the same verdict again.
        again = await c.call("startPublisher", "noexec")
        assert again.state == "FATAL" and "Permission denied" in again.statusDetails
        counters = await c.call("getCounters")
        for name in ("nouser", "noexec"):
            assert counters[f"publisher.{name}.restarts"] == 0
            assert counters[f"publisher.{name}.exits"] == 0
        assert await c.call("getStatus") == FbStatus.WARNING  # something wanted is not running
        assert (await c.call("getPublisher", "fine")).pid == infos["fine"].pid


async def test_sighup_storm_reloads_the_last_config_and_corrupts_nothing(tmp_path: Path) -> None:
    keep = "".join(toml_publisher(f"k{i}", SLEEP) for i in range(5))
    a = keep + toml_publisher("c", SLEEP) + toml_publisher("r", SLEEP)
    b = keep + toml_publisher("c", ["sleep", "3601"]) + toml_publisher("n", SLEEP)
    config = write_config(tmp_path, a)
    async with run_daemon(config) as d, control(tmp_path / "pubmon.sock") as c:
        before = await d.wait_publishers(7)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(100):  # 100 SIGHUPs in a second; the file flips between B and A
            if i % 10 == 0:
                text = header(tmp_path) + (b if i % 20 == 0 or i == 90 else a)
                tmp = tmp_path / "next.toml"
                tmp.write_text(text)
                os.replace(tmp, config)  # a reload never reads half a file
            d.signal(signal.SIGHUP)
            await asyncio.sleep(max(0.0, t0 + (i + 1) / 100 - loop.time()))  # pacing
        reloads = await poll(lambda: _settled_reloads(c), "reloads settle", timeout=30)
        assert 1 <= reloads <= 100
        assert await counter(c, "daemon.reload_failures") == 0
        assert await states(c) == {**{f"k{i}": "RUNNING" for i in range(5)}, "c": "RUNNING",
                                   "n": "RUNNING"}  # fmt: skip
        after = d.publisher_pids()
        assert all(after[f"k{i}"] == before[f"k{i}"] for i in range(5))  # never restarted
        assert not alive(before["r"])

        # The spawn wrapper may still be exec'ing its way to the command (setpriv, sh, sleep).
        async def runs_new_command() -> bool:
            return Path(f"/proc/{after['c']}/cmdline").read_bytes() == b"sleep\x003601\x00"

        assert await poll(runs_new_command, "c runs sleep 3601")
        assert await c.call("getStatus") == FbStatus.ALIVE
    assert not any("Traceback" in line for line in d.stderr)


async def _settled_reloads(c: Any) -> int:
    # Settled: the count stays put across a quiet 0.3 s (coalesced SIGHUPs end in one reload).
    first = await counter(c, "daemon.reloads")
    await asyncio.sleep(0.3)
    return first if first and await counter(c, "daemon.reloads") == first else 0


async def test_clients_that_never_read_replies_neither_block_nor_balloon_the_daemon(
    tmp_path: Path,
) -> None:
    port = free_ports(1)[0]
    body = "".join(
        toml_publisher(f"t{i}", TALKER, log={"max_bytes": 200_000, "ring_lines": 2000})
        for i in range(4)
    )
    sock_path = tmp_path / "pubmon.sock"
    config = write_config(tmp_path, body, listen=f"127.0.0.1:{port}")
    async with run_daemon(config) as d, control(sock_path, timeout=60) as c:
        pids = await d.wait_publishers(4)
        await poll(lambda: _gt(counter(c, "publisher.t0.log_lines"), 2000), "a full ring")
        rss0, fds0 = rss_kib(d.pid), fd_count(d.pid)
        # Each call asks for up to 10000 lines (~100 KB of reply); RUDE clients pipeline 50 each
        # and never read a byte back. On the control socket: over TCP tailLog needs a client
        # certificate (the logs level), so there it would only earn small refusals.
        frames = b"".join(call_frame("tailLog", f"t{i % 4}", 0, 10000, seqid=i) for i in range(50))
        rude = []
        for _ in range(RUDE):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock_path))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            try:
                s.send(frames)
            except BlockingIOError:
                pass
            rude.append(s)
        try:
            await poll(lambda: _ge(counter(c, "rpc.connections"), RUDE + 1), "every rude client in")
            # The daemon answers what the kernel buffers take (a few replies per connection),
            # then backpressure stops it: it does no more work for clients that do not read.
            calls = await poll(lambda: _calls_settled(c), "the calls to stop", timeout=60)
            assert calls < RUDE * 8, f"{calls} calls answered for clients that never read"
            t0 = time.monotonic()
            assert await c.call("getStatus") == FbStatus.ALIVE
            assert len(await c.call("listPublishers")) == 4
            assert time.monotonic() - t0 < 5  # still answering, not stalled
            lines = await counter(c, "publisher.t0.log_lines")
            await poll(lambda: _gt(counter(c, "publisher.t0.log_lines"), lines + 1000), "output")
            grown = rss_kib(d.pid) - rss0
            assert grown < 64 * 1024, f"RSS grew {grown} KiB for {RUDE} stalled clients"
            assert d.publisher_pids() == pids
        finally:
            for s in rude:
                s.close()
        await poll(lambda: _eq(counter(c, "rpc.connections"), 1), "rude clients gone")
        assert fd_count(d.pid) <= fds0 + 2
        assert await counter(c, "rpc.errors") == 0
        # And a stop is not held up by clients that don't read.
        rude = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            for s in rude:
                s.setblocking(False)
                try:
                    s.send(frames)
                except BlockingIOError:
                    pass
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            assert await d.wait_exit() == 0
            assert time.monotonic() - t0 < 10
        finally:
            for s in rude:
                s.close()


async def test_taillog_cursor_far_in_the_past_or_future(tmp_path: Path) -> None:
    port = free_ports(1)[0]
    # 1.8 MB: more than the daemon's pipe holds (1 MiB, enlarged), so the writer blocks until
    # the daemon has read, and the lines reach the ring in several blocks of at most 256 KiB
    # (1310 lines); the first is evicted (the ring keeps ring_lines lines, evicting whole
    # blocks). 81 kB used to be enough with 64 KiB pipes; with 1 MiB ones it sometimes arrived
    # in one read, which the ring rightly kept whole. Below tailLog's 10000 lines.
    n = 9000
    burst = [sys.executable, "-c",
             f"import sys, time\nfor i in range({n}): print('%08d' % i + 'x' * 191)\n"
             "sys.stdout.flush(); time.sleep(3600)"]  # fmt: skip
    body = toml_publisher("b", burst, log={"ring_lines": 100, "max_bytes": 0})
    config = write_config(tmp_path, body, listen=f"127.0.0.1:{port}")
    async with run_daemon(config) as d, control(tmp_path / "pubmon.sock") as c:
        await d.wait_publishers(1)
        await poll(lambda: _eq(counter(c, "publisher.b.log_lines"), n), f"all {n} lines")
        mon = idl.pubmon().PubmonService
        from pubmon.thrift.server import ThriftClient

        async with await ThriftClient.connect(mon, host="127.0.0.1", port=port, timeout=5) as tcp:
            with pytest.raises(idl.pubmon().PermissionDenied):  # logs need a client certificate
                await tcp.call("tailLog", "b", 0, 10)
            for client in (c,):
                oldest = await client.call("tailLog", "b", 0, 10)
                first = oldest.lines[0].seq
                assert first > 1 and oldest.missed == first - 1
                assert [x.seq for x in oldest.lines] == list(range(first, first + 10))
                past = await client.call("tailLog", "b", 1, 10)  # evicted long ago
                assert past.lines[0].seq == first and past.missed == first - 2
                for cursor in (10**12, 2**63 - 1):  # a daemon restart, or garbage: resync
                    t0 = time.monotonic()
                    future = await client.call("tailLog", "b", cursor, 10)
                    assert future.lines == [] and future.nextSeq == n and future.missed == 0
                    assert time.monotonic() - t0 < 0.4  # answered at once, not long-polled
                last = await client.call("tailLog", "b", -3, 10)
                assert [x.text for x in last.lines] == [
                    f"{i:08d}" + "x" * 191 for i in range(n - 3, n)
                ]
                for cursor in (-(2**63), -(10**12)):
                    everything = await client.call("tailLog", "b", cursor, 10)
                    assert everything.lines[-1].seq == n and everything.missed == first - 1
                for limit in (0, -5, 2**31 - 1):
                    got = await client.call("tailLog", "b", n - 10, limit)
                    assert [x.seq for x in got.lines] == list(
                        range(n - 9, n - 8 if limit < 1 else n + 1)
                    )
                caught_up = await client.call("tailLog", "b", n, 10)  # the long poll, bounded
                assert caught_up.lines == [] and caught_up.nextSeq == n
                with pytest.raises(idl.pubmon().UnknownPublisher):
                    await client.call("tailLog", "nope", 0, 10)


async def _calls_settled(c: Any) -> int:
    """rpc.calls once only our own getCounters moved it in 0.5 s (0 while it still moves)."""
    first = await counter(c, "rpc.calls")
    await asyncio.sleep(0.5)
    return first if await counter(c, "rpc.calls") == first + 1 else 0


async def _async(value: Any) -> Any:
    return value


async def _gt(aw: Any, than: int) -> bool:
    return bool(await aw > than)


async def _ge(aw: Any, than: int) -> bool:
    return bool(await aw >= than)


async def _eq(aw: Any, to: int) -> bool:
    return bool(await aw == to)


def _count(d: RunningDaemon, text: str) -> int:
    return sum(text in line for line in d.stderr)

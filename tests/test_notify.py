"""pubmon.daemon.notify against a real AF_UNIX datagram socket playing systemd's notify socket.

`FakeManager` binds a path or an abstract ('@') socket with SO_PASSCRED, so each datagram
arrives with its sender's pid (SCM_CREDENTIALS), the way systemd attributes messages. The first
tests drive a `Notifier` directly; the rest run a real `pubmon daemon` with NOTIFY_SOCKET set.
Every wait is for a datagram (or a log line) under asyncio.timeout; the one fixed window is the
test that no WATCHDOG=1 comes, where the absence is the point.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemons import RunningDaemon, daemon_header, run_daemon, toml_publisher
from procs import alive, wait_gone
from pubmon.daemon.notify import Notifier

_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid

# A publisher that would speak for the daemon if it could: it reports what it inherited and,
# when it did inherit NOTIFY_SOCKET, sends READY=1 there itself.
SNITCH = [
    sys.executable,
    "-c",
    "import os, socket, time\n"
    "keys = ('NOTIFY_SOCKET', 'WATCHDOG_PID', 'WATCHDOG_USEC')\n"
    "print('inherited', [(k, os.environ.get(k)) for k in keys], flush=True)\n"
    "addr = os.environ.get('NOTIFY_SOCKET')\n"
    "if addr:\n"
    "    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "    s.sendto(b'READY=1\\nSTATUS=a publisher speaking', "
    "'\\0' + addr[1:] if addr.startswith('@') else addr)\n"
    "time.sleep(3600)\n",
]
NOTHING_INHERITED = (
    "inherited [('NOTIFY_SOCKET', None), ('WATCHDOG_PID', None), ('WATCHDOG_USEC', None)]"
)


@dataclass
class Message:
    pid: int
    fields: dict[str, str]
    at: float  # time.monotonic() at receipt

    def has(self, key: str) -> bool:
        return key in self.fields


@dataclass
class FakeManager:
    """The receiving end of NOTIFY_SOCKET. `seen` keeps every datagram, in order."""

    address: str | bytes
    seen: list[Message] = field(default_factory=list)
    _queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    _sock: socket.socket | None = None

    @property
    def notify_socket(self) -> str:
        """The value systemd would put in NOTIFY_SOCKET."""
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode()
        return self.address

    def open(self, *, reading: bool = True) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(self.address)
        sock.setblocking(False)
        self._sock = sock
        if reading:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if isinstance(self.address, str):
            Path(self.address).unlink(missing_ok=True)

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, ancdata, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
            except BlockingIOError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            msg = Message(pid, fields, time.monotonic())
            self.seen.append(msg)
            self._queue.put_nowait(msg)

    async def next(
        self, want: Callable[[Message], bool] = lambda m: True, timeout: float = 10
    ) -> Message:
        """The next datagram that `want` accepts; the ones skipped stay in `seen`."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._queue.get()
                if want(msg):
                    return msg


def not_watchdog(msg: Message) -> bool:
    return not msg.has("WATCHDOG")


def state_change(msg: Message) -> bool:
    """READY, RELOADING or STOPPING: what systemd acts on (not pings, status or extensions)."""
    return any(msg.has(k) for k in ("READY", "RELOADING", "STOPPING"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # sun_path holds 108 bytes: pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="pmn-") as d:
        yield Path(d)


@pytest.fixture(params=["path", "abstract"])
def address(request: pytest.FixtureRequest, short_dir: Path) -> str | bytes:
    if request.param == "path":
        return str(short_dir / "notify")
    return f"\0pubmon-test-{os.getpid()}-{time.monotonic_ns()}".encode()


@asynccontextmanager
async def fake_manager(address: str | bytes, *, reading: bool = True) -> AsyncIterator[FakeManager]:
    mgr = FakeManager(address)
    mgr.open(reading=reading)
    try:
        yield mgr
    finally:
        mgr.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --- Notifier on its own ---------------------------------------------------------------------


async def test_without_notify_socket_everything_is_a_no_op() -> None:
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.send("READY=1") is False
    n.ready("x")
    n.stopping()
    async with asyncio.timeout(1):
        await n.watchdog()  # returns at once instead of pinging nobody
    n.close()


async def test_messages_and_their_sender(address: str | bytes) -> None:
    async with fake_manager(address) as mgr:
        n = Notifier({"NOTIFY_SOCKET": mgr.notify_socket})
        assert n.enabled
        try:
            n.ready("2/2 publishers running, 0 fatal")
            msg = await mgr.next()
            assert msg.fields == {"READY": "1", "STATUS": "2/2 publishers running, 0 fatal"}
            assert msg.pid == os.getpid()

            n.status("2/2 publishers running, 0 fatal")  # unchanged: not sent again
            n.status("1/2 publishers running, 1 fatal")
            assert (await mgr.next()).fields == {"STATUS": "1/2 publishers running, 1 fatal"}

            before = monotonic_usec()
            n.reloading()
            msg = await mgr.next()
            after = monotonic_usec()
            # systemd wants both in one datagram; the timestamp is CLOCK_MONOTONIC in µs.
            assert msg.fields["RELOADING"] == "1"
            assert before <= int(msg.fields["MONOTONIC_USEC"]) <= after

            n.extend_timeout(5)
            assert (await mgr.next()).fields == {"EXTEND_TIMEOUT_USEC": "5000000"}

            n.stopping("stopping: 2/2 publishers running, 0 fatal")
            msg = await mgr.next()
            assert msg.fields == {
                "STOPPING": "1",
                "STATUS": "stopping: 2/2 publishers running, 0 fatal",
            }
            assert {m.pid for m in mgr.seen} == {os.getpid()}
        finally:
            n.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
async def test_watchdog_only_for_us(
    short_dir: Path, env: dict[str, str], interval: float | None
) -> None:
    async with fake_manager(str(short_dir / "notify")) as mgr:
        n = Notifier({"NOTIFY_SOCKET": mgr.notify_socket, **env})
        try:
            assert n.watchdog_interval == interval
        finally:
            n.close()


async def test_watchdog_pings_every_half_watchdog_usec(address: str | bytes) -> None:
    async with fake_manager(address) as mgr:
        n = Notifier({"NOTIFY_SOCKET": mgr.notify_socket, "WATCHDOG_USEC": "200000"})
        try:
            async with asyncio.TaskGroup() as tg:
                pinger = tg.create_task(n.watchdog())
                pings = [await mgr.next(timeout=2) for _ in range(6)]
                pinger.cancel()
        finally:
            n.close()
    assert all(p.fields == {"WATCHDOG": "1"} for p in pings)
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert 0.08 <= sum(gaps) / len(gaps) <= 0.15, gaps
    assert max(gaps) < 0.2, gaps  # each ping inside WATCHDOG_USEC, systemd's deadline


async def test_a_full_queue_drops_instead_of_blocking(short_dir: Path) -> None:
    async with fake_manager(str(short_dir / "notify"), reading=False) as mgr:
        n = Notifier({"NOTIFY_SOCKET": mgr.notify_socket})
        try:
            # Nobody reads: after the kernel's queue (net.unix.max_dgram_qlen) fills, a
            # blocking send would hang right here; a non-blocking one reports the drop.
            t0 = time.monotonic()
            sent = 0
            while n.send("WATCHDOG=1"):
                sent += 1
                assert sent < 100_000
            assert sent >= 1
            assert time.monotonic() - t0 < 1
        finally:
            n.close()


async def test_a_missing_manager_is_not_an_error(short_dir: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(short_dir / "gone")})
    try:
        assert n.enabled
        assert n.send("READY=1") is False
        n.ready("x")  # logged at debug level, nothing raised
    finally:
        n.close()


# --- a real daemon ---------------------------------------------------------------------------

SLOW_START = 0.3  # publisher "slow": READY=1 cannot come before it is RUNNING


def write_config(tmp: Path, *extra: str) -> Path:
    body = (
        toml_publisher("slow", ["sleep", "3600"], start_timeout=SLOW_START)
        + toml_publisher("snitch", SNITCH, log={"echo": True})
        + "".join(extra)
    )
    path = tmp / "pubmon.toml"
    path.write_text(daemon_header(tmp) + body)
    return path


@asynccontextmanager
async def notified_daemon(
    monkeypatch: pytest.MonkeyPatch, mgr: FakeManager, config: Path, **env: str
) -> AsyncIterator[RunningDaemon]:
    monkeypatch.setenv("NOTIFY_SOCKET", mgr.notify_socket)
    for key in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    async with run_daemon(config, ready=False) as d:
        try:
            yield d
        except BaseException:
            print("daemon stderr:", *d.stderr, sep="\n")  # shown with the failure
            raise


def age(pid: int) -> float:
    """Seconds since `pid` started (clock ticks since boot, from /proc/PID/stat)."""
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")


async def test_daemon_ready_reload_stop_in_order(
    address: str | bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path)
    async with (
        fake_manager(address) as mgr,
        notified_daemon(monkeypatch, mgr, config, WATCHDOG_USEC="2000000") as d,
    ):
        ready = await mgr.next(not_watchdog)
        assert ready.fields == {"READY": "1", "STATUS": "2/2 publishers running, 0 fatal"}
        # READY=1 comes once the publishers are spawned and RUNNING: "slow" only gets there
        # after surviving its start_timeout.
        pubs = d.publisher_pids()
        assert set(pubs) == {"slow", "snitch"}
        assert age(pubs["slow"]) >= SLOW_START - 0.02

        config.write_text(
            config.read_text() + toml_publisher("late", ["sleep", "3600"], start_timeout=0)
        )
        before = monotonic_usec()
        d.signal(signal.SIGHUP)
        reloading = await mgr.next(state_change)
        assert reloading.fields["RELOADING"] == "1"
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()
        reloaded = await mgr.next(state_change)
        assert reloaded.fields == {"READY": "1", "STATUS": "3/3 publishers running, 0 fatal"}

        d.signal(signal.SIGTERM)
        stopping = await mgr.next(state_change)
        assert stopping.fields == {
            "STOPPING": "1",
            "STATUS": "stopping: 3/3 publishers running, 0 fatal",
        }
        assert await d.wait_exit() == 0
        await d.wait_log(f"snitch| {NOTHING_INHERITED}")
    # Between the state changes only STATUS= updates, stop-timeout extensions and pings, and
    # everything came from the daemon itself: no publisher ever reached the socket.
    changes = [m for m in mgr.seen if state_change(m)]
    assert changes == [ready, reloading, reloaded, stopping]
    others = {k for m in mgr.seen if not state_change(m) for k in m.fields}
    assert others <= {"STATUS", "EXTEND_TIMEOUT_USEC", "WATCHDOG"}
    assert {m.pid for m in mgr.seen} == {d.pid}


async def test_daemon_pings_the_watchdog_from_its_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    async with (
        fake_manager(str(short_dir / "notify")) as mgr,
        notified_daemon(monkeypatch, mgr, write_config(tmp_path), WATCHDOG_USEC="400000") as d,
    ):
        await mgr.next(lambda m: m.has("READY"))
        pings = [await mgr.next(lambda m: m.has("WATCHDOG"), timeout=2) for _ in range(5)]
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        assert 0.15 <= sum(gaps) / len(gaps) <= 0.3, gaps
        assert max(gaps) < 0.4, gaps  # inside WATCHDOG_USEC every time
        assert {p.pid for p in pings} == {d.pid}


async def test_daemon_leaves_a_watchdog_meant_for_another_pid_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    # WATCHDOG_PID names another process (here: pytest), as when a wrapper script got it.
    env = {"WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    async with (
        fake_manager(str(short_dir / "notify")) as mgr,
        notified_daemon(monkeypatch, mgr, write_config(tmp_path), **env) as d,
    ):
        await mgr.next(lambda m: m.has("READY"))
        # Enabled, it would ping every 50 ms: ten chances in this window.
        with pytest.raises(TimeoutError):
            await mgr.next(lambda m: m.has("WATCHDOG"), timeout=0.5)
        d.signal(signal.SIGTERM)
        await mgr.next(lambda m: m.has("STOPPING"))
        assert await d.wait_exit() == 0
    assert not any(m.has("WATCHDOG") for m in mgr.seen)


async def test_a_wedged_loop_stops_the_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    async with (
        fake_manager(str(short_dir / "notify")) as mgr,
        notified_daemon(
            monkeypatch, mgr, write_config(tmp_path), WATCHDOG_USEC="200000", PUBMON_TEST_WEDGE="1"
        ) as d,
    ):
        await mgr.next(lambda m: m.has("READY"))
        await mgr.next(lambda m: m.has("WATCHDOG"), timeout=1)
        pubs = d.publisher_pids()
        d.signal(signal.SIGUSR2)  # blocks the daemon's event loop for good
        # At most one ping may already be on its way; then silence, 10 intervals long.
        with pytest.raises(TimeoutError):
            await mgr.next(lambda m: m.has("WATCHDOG"), timeout=0.3)
            await mgr.next(lambda m: m.has("WATCHDOG"), timeout=1.0)
        assert alive(d.pid)  # wedged, not dead: only the watchdog would notice
        d.signal(signal.SIGKILL)  # what systemd does next (SIGABRT there)
        await d.wait_exit()
        await wait_gone(list(pubs.values()), timeout=2)


async def test_a_sighup_during_the_first_round_does_not_make_it_ready_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    config = write_config(tmp_path)
    async with (
        fake_manager(str(short_dir / "notify")) as mgr,
        notified_daemon(monkeypatch, mgr, config) as d,
    ):
        await d.wait_log("started with")
        d.signal(signal.SIGHUP)  # while "slow" is still STARTING
        await d.wait_log("reloaded")
        ready = await mgr.next(state_change)
        assert ready.fields["READY"] == "1"
        assert age(d.publisher_pids()["slow"]) >= SLOW_START - 0.02
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    # Once: no RELOADING=1 / READY=1 pair for a reload before the daemon was ready.
    assert [m for m in mgr.seen if state_change(m)][:1] == [ready]
    assert sum(m.has("READY") for m in mgr.seen) == 1
    assert not any(m.has("RELOADING") for m in mgr.seen)


async def test_nothing_but_status_after_stopping_even_with_a_reload_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, short_dir: Path
) -> None:
    stubborn = [
        sys.executable,
        "-c",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\ntime.sleep(3600)\n",
    ]
    config = write_config(tmp_path, toml_publisher("stubborn", stubborn, stop_timeout=1))
    async with (
        fake_manager(str(short_dir / "notify")) as mgr,
        notified_daemon(monkeypatch, mgr, config) as d,
    ):
        await mgr.next(state_change)  # READY=1
        # A reload that restarts "stubborn" waits for its stop_timeout: SIGTERM meanwhile.
        config.write_text(config.read_text().replace("print('up'", "print('up again'"))
        d.signal(signal.SIGHUP)
        await d.wait_log("(config changed: command)")
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    changes = [m for m in mgr.seen if state_change(m)]
    stopping = next(i for i, m in enumerate(changes) if m.has("STOPPING"))
    assert changes[stopping + 1 :] == []
    assert [m.has("RELOADING") for m in changes[:stopping]] == [False, True]

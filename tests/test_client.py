"""The clients: ``pubmon.thrift.client.ThriftClient`` (async: probes, HTTP counters, tests) and
``pubmon.thrift.blocking.BlockingClient`` (the CLI's: no asyncio, no thriftpy2).

Both run on ``codec``; here they meet real servers: ``ThriftServer`` on the test's loop (the
blocking client then runs in a thread), thriftpy2's stock aio server, and raw sockets that
misbehave (frames over the cap, cut short, out of turn, for another seqid, never).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pubmon.errors import PermissionDenied, RpcError
from pubmon.thrift import idl
from pubmon.thrift.blocking import BlockingClient, DeclaredException
from pubmon.thrift.server import Peer, ThriftClient, ThriftServer
from thrift_helpers import INFO_A, INFO_B, SVC, closed_by_peer, connect, plain, pm
from thrift_helpers import Handler as ServerHandler
from thrift_helpers import serving as serving_tcp

INFO, IDLE = INFO_A, INFO_B


def reply(method: str, seqid: int = 1, **fields: Any) -> bytes:
    """An unframed REPLY to ``method`` carrying ``fields``."""
    bound = idl.bind(SVC)
    [(field, value)] = fields.items() or [(None, None)]
    return bound.encode_reply(bound.method(method), seqid, field, value)[4:]


# --- the async client ---------------------------------------------------------------------------


class AsyncHandler:
    """thriftpy2's aio processor awaits every handler method."""

    async def getStatus(self) -> int:
        return 2

    async def getCounters(self) -> dict[str, int]:
        return {"a": 1}

    async def listPublishers(self) -> list[Any]:
        return [INFO_A, INFO_B]

    async def getPublisher(self, name: str) -> Any:
        raise pm.UnknownPublisher(message=name)


@pytest.mark.parametrize("transport", ["buffered", "framed"])
async def test_our_client_against_thriftpy2_aio_server(transport: str) -> None:
    from thriftpy2.contrib.aio.processor import TAsyncProcessor
    from thriftpy2.contrib.aio.server import TAsyncServer
    from thriftpy2.contrib.aio.socket import TAsyncServerSocket
    from thriftpy2.contrib.aio.transport import (
        TAsyncBufferedTransportFactory,
        TAsyncFramedTransportFactory,
    )

    framed = transport == "framed"
    factory = TAsyncFramedTransportFactory if framed else TAsyncBufferedTransportFactory
    # make_aio_server refuses port 0, so build it by hand (reference/thrift.md §1.1, §1.3).
    sock = TAsyncServerSocket(host="127.0.0.1", port=0, client_timeout=None)
    stock = TAsyncServer(
        TAsyncProcessor(SVC, AsyncHandler()), sock, itrans_factory=factory(),
        loop=asyncio.get_running_loop(),
    )  # fmt: skip
    handled = asyncio.Event()

    async def handle(conn: Any) -> None:
        try:
            await stock.handle(conn)
        finally:
            handled.set()

    stock.trans.listen()
    stock.server = await stock.trans.accept(handle)
    try:
        port = sock.raw_sock.getsockname()[1]
        async with await connect(port, transport=transport, timeout=5) as c:
            assert await c.call("getStatus") == 2
            assert await c.call("getCounters") == {"a": 1}
            assert await c.call("listPublishers") == [INFO_A, INFO_B]
            with pytest.raises(pm.UnknownPublisher):
                await c.call("getPublisher", "x")
            assert await c.call("getStatus") == 2
        async with asyncio.timeout(5):
            await handled.wait()  # its connection task is done, so nothing outlives the loop
    finally:
        await stock.close()


async def test_client_checks_reply_name_and_seqid() -> None:
    async def answer_wrongly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big"))
            bound = idl.bind(SVC)
            writer.write(bound.encode_reply(bound.method("getStatus"), 999, "success", 2))
            await closed_by_peer(reader)
        finally:
            writer.close()

    server = await asyncio.start_server(answer_wrongly, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        c = await connect(port)
        with pytest.raises(RpcError, match="#999"):
            await c.call("getStatus")
        with pytest.raises(RpcError, match="closed"):
            await c.call("getStatus")
        await c.close()


async def test_client_timeout_throws_the_connection_away() -> None:
    handler = ServerHandler()
    async with serving_tcp(handler) as (server, port):
        c = await connect(port, timeout=0.2)
        started = time.monotonic()
        with pytest.raises(RpcError, match=r"no reply within 0\.2 s"):
            await c.call("getCpuProfile", 3600)
        assert time.monotonic() - started < 2
        with pytest.raises(RpcError, match="closed"):
            await c.call("getStatus")
        await c.close()
        assert handler.profile_started.is_set()
    assert handler.profile_cancelled.is_set()  # close() cancelled the call still in progress
    assert server.connections == 0 and not server._tasks


async def test_connect_failures_raise_rpc_error(tmp_path: Path) -> None:
    with pytest.raises(RpcError, match="cannot connect"):
        await ThriftClient.connect(SVC, unix_socket=tmp_path / "missing.sock")
    with pytest.raises(ValueError):
        await ThriftClient.connect(SVC, host="127.0.0.1")


# --- the blocking client ------------------------------------------------------------------------


HEAVY = ("asyncio", "thriftpy2", "logging", "ssl", "pubmon.thrift.idl", "pubmon.thrift.server")


def heavy_imports_after(code: str, heavy: tuple[str, ...] = HEAVY) -> str:
    """What `code` prints in a fresh interpreter, then a line: which of `heavy` it imported."""
    check = f"\nimport sys\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code + check], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_importing_the_blocking_client_stays_light() -> None:
    assert heavy_imports_after("import pubmon.thrift.blocking") == "[]"


# --- the client on raw sockets: transport errors -----------------------------------------------


@contextlib.contextmanager
def raw_server(path: Path, answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A unix socket server in a thread that runs ``answer`` on each connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            try:
                answer(conn)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield str(path)
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        for conn in conns:
            conn.close()


def read_call(conn: socket.socket) -> bytes:
    size = struct.unpack(">i", conn.recv(4, socket.MSG_WAITALL))[0]
    return conn.recv(size, socket.MSG_WAITALL)


def send_frame(conn: socket.socket, body: bytes) -> None:
    conn.sendall(struct.pack(">i", len(body)) + body)


def test_connect_failures_keep_their_os_error(tmp_path: Path) -> None:
    with pytest.raises(RpcError, match=r"cannot connect to .*missing\.sock") as err:
        BlockingClient(unix_socket=str(tmp_path / "missing.sock"))
    assert isinstance(err.value.__cause__, FileNotFoundError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(RpcError, match="Connection refused") as err:
            BlockingClient(host="127.0.0.1", port=port)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ValueError):
        BlockingClient(unix_socket="x", host="h", port=1)
    with pytest.raises(RpcError, match=r"no answer within -1 s"):
        BlockingClient(unix_socket=str(tmp_path / "missing.sock"), timeout=-1)


def test_frames_over_the_limit_and_zero_frames(tmp_path: Path) -> None:
    def huge(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 2**31 - 1) + b"\x80\x01")

    with raw_server(tmp_path / "a.sock", huge) as path, BlockingClient(unix_socket=path) as c:
        with pytest.raises(RpcError, match="frame of 2147483647 bytes"):
            c.call("getName")
        with pytest.raises(RpcError, match="closed"):  # thrown away after the error
            c.call("getName")

    def zero(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 0))

    with (
        raw_server(tmp_path / "b.sock", zero) as path,
        BlockingClient(unix_socket=path) as c,
        pytest.raises(RpcError, match="frame of 0 bytes"),
    ):
        c.call("getName")


def test_a_frame_cut_short_is_closed_not_a_hang_nor_an_allocation(tmp_path: Path) -> None:
    def cut(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 15 << 20) + b"\x80\x01\x00\x02")
        conn.shutdown(socket.SHUT_WR)

    with raw_server(tmp_path / "a.sock", cut) as path, BlockingClient(unix_socket=path) as c:
        tracemalloc.start()
        try:
            with pytest.raises(RpcError, match="getName: connection closed by the server"):
                c.call("getName")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


def test_no_reply_times_out_for_the_whole_call(tmp_path: Path) -> None:
    release = threading.Event()

    def trickle(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 100))
        while not release.wait(0.05):  # a byte now and then never completes the frame
            conn.sendall(b"\x00")

    with raw_server(tmp_path / "a.sock", trickle) as path:
        with BlockingClient(unix_socket=path, timeout=0.3) as c:
            t0 = time.monotonic()
            with pytest.raises(RpcError, match=r"getName: no reply within 0\.3 s"):
                c.call("getName")
            assert time.monotonic() - t0 < 2
        release.set()


def test_a_server_that_hung_up_or_talks_out_of_turn(tmp_path: Path) -> None:
    def hang_up(conn: socket.socket) -> None:
        conn.close()

    with (
        raw_server(tmp_path / "a.sock", hang_up) as path,
        BlockingClient(unix_socket=path) as c,
        # EOF or, when our call was already sent, a reset: both read as "the daemon went away"
        pytest.raises(RpcError, match=r"closed|connection lost"),
    ):
        c.call("getName")

    def chatty(conn: socket.socket) -> None:
        send_frame(conn, b"hello")
        time.sleep(0.5)

    with raw_server(tmp_path / "b.sock", chatty) as path, BlockingClient(unix_socket=path) as c:
        time.sleep(0.1)
        with pytest.raises(RpcError, match="unexpected bytes"):
            c.call("getName")


def test_a_reply_to_another_seqid_is_refused(tmp_path: Path) -> None:
    def stale(conn: socket.socket) -> None:
        read_call(conn)
        send_frame(conn, reply("getName", 99, success="old"))

    with (
        raw_server(tmp_path / "a.sock", stale) as path,
        BlockingClient(unix_socket=path) as c,
        pytest.raises(RpcError, match="reply to 'getName' #99, expected 'getName' #1"),
    ):
        c.call("getName")


# --- round trips against the real server -------------------------------------------------------


class Handler(ServerHandler):
    """The server tests' handler with a status and a name of its own, a reloadConfig that fails
    with a declared exception and a setOption that raises PermissionDenied, which setOption does
    not declare."""

    def getStatus(self) -> int:
        return idl.FbStatus.WARNING

    async def getName(self) -> str:
        return "pubmon-wire"

    async def reloadConfig(self, noWait: bool | None = None) -> Any:
        raise pm.ConfigError(message="pubmon.toml: 1 error(s)", problems=["daemon.x: unknown key"])

    async def setOption(self, key: str, value: str) -> None:
        raise PermissionDenied("not on this listener")  # no declared PermissionDenied


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, handler: Handler) -> AsyncIterator[tuple[str, int]]:
    async with ThriftServer(SVC, handler, name="wire-test") as server:
        sock = str(tmp_path / "pubmon.sock")
        await server.start_unix(sock)
        port = await server.start_tcp("127.0.0.1", 0)
        yield sock, port


def every_kind(client: BlockingClient) -> None:
    assert client.call("getStatus") == idl.FbStatus.WARNING
    assert client.call("getName") == "pubmon-wire"
    assert client.call("getCounters") == {"rpc.calls": 3, "big": 2**40, "negative": -1}
    assert client.call("getOptions") == {"ü": "ñ", "empty": ""}
    assert plain(client.call("listPublishers")) == plain([INFO, IDLE])
    chunk = client.call("tailLog", "feed:0", 10, 3)
    assert [(ln.seq, ln.text, ln.partial) for ln in chunk.lines] == [
        (11, "line 0 ☃", False), (12, "line 1 ☃", True), (13, "line 2 ☃", False),
    ]  # fmt: skip
    assert (chunk.nextSeq, chunk.missed, chunk.lines[2].time) == (13, 7, 3.5)
    # declared exceptions keep the connection
    with pytest.raises(DeclaredException) as err:
        client.call("getPublisher", "nope")
    assert (err.value.name, err.value.message) == ("UnknownPublisher", "no publisher named 'nope'")
    with pytest.raises(DeclaredException) as err:
        client.call("reloadConfig")
    assert err.value.name == "ConfigError"
    assert err.value.fields.problems == ["daemon.x: unknown key"]
    with pytest.raises(DeclaredException, match="PermissionDenied: the handler says no"):
        client.call("reopenLogs")
    assert plain(client.call("getPublisher", "feed:0")) == plain(INFO)
    assert client.call("shutdown") is None  # oneway: nothing comes back, nothing is waited for
    assert client.call("getName") == "pubmon-wire"  # a stray reply would break this


async def test_round_trip_of_every_kind_on_both_listeners(tmp_path: Path) -> None:
    handler = Handler()
    async with serving(tmp_path, handler) as (sock, port):

        def both() -> None:
            with BlockingClient(unix_socket=sock) as c:
                every_kind(c)
            with BlockingClient(host="127.0.0.1", port=port, timeout=5) as c:
                every_kind(c)

        await asyncio.to_thread(both)
        assert handler.shutdown_called.is_set()


async def test_application_exceptions_keep_their_text_and_close(tmp_path: Path) -> None:
    async with serving(tmp_path, Handler()) as (sock, _):

        def calls() -> list[str]:
            seen = []
            for method, args in [
                ("getOption", ("x",)),
                ("setOption", ("k", "v")),
                ("getVersion", ()),
            ]:
                with BlockingClient(unix_socket=sock) as c, pytest.raises(RpcError) as err:
                    c.call(method, *args)
                seen.append(str(err.value))
                with pytest.raises(RpcError, match="closed"):
                    c.call("getName")
            return seen

        assert await asyncio.to_thread(calls) == [
            f"{sock}: getOption: internal error",
            f"{sock}: setOption: PermissionDenied: not on this listener",
            f"{sock}: getVersion: method not implemented getVersion",
        ]


async def test_refused_peer_and_vanished_daemon(tmp_path: Path) -> None:
    def deny(peer: Peer, method: str) -> None:
        raise PermissionDenied(f"{method} refused")

    sock = str(tmp_path / "pubmon.sock")
    async with ThriftServer(SVC, Handler(), name="wire-test", authorize=deny) as server:
        await server.start_unix(sock)
        client = await asyncio.to_thread(BlockingClient, unix_socket=sock)
        with client:
            with pytest.raises(DeclaredException, match="PermissionDenied: startPublisher refused"):
                await asyncio.to_thread(client.call, "startPublisher", "a")
            await server.close()  # the daemon goes away between two calls
            with pytest.raises(RpcError, match="closed"):
                await asyncio.to_thread(client.call, "getName")


async def test_blocking_client_and_async_client_agree(tmp_path: Path) -> None:
    from pubmon.thrift.server import ThriftClient

    async with serving(tmp_path, Handler()) as (sock, _):
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("listPublishers", ()),
            ("tailLog", ("x", 0, 2)),
            ("getCounters", ()),
            ("getStatus", ()),
        ]
        async with await ThriftClient.connect(SVC, unix_socket=sock) as tc:
            expected = [plain(await tc.call(m, *a)) for m, a in calls]

        def wire() -> list[Any]:
            with BlockingClient(unix_socket=sock) as c:
                return [plain(c.call(m, *a)) for m, a in calls]

        assert await asyncio.to_thread(wire) == expected


def test_cli_client_commands_import_neither_asyncio_nor_thrift(tmp_path: Path) -> None:
    code = (
        "from pubmon.cli import main\n"
        f"print(main(['status', '--socket', {str(tmp_path / 'absent.sock')!r}]))"
    )
    heavy = (*HEAVY, "pubmon.config.model", "pubmon.daemon.daemon")
    assert heavy_imports_after(code, heavy) == "4\n[]"

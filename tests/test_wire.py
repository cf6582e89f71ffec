"""pubmon.thrift.wire (the CLI's blocking client) and thrift.schema (its generated wire schema).

The schema must equal what the generator reads from the IDL; calls must encode byte for byte as
``_frames`` does; replies decode strictly (every bad frame is an RpcError, fast, with no big
allocation); and the client round-trips every kind of value and error against the real
``ThriftServer``, which runs on the test's loop while the blocking client runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
import schema_gen as _schema_gen
from thriftpy2.thrift import TApplicationException, TMessageType, TType

from pubmon.errors import PermissionDenied, RpcError
from pubmon.thrift import frames as _frames
from pubmon.thrift import idl
from pubmon.thrift import schema as _schema
from pubmon.thrift.server import Peer, ThriftServer
from pubmon.thrift.wire import Struct, WireClient, WireException, decode_reply, encode_call

pm = idl.pubmon()
REPO = Path(__file__).resolve().parents[1]
SVC = pm.PubmonService
METHODS = _frames.methods(SVC)

INFO = pm.PublisherInfo(
    name="feed:0", program="feed", state="RUNNING", pid=4242, health="HEALTHY", restarts=2,
    lastExit=-9, lastExitReason="killed by SIGKILL", uptime=12.5, port=9101, statusDetails="ok ✓",
)  # fmt: skip
IDLE = pm.PublisherInfo(
    name="idle", program="sleep", state="STOPPED", pid=0, health="UNKNOWN", restarts=0,
    lastExitReason="", uptime=0.0, port=0, statusDetails="",
)  # fmt: skip


# --- the schema ----------------------------------------------------------------------------------


def test_checked_in_schema_equals_the_generator_output() -> None:
    checked_in = Path(_schema.__file__).read_text()
    assert checked_in == _schema_gen.generate(), (
        "src/pubmon/thrift/schema.py is stale: run "
        "`python tools/schema_gen.py > src/pubmon/thrift/schema.py`"
    )


def test_generator_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "schema_gen.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == Path(_schema.__file__).read_text()


def test_schema_agrees_with_thriftpy2_on_every_method() -> None:
    assert list(_schema.METHODS) == list(SVC.thrift_services)
    for name, method in METHODS.items():
        args, result, oneway = _schema.METHODS[name]
        assert tuple(f[1] for f in args) == method.arg_names
        assert oneway == method.oneway
        declared = {field: cls.__name__ for cls, field in method.throws}
        assert {f[1]: f[3] for f in result if f[0] != 0} == declared
        assert set(_schema.EXCEPTIONS) >= set(declared.values())
    for name in _schema.STRUCTS:
        assert [f[1] for f in _schema.STRUCTS[name]] == [
            f[1] for f in getattr(pm, name).thrift_spec.values()
        ]
    assert _schema.ENUMS["fb_status"] == {s.name: s.value for s in idl.FbStatus}
    assert (_schema.STRING, _schema.LIST, _schema.CALL) == (TType.STRING, TType.LIST, 1)


def test_importing_the_wire_client_stays_light() -> None:
    code = (
        "import sys, pubmon.thrift.wire\n"
        "heavy = ('asyncio', 'thriftpy2', 'logging', 'ssl', 'pubmon.thrift.idl',\n"
        "         'pubmon.thrift.server')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- encoding ------------------------------------------------------------------------------------

SAMPLES: dict[str, tuple[Any, ...]] = {
    "getPublisher": ("feed:0",),
    "startPublisher": ("ü ☃",),
    "tailLog": ("feed", -(2**40), 10000),
    "getCounter": ("",),
    "setOption": ("k", "v"),
    "getCpuProfile": (-5,),
}


def thriftpy2_call(method: str, seqid: int, args: tuple[Any, ...]) -> bytes:
    spec = METHODS[method]
    payload = spec.args_cls()
    for name, value in zip(spec.arg_names, args, strict=False):
        setattr(payload, name, value)
    mtype = TMessageType.ONEWAY if spec.oneway else TMessageType.CALL
    return _frames.encode_message(method, mtype, seqid, payload, framed=True)


@pytest.mark.parametrize("method", list(SVC.thrift_services))
def test_calls_encode_byte_for_byte_like_frames(method: str) -> None:
    args = SAMPLES.get(method, ())
    for seqid in (1, 2**31 - 1):
        assert encode_call(method, seqid, args) == thriftpy2_call(method, seqid, args)
    # missing trailing arguments and None are unset, as with thriftpy2's args struct
    for n in range(len(args)):
        partial = args[:n]
        assert encode_call(method, 7, partial) == thriftpy2_call(method, 7, partial)
        holes = tuple(None if i == n else a for i, a in enumerate(args))
        assert encode_call(method, 7, holes) == thriftpy2_call(method, 7, holes)


@pytest.mark.parametrize(
    "method, args",
    [
        ("getPublisher", (42,)),  # an int for a string
        ("tailLog", ("x", "10", 1)),  # a str for an i64
        ("tailLog", ("x", 2**63, 1)),  # out of range
        ("getCpuProfile", (1.5,)),  # a float for an i32
    ],
)
def test_bad_arguments_raise_type_error_like_frames(method: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError):
        thriftpy2_call(method, 1, args)
    with pytest.raises(TypeError):
        encode_call(method, 1, args)


def test_unknown_methods_and_extra_arguments() -> None:
    with pytest.raises(ValueError, match="no method 'nope'"):
        encode_call("nope", 1, ())
    with pytest.raises(TypeError, match="takes 1 arguments, got 2"):
        encode_call("getPublisher", 1, ("a", "b"))


# --- decoding ------------------------------------------------------------------------------------


def reply(method: str, seqid: int = 1, **fields: Any) -> bytes:
    """An unframed REPLY to ``method`` carrying ``fields`` (thriftpy2's classes, _frames' codec)."""
    result = METHODS[method].result_cls(**fields)
    return _frames.encode_message(method, TMessageType.REPLY, seqid, result, framed=False)


def app_error(method: str, kind: int, message: str | None, seqid: int = 1) -> bytes:
    err = TApplicationException(kind, message)
    return _frames.encode_message(method, TMessageType.EXCEPTION, seqid, err, framed=False)


def head(name: str, seqid: int = 1, mtype: int = TMessageType.REPLY) -> bytes:
    return (
        struct.pack(">Ii", 0x80010000 | mtype, len(name)) + name.encode() + struct.pack(">i", seqid)
    )


def plain(value: Any) -> Any:
    """A thriftpy2 value or a decoded one, as dicts and lists, to compare the two."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "thrift_spec"):
        return {f[1]: plain(getattr(value, f[1])) for f in value.thrift_spec.values()}
    if isinstance(value, Struct):
        return {k: plain(v) for k, v in vars(value).items()}
    return value


def test_replies_decode_to_the_same_values_as_thriftpy2() -> None:
    chunk = pm.LogChunk(
        lines=[pm.LogLine(seq=2**40, time=1.25, stream="stderr", text="☃\x00", partial=True)],
        nextSeq=2**40,
        missed=0,
    )
    cases = [
        ("listPublishers", [INFO, IDLE]),
        ("getPublisher", INFO),
        ("tailLog", chunk),
        (
            "reloadConfig",
            pm.ReloadResult(added=["a"], removed=[], changed=["b", "c"], unchanged=[]),
        ),
        ("getCounters", {"rpc.calls": 3, "big": -(2**63)}),
        ("getOptions", {"ü": "ñ", "": ""}),
        ("getStatus", 5),
        ("aliveSince", 2**62),
        ("getName", ""),
    ]
    for method, value in cases:
        got = decode_reply(reply(method, 9, success=value), method, 9)
        assert plain(got) == plain(value), method
    info = decode_reply(reply("getPublisher", success=INFO), "getPublisher", 1)
    assert type(info).__name__ == "PublisherInfo" and repr(info).startswith("PublisherInfo(")
    assert info.lastExit == -9 and isinstance(info.uptime, float)
    unset = decode_reply(reply("getPublisher", success=pm.PublisherInfo()), "getPublisher", 1)
    assert vars(unset) == dict.fromkeys(vars(info))  # every IDL field is there, None when unset


def test_void_oneway_and_missing_results() -> None:
    assert decode_reply(reply("setOption"), "setOption", 1) is None
    assert decode_reply(reply("reopenLogs"), "reopenLogs", 1) is None
    with pytest.raises(RpcError, match="carries no result"):
        decode_reply(reply("getName"), "getName", 1)


def test_declared_exceptions_raise_wire_exception() -> None:
    data = reply("startPublisher", e2=pm.InvalidState(message="feed is already RUNNING"))
    with pytest.raises(WireException) as err:
        decode_reply(data, "startPublisher", 1)
    assert (err.value.name, err.value.message) == ("InvalidState", "feed is already RUNNING")
    assert str(err.value) == "InvalidState: feed is already RUNNING"
    data = reply("reloadConfig", e1=pm.ConfigError(message="bad", problems=["a.b: no"]))
    with pytest.raises(WireException) as err:
        decode_reply(data, "reloadConfig", 1)
    assert err.value.fields.problems == ["a.b: no"] and err.value.message == "bad"


def test_application_exceptions_raise_rpc_error_with_their_text() -> None:
    data = app_error("setOption", TApplicationException.UNKNOWN, "PermissionDenied: not here")
    with pytest.raises(RpcError, match=r"^PermissionDenied: not here$"):
        decode_reply(data, "setOption", 1)
    with pytest.raises(RpcError, match=r"^Unknown method$"):
        decode_reply(app_error("getName", 1, None), "getName", 1)
    with pytest.raises(RpcError, match=r"^Default \(unknown\) TApplicationException$"):
        decode_reply(app_error("getName", 6, ""), "getName", 1)


@pytest.mark.parametrize(
    "data, method, seqid, why",
    [
        (reply("getName", 1, success="x"), "getVersion", 1, "reply to 'getName' #1"),
        (reply("getName", 2, success="x"), "getName", 1, "expected 'getName' #1"),
        (reply("getName", success="x") + b"\x00", "getName", 1, "1 stray bytes"),
        (b"\x00\x01\x00\x02" + reply("getName", success="x")[4:], "getName", 1, "bad message"),
        (head("getName", mtype=TMessageType.CALL) + b"\x00", "getName", 1, "message type 1"),
        (head("getName", mtype=TMessageType.ONEWAY) + b"\x00", "getName", 1, "message type 4"),
        (struct.pack(">Ii", 0x80010002, 2) + b"\xff\xfe\x00\x00\x00\x01", "getName", 1, "UTF-8"),
        (b"", "getName", 1, "ends early"),
    ],
)
def test_bad_headers(data: bytes, method: str, seqid: int, why: str) -> None:
    with pytest.raises(RpcError, match=why):
        decode_reply(data, method, seqid)


def test_every_truncation_is_an_rpc_error() -> None:
    data = reply("listPublishers", success=[INFO, IDLE])
    for n in range(len(data)):
        with pytest.raises(RpcError):
            decode_reply(data[:n], "listPublishers", 1)


# A successful getCounters reply body is: field 0, MAP, then the map; listPublishers: LIST.
MAP_HEAD = head("getCounters") + struct.pack(">bh", TType.MAP, 0)
LIST_HEAD = head("listPublishers") + struct.pack(">bh", TType.LIST, 0)
NAME_HEAD = head("getName") + struct.pack(">bh", TType.STRING, 0)


@pytest.mark.parametrize(
    "data, method, why",
    [
        # lengths and counts far beyond the bytes present: refused before any loop or allocation
        (NAME_HEAD + struct.pack(">i", 2**31 - 1) + b"abc\x00", "getName", "bytes declared"),
        (NAME_HEAD + struct.pack(">i", -1) + b"\x00", "getName", "negative length"),
        (MAP_HEAD + struct.pack(">bbi", 11, 10, 2**31 - 1) + b"\x00", "getCounters", "container"),
        (LIST_HEAD + struct.pack(">bi", 12, 2**31 - 1) + b"\x00" * 8, "listPublishers", "contain"),
        (LIST_HEAD + struct.pack(">bi", 12, -3) + b"\x00", "listPublishers", "negative container"),
        # wrong types
        (head("getName") + struct.pack(">bh", TType.I32, 0) + b"\x00" * 5, "getName", "is a i32"),
        (LIST_HEAD + struct.pack(">bi", 11, 0) + b"\x00", "listPublishers", "elements are string"),
        (MAP_HEAD + struct.pack(">bbi", 11, 11, 0) + b"\x00", "getCounters", "values are string"),
        (MAP_HEAD + struct.pack(">bbi", 8, 10, 0) + b"\x00", "getCounters", "keys are i32"),
        # unknown types, also in fields that would be skipped
        (head("getName") + struct.pack(">bh", 99, 5) + b"\x00" * 8, "getName", "unknown type 99"),
        (head("getName") + struct.pack(">bhbi", 15, 5, 1, 10**6) + b"\x00", "getName", "unknown"),
        (LIST_HEAD + struct.pack(">bi", 1, 10**6) + b"\x00", "listPublishers", "elements are"),
    ],
)
def test_strict_decoding(data: bytes, method: str, why: str) -> None:
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(RpcError, match=why):
            decode_reply(data, method, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and time.perf_counter() - t0 < 10


def test_unknown_fields_are_skipped_and_nesting_is_capped() -> None:
    # A newer daemon may add fields of any type: they are skipped, known ones still read.
    extra = struct.pack(">bhi", TType.STRING, 77, 3) + b"new"
    extra += struct.pack(">bhbi", TType.LIST, 78, TType.I64, 2) + b"\x00" * 16
    extra += struct.pack(">bhbbi", TType.MAP, 79, TType.STRING, TType.BOOL, 1) + b"\0\0\0\0\1"
    extra += struct.pack(">bhbh", TType.STRUCT, 80, TType.DOUBLE, 1) + b"\0" * 8 + b"\x00"
    name = struct.pack(">bhi", TType.STRING, 0, 2) + b"ok"
    assert decode_reply(head("getName") + extra + name + b"\x00", "getName", 1) == "ok"

    def nested(depth: int) -> bytes:
        body = b"\x00"
        for _ in range(depth):
            body = struct.pack(">bh", TType.STRUCT, 1) + body + b"\x00"
        return head("getName") + struct.pack(">bh", TType.STRUCT, 5) + body + name + b"\x00"

    assert decode_reply(nested(10), "getName", 1) == "ok"
    with pytest.raises(RpcError, match="nested too deeply"):
        decode_reply(nested(200), "getName", 1)


def test_invalid_utf8_is_escaped_not_fatal() -> None:
    data = NAME_HEAD + struct.pack(">i", 3) + b"a\xffb" + b"\x00"
    assert decode_reply(data, "getName", 1) == "a\\xffb"


def test_random_corruption_gives_a_value_or_an_error_never_anything_else() -> None:
    rng = random.Random(5)
    good = [
        ("listPublishers", reply("listPublishers", success=[INFO, IDLE])),
        ("tailLog", reply("tailLog", success=pm.LogChunk(lines=[], nextSeq=1, missed=0))),
        ("getCounters", reply("getCounters", success={"a": 1, "b": 2})),
    ]
    t0 = time.perf_counter()
    for _ in range(3000):
        method, data = rng.choice(good)
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        with contextlib.suppress(RpcError, WireException):
            decode_reply(bytes(buf), method, 1)
    assert time.perf_counter() - t0 < 20


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
        WireClient(unix_socket=str(tmp_path / "missing.sock"))
    assert isinstance(err.value.__cause__, FileNotFoundError)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(RpcError, match="Connection refused") as err:
            WireClient(host="127.0.0.1", port=port)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ValueError):
        WireClient(unix_socket="x", host="h", port=1)
    with pytest.raises(RpcError, match=r"no answer within -1 s"):
        WireClient(unix_socket=str(tmp_path / "missing.sock"), timeout=-1)


def test_frames_over_the_limit_and_zero_frames(tmp_path: Path) -> None:
    def huge(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 2**31 - 1) + b"\x80\x01")

    with raw_server(tmp_path / "a.sock", huge) as path, WireClient(unix_socket=path) as c:
        with pytest.raises(RpcError, match="reply frame of 2147483647 bytes"):
            c.call("getName")
        with pytest.raises(RpcError, match="closed"):  # thrown away after the error
            c.call("getName")

    def zero(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 0))

    with (
        raw_server(tmp_path / "b.sock", zero) as path,
        WireClient(unix_socket=path) as c,
        pytest.raises(RpcError, match="reply frame of 0 bytes"),
    ):
        c.call("getName")


def test_a_frame_cut_short_is_closed_not_a_hang_nor_an_allocation(tmp_path: Path) -> None:
    def cut(conn: socket.socket) -> None:
        read_call(conn)
        conn.sendall(struct.pack(">i", 15 << 20) + b"\x80\x01\x00\x02")
        conn.shutdown(socket.SHUT_WR)

    with raw_server(tmp_path / "a.sock", cut) as path, WireClient(unix_socket=path) as c:
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
        with WireClient(unix_socket=path, timeout=0.3) as c:
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
        WireClient(unix_socket=path) as c,
        # EOF or, when our call was already sent, a reset: both read as "the daemon went away"
        pytest.raises(RpcError, match=r"closed|connection lost"),
    ):
        c.call("getName")

    def chatty(conn: socket.socket) -> None:
        send_frame(conn, b"hello")
        time.sleep(0.5)

    with raw_server(tmp_path / "b.sock", chatty) as path, WireClient(unix_socket=path) as c:
        time.sleep(0.1)
        with pytest.raises(RpcError, match="unexpected bytes"):
            c.call("getName")


def test_a_reply_to_another_seqid_is_refused(tmp_path: Path) -> None:
    def stale(conn: socket.socket) -> None:
        read_call(conn)
        send_frame(conn, reply("getName", 99, success="old"))

    with (
        raw_server(tmp_path / "a.sock", stale) as path,
        WireClient(unix_socket=path) as c,
        pytest.raises(RpcError, match="reply to 'getName' #99, expected 'getName' #1"),
    ):
        c.call("getName")


# --- round trips against the real server -------------------------------------------------------


class Handler:
    def __init__(self) -> None:
        self.shutdown_called = threading.Event()

    def getStatus(self) -> int:
        return idl.FbStatus.WARNING

    async def getName(self) -> str:
        return "pubmon-wire"

    def getCounters(self) -> dict[str, int]:
        return {"rpc.calls": 3, "big": 2**40, "negative": -1}

    def getOptions(self) -> dict[str, str]:
        return {"ü": "ñ", "empty": ""}

    async def listPublishers(self) -> list[Any]:
        return [INFO, IDLE]

    def getPublisher(self, name: str) -> Any:
        if name == INFO.name:
            return INFO
        raise pm.UnknownPublisher(message=f"no publisher named {name!r}")

    def startPublisher(self, name: str, noWait: bool | None = None) -> Any:
        return INFO

    def reloadConfig(self, noWait: bool | None = None) -> Any:
        raise pm.ConfigError(message="pubmon.toml: 1 error(s)", problems=["daemon.x: unknown key"])

    def tailLog(self, name: str, after: int, max_lines: int) -> Any:
        lines = [
            pm.LogLine(seq=after + 1 + i, time=1.5 + i, stream="stdout", text=f"line {i} ☃",
                       partial=i == 1)
            for i in range(max_lines)
        ]  # fmt: skip
        return pm.LogChunk(lines=lines, nextSeq=after + max_lines, missed=7)

    def getOption(self, key: str) -> str:
        raise RuntimeError("boom")  # undeclared: INTERNAL_ERROR

    def setOption(self, key: str, value: str) -> None:
        raise PermissionDenied("not on this listener")  # no declared PermissionDenied

    def reopenLogs(self) -> None:
        raise PermissionDenied("the handler says no")  # declared

    def shutdown(self) -> None:
        self.shutdown_called.set()


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, handler: Handler) -> AsyncIterator[tuple[str, int]]:
    async with ThriftServer(SVC, handler, name="wire-test") as server:
        sock = str(tmp_path / "pubmon.sock")
        await server.start_unix(sock)
        port = await server.start_tcp("127.0.0.1", 0)
        yield sock, port


def every_kind(client: WireClient) -> None:
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
    with pytest.raises(WireException) as err:
        client.call("getPublisher", "nope")
    assert (err.value.name, err.value.message) == ("UnknownPublisher", "no publisher named 'nope'")
    with pytest.raises(WireException) as err:
        client.call("reloadConfig")
    assert err.value.name == "ConfigError"
    assert err.value.fields.problems == ["daemon.x: unknown key"]
    with pytest.raises(WireException, match="PermissionDenied: the handler says no"):
        client.call("reopenLogs")
    assert plain(client.call("getPublisher", "feed:0")) == plain(INFO)
    assert client.call("shutdown") is None  # oneway: nothing comes back, nothing is waited for
    assert client.call("getName") == "pubmon-wire"  # a stray reply would break this


async def test_round_trip_of_every_kind_on_both_listeners(tmp_path: Path) -> None:
    handler = Handler()
    async with serving(tmp_path, handler) as (sock, port):

        def both() -> None:
            with WireClient(unix_socket=sock) as c:
                every_kind(c)
            with WireClient(host="127.0.0.1", port=port, timeout=5) as c:
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
                with WireClient(unix_socket=sock) as c, pytest.raises(RpcError) as err:
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
        client = await asyncio.to_thread(WireClient, unix_socket=sock)
        with client:
            with pytest.raises(WireException, match="PermissionDenied: startPublisher refused"):
                await asyncio.to_thread(client.call, "startPublisher", "a")
            await server.close()  # the daemon goes away between two calls
            with pytest.raises(RpcError, match="closed"):
                await asyncio.to_thread(client.call, "getName")


async def test_wire_client_and_thrift_client_agree(tmp_path: Path) -> None:
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
            with WireClient(unix_socket=sock) as c:
                return [plain(c.call(m, *a)) for m, a in calls]

        assert await asyncio.to_thread(wire) == expected


def test_cli_client_commands_import_neither_asyncio_nor_thrift(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pubmon.cli import main\n"
        f"rc = main(['status', '--socket', {str(tmp_path / 'absent.sock')!r}])\n"
        "heavy = ('asyncio', 'thriftpy2', 'logging', 'ssl', 'pubmon.thrift.idl',\n"
        "         'pubmon.thrift.server',\n"
        "         'pubmon.config.model', 'pubmon.daemon.daemon')\n"
        "print(rc, sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4 []"

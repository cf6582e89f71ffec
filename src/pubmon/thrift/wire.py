"""A blocking PubmonService client for the CLI: no thriftpy2, no asyncio, only socket and struct.

``pubmon status`` must start and exit within 100 ms. Importing asyncio (with ssl, logging,
concurrent.futures) costs ~50 ms of that and importing any thriftpy2 module ~40 ms (its package
``__init__`` pulls in the IDL parser, ply, urllib and http.client), before the IDL is even loaded.
So the CLI speaks the framed binary protocol itself, from the plain-data schema in ``_schema``
(generated from the IDL and checked against it by the tests). The daemon keeps using ``rpc``.

Example::

    with WireClient(unix_socket="/run/pubmon/pubmon.sock", timeout=5) as client:
        for info in client.call("listPublishers"):
            print(info.name, info.state)

What comes back: structs as ``Struct`` objects (a ``SimpleNamespace`` per IDL struct name, every
IDL field an attribute, None when unset), lists (also for sets), dicts, ints (enums too), floats,
bools, str (invalid UTF-8 backslash-escaped) and bytes (``binary``).

Decoding is as strict as ``_frames``: every length and count is checked against the bytes of the
frame before anything is read or allocated, unknown types are errors, nesting is capped at 64 and
a frame must be consumed exactly. Unlike ``_frames`` (which skips them, as Thrift's generated code
does), a known field or container whose wire type differs from the schema is an error too: the
client and the daemon share one IDL, so a mismatch means a bug or a corrupt reply, not a newer
peer. Unknown field ids are skipped, so a newer daemon may add fields.
"""

from __future__ import annotations

__all__ = ["MAX_DEPTH", "Struct", "WireClient", "WireException", "decode_reply", "encode_call"]

import socket
import struct
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, cast, final

from pubmon.errors import PubmonError, RpcError
from pubmon.thrift import schema as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

    from pubmon.thrift.schema import Detail, Fields

MAX_DEPTH = 64

_VERSION_1 = 0x80010000
_VERSION_MASK = 0xFFFF0000

_U32 = struct.Struct(">I")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_DOUBLE = struct.Struct(">d")
_FIELD = struct.Struct(">bh")
_LIST = struct.Struct(">bi")
_MAP = struct.Struct(">bbi")

_SCALARS = {S.BYTE: _I8, S.I16: _I16, S.I32: _I32, S.I64: _I64, S.DOUBLE: _DOUBLE}
# The fewest bytes a value of each wire type takes: bounds a container's count before its loop.
_MIN_SIZE = {
    S.BOOL: 1, S.BYTE: 1, S.I16: 2, S.I32: 4, S.I64: 8, S.DOUBLE: 8,
    S.STRING: 4, S.STRUCT: 1, S.MAP: 6, S.SET: 5, S.LIST: 5,
}  # fmt: skip
# `binary` is BINARY (18) in specs but travels as STRING (11), as in Apache Thrift.
_WIRE = {S.BINARY: S.STRING}
_TYPE_NAMES = {
    S.BOOL: "bool", S.BYTE: "byte", S.I16: "i16", S.I32: "i32", S.I64: "i64",
    S.DOUBLE: "double", S.STRING: "string", S.STRUCT: "struct", S.MAP: "map", S.SET: "set",
    S.LIST: "list", S.BINARY: "binary",
}  # fmt: skip
# TApplicationException's text when it carries no message (thriftpy2's __str__).
_APP_ERRORS = {
    1: "Unknown method",
    2: "Invalid message type",
    3: "Wrong method name",
    4: "Bad sequence ID",
    5: "Missing result",
}
_CHUNK = 1 << 16
# Values that cannot stand for a struct.
_PLAIN = (str, bytes, bytearray, int, float, list, tuple, dict, set, frozenset)


class Struct(types.SimpleNamespace):
    """A decoded IDL struct or exception; ``type(s).__name__`` is its IDL name."""


class WireException(PubmonError):
    """A declared IDL exception the server answered with.

    ``name`` is its IDL name (``"UnknownPublisher"``), ``fields`` its decoded fields and
    ``message`` its ``message`` field ("" when it has none). The connection stays usable.
    """

    def __init__(self, name: str, fields: Struct) -> None:
        self.name = name
        self.fields = fields
        message = getattr(fields, "message", None)
        self.message = message if isinstance(message, str) else ""
        super().__init__(f"{name}: {self.message}" if self.message else name)


class _BadReply(Exception):
    """The bytes are not a well-formed reply of the expected shape."""


def _wire(ttype: int) -> int:
    return _WIRE.get(ttype, ttype)


def _type_name(ttype: int) -> str:
    return _TYPE_NAMES.get(ttype, f"type {ttype}")


# --- encoding ----------------------------------------------------------------------------------


def encode_call(method: str, seqid: int, args: Sequence[object]) -> bytes:
    """The framed CALL (ONEWAY for oneway methods) of ``method`` with positional IDL ``args``;
    missing trailing arguments and None are left unset. Byte for byte what
    ``_frames.encode_message`` writes for the thriftpy2 args struct with the same values.

    Raises ValueError for a method the service lacks, TypeError for too many arguments or a
    value that does not fit its IDL type.
    """
    spec = S.METHODS.get(method)
    if spec is None:
        raise ValueError(f"no method {method!r} in {S.SERVICE}")
    fields, _, oneway = spec
    if len(args) > len(fields):
        raise TypeError(f"{method}() takes {len(fields)} arguments, got {len(args)}")
    out = bytearray(4)
    raw_name = method.encode()
    out += _U32.pack(_VERSION_1 | (S.ONEWAY if oneway else S.CALL))
    out += _I32.pack(len(raw_name))
    out += raw_name
    out += _I32.pack(seqid)
    values = dict(zip((f[1] for f in fields), args, strict=False))
    try:
        _write_fields(out, f"{method}_args", fields, values.get, MAX_DEPTH)
    except struct.error as e:
        raise TypeError(f"cannot encode {method}: {e}") from e
    _I32.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def _write_fields(
    out: bytearray, where: str, fields: Fields, get: Callable[[str], Any], depth: int
) -> None:
    if depth <= 0:
        raise ValueError("structs nested too deeply")
    for fid, name, ttype, detail in fields:
        value = get(name)
        if value is None:
            continue
        out += _FIELD.pack(_wire(ttype), fid)
        try:
            _write_value(out, ttype, detail, value, depth - 1)
        except (TypeError, struct.error) as e:
            raise TypeError(f"{where}.{name}: {e}") from None
    out.append(S.STOP)


def _write_value(out: bytearray, ttype: int, detail: Detail, value: Any, depth: int) -> None:
    if ttype == S.STRING or ttype == S.BINARY:
        if isinstance(value, str):
            value = value.encode()
        elif not isinstance(value, bytes | bytearray):
            raise TypeError(f"expected str or bytes, got {type(value).__name__}")
        out += _I32.pack(len(value))
        out += value
        return
    scalar = _SCALARS.get(ttype)
    if scalar is not None:
        out += scalar.pack(value)
    elif ttype == S.BOOL:
        out.append(1 if value else 0)
    elif depth <= 0:
        raise ValueError("values nested too deeply")
    elif ttype == S.STRUCT:
        # Any object with the fields as attributes (a Struct, a dataclass); unset ones are None.
        assert isinstance(detail, str)
        if isinstance(value, _PLAIN):
            raise TypeError(f"expected a {detail} struct, got {type(value).__name__}")
        _write_fields(out, detail, S.STRUCTS[detail], lambda a: getattr(value, a, None), depth)
    elif ttype == S.LIST or ttype == S.SET:
        if not isinstance(value, list | tuple | set | frozenset):
            raise TypeError(f"expected a list or set, got {type(value).__name__}")
        etype, esub = _pair(detail)
        out += _LIST.pack(_wire(etype), len(value))
        for item in value:
            _write_value(out, etype, esub, item, depth - 1)
    elif ttype == S.MAP:
        if not isinstance(value, dict):
            raise TypeError(f"expected a dict, got {type(value).__name__}")
        (ktype, ksub), (vtype, vsub) = _pairs(detail)
        out += _MAP.pack(_wire(ktype), _wire(vtype), len(value))
        for key, item in value.items():
            _write_value(out, ktype, ksub, key, depth - 1)
            _write_value(out, vtype, vsub, item, depth - 1)
    else:
        raise TypeError(f"unsupported type {ttype} in the schema")


def _pair(detail: Detail) -> tuple[int, Detail]:
    assert isinstance(detail, tuple) and isinstance(detail[0], int)
    return detail[0], detail[1]


def _pairs(detail: Detail) -> tuple[tuple[int, Detail], tuple[int, Detail]]:
    assert isinstance(detail, tuple) and isinstance(detail[0], tuple)
    assert isinstance(detail[1], tuple)
    return detail[0], detail[1]


# --- decoding ----------------------------------------------------------------------------------


def decode_reply(frame: bytes, method: str, seqid: int) -> Any:
    """The value a reply frame (without its length prefix) to ``method`` #``seqid`` carries:
    the success value, or None for a void method.

    Raises WireException for a declared IDL exception and RpcError for a
    TApplicationException (its message, e.g. ``"PermissionDenied: ..."``), a reply to another
    method or seqid, or bytes that are not a well-formed reply.
    """
    spec = S.METHODS.get(method)
    if spec is None:
        raise ValueError(f"no method {method!r} in {S.SERVICE}")
    _, result_fields, _ = spec
    try:
        reader = _Reader(frame)
        name, mtype, got = reader.message_begin()
        if name != method or got != seqid:
            raise _BadReply(f"reply to {name!r} #{got}, expected {method!r} #{seqid}")
        if mtype == S.EXCEPTION:
            fields, payload = S.APPLICATION_EXCEPTION, "TApplicationException"
        elif mtype == S.REPLY:
            fields, payload = result_fields, f"{method}_result"
        else:
            raise _BadReply(f"message type {mtype} in a reply")
        result = reader.read_struct(payload, fields, MAX_DEPTH)
        reader.expect_end()
    except _BadReply as e:
        raise RpcError(str(e)) from None
    if mtype == S.EXCEPTION:
        message, kind = result.message or "", result.type or 0
        raise RpcError(message or _APP_ERRORS.get(kind, "Default (unknown) TApplicationException"))
    if (success := getattr(result, "success", None)) is not None:
        return success
    for fid, field, _, detail in result_fields:
        if fid != 0 and (err := getattr(result, field)) is not None:
            assert isinstance(detail, str)
            raise WireException(detail, err)
    if any(fid == 0 for fid, *_ in result_fields):
        raise RpcError("the reply carries no result")
    return None


# Per struct: {field id: (name, wire type, ttype, detail, struct.Struct for scalars)}.
_Plan = dict[int, tuple[str, int, int, "Detail", struct.Struct | None]]
_CLASSES: dict[str, tuple[type[Struct], _Plan, dict[str, None]]] = {}


def _new(name: str, fields: Fields) -> tuple[Struct, _Plan]:
    """A fresh ``name`` struct with every field None, and how to read its fields."""
    known = _CLASSES.get(name)
    if known is None:
        cls = cast(type[Struct], type(name, (Struct,), {"__module__": __name__}))
        plan = {fid: (f, _wire(t), t, d, _SCALARS.get(t)) for fid, f, t, d in fields}
        known = _CLASSES[name] = (cls, plan, dict.fromkeys(f[1] for f in fields))
    cls, plan, unset = known
    return cls(**unset), plan


class _Reader:
    """Reads one message from ``buf``; every method advances ``pos`` or raises _BadReply."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def message_begin(self) -> tuple[str, int, int]:
        (head,) = self._unpack(_U32)
        if head & _VERSION_MASK != _VERSION_1:
            raise _BadReply(f"bad message header 0x{head:08x}")
        try:
            name = self._take().decode()
        except UnicodeDecodeError:
            raise _BadReply("method name is not UTF-8") from None
        (seqid,) = self._unpack(_I32)
        return name, head & 0xFF, seqid

    def expect_end(self) -> None:
        if self.pos != len(self.buf):
            raise _BadReply(f"{len(self.buf) - self.pos} stray bytes after the message")

    def read_struct(self, name: str, fields: Fields, depth: int) -> Any:
        if depth <= 0:
            raise _BadReply("structs nested too deeply")
        obj, plan = _new(name, fields)
        values = vars(obj)
        buf = self.buf
        while True:
            if self.pos < len(buf) and buf[self.pos] == S.STOP:
                self.pos += 1
                return obj
            ftype, fid = self._unpack(_FIELD)
            field = plan.get(fid)
            if field is None:
                self.skip(ftype, depth - 1)  # a field this client does not know: newer peer
                continue
            fname, wtype, ttype, detail, scalar = field
            if ftype != wtype:
                raise _BadReply(
                    f"{name}.{fname} is a {_type_name(ftype)}, expected {_type_name(ttype)}"
                )
            # Scalars and strings inline: 1000 PublisherInfo are 11000 of them.
            if scalar is not None:
                (values[fname],) = self._unpack(scalar)
            elif ttype == S.STRING:
                values[fname] = self._take().decode(errors="backslashreplace")
            else:
                values[fname] = self._value(ttype, detail, depth - 1)

    def skip(self, ttype: int, depth: int) -> None:
        """Step over one value of wire type ``ttype`` without building it."""
        if ttype in _SCALARS or ttype == S.BOOL:
            self._advance(_MIN_SIZE[ttype])
        elif ttype == S.STRING:
            (n,) = self._unpack(_I32)
            self._advance(n)
        elif ttype not in _MIN_SIZE:
            raise _BadReply(f"unknown type {ttype}")
        elif depth <= 0:
            raise _BadReply("values nested too deeply")
        elif ttype == S.STRUCT:
            while True:
                (ftype,) = self._unpack(_I8)
                if ftype == S.STOP:
                    return
                self._advance(2)
                self.skip(ftype, depth - 1)
        elif ttype == S.LIST or ttype == S.SET:
            etype, n = self._unpack(_LIST)
            self._check_count(n, etype)
            for _ in range(n):
                self.skip(etype, depth - 1)
        else:
            ktype, vtype, n = self._unpack(_MAP)
            self._check_count(n, ktype, vtype)
            for _ in range(n):
                self.skip(ktype, depth - 1)
                self.skip(vtype, depth - 1)

    def _value(self, ttype: int, detail: Detail, depth: int) -> Any:
        scalar = _SCALARS.get(ttype)
        if scalar is not None:
            return self._unpack(scalar)[0]
        if ttype == S.STRING:
            return self._take().decode(errors="backslashreplace")
        if ttype == S.BOOL:
            return self._unpack(_I8)[0] != 0
        if ttype == S.BINARY:
            return self._take()
        if depth <= 0:
            raise _BadReply("values nested too deeply")
        if ttype == S.STRUCT:
            assert isinstance(detail, str)
            return self.read_struct(detail, S.STRUCTS[detail], depth)
        if ttype == S.LIST or ttype == S.SET:
            etype, esub = _pair(detail)
            wtype, n = self._unpack(_LIST)
            self._expect(wtype, etype, "element")
            self._check_count(n, wtype)
            return [self._value(etype, esub, depth - 1) for _ in range(n)]
        if ttype == S.MAP:
            (ktype, ksub), (vtype, vsub) = _pairs(detail)
            wk, wv, n = self._unpack(_MAP)
            self._expect(wk, ktype, "key")
            self._expect(wv, vtype, "value")
            self._check_count(n, wk, wv)
            out = {}
            for _ in range(n):
                key = self._value(ktype, ksub, depth - 1)
                out[key] = self._value(vtype, vsub, depth - 1)
            return out
        raise _BadReply(f"unsupported type {ttype} in the schema")

    def _expect(self, got: int, want: int, what: str) -> None:
        if got != _wire(want):
            raise _BadReply(f"{what}s are {_type_name(got)}, expected {_type_name(want)}")

    def _check_count(self, n: int, *types: int) -> None:
        # Refuse a count the remaining bytes cannot hold before any loop runs or anything is
        # allocated: a 12-byte frame may declare 2**31 elements.
        size = 0
        for t in types:
            if t not in _MIN_SIZE:
                raise _BadReply(f"unknown element type {t}")
            size += _MIN_SIZE[t]
        if n < 0:
            raise _BadReply(f"negative container size {n}")
        if n * size > len(self.buf) - self.pos:
            raise _BadReply(f"container of {n} elements in {len(self.buf) - self.pos} bytes")

    def _unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        try:
            values: tuple[Any, ...] = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise _BadReply("message ends early") from None
        self.pos += st.size
        return values

    def _advance(self, n: int) -> None:
        if n < 0:
            raise _BadReply(f"negative length {n}")
        if self.pos + n > len(self.buf):
            raise _BadReply(f"{n} bytes declared, {len(self.buf) - self.pos} left")
        self.pos += n

    def _take(self) -> bytes:
        (n,) = self._unpack(_I32)
        start = self.pos
        self._advance(n)
        return self.buf[start : self.pos]


# --- the connection ----------------------------------------------------------------------------


@final
class WireClient:
    """One blocking connection to a PubmonService (framed binary protocol); connects at once.

    Give ``unix_socket``, or ``host`` and ``port``; with ``ssl_context`` the TCP connection
    speaks TLS, and the server's certificate is checked against ``host`` as the context says
    (``ssl.create_default_context`` checks the name). ``timeout`` bounds connecting and each whole
    call. Failing to connect raises ``RpcError`` with the ``OSError`` as its ``__cause__``.
    ``call`` raises ``WireException`` for the IDL exceptions the method declares (the connection
    stays usable) and ``RpcError`` for everything else that goes wrong on the wire: transport
    errors, timeouts, TApplicationException replies (message kept, e.g. ``"PermissionDenied:
    ..."``), bad or mismatched replies (method name, seqid), frames over ``max_frame``. Those
    close the connection; later calls raise ``RpcError("...: closed")``.
    """

    def __init__(
        self,
        *,
        unix_socket: str | None = None,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 5.0,
        max_frame: int = 16 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if ssl_context is not None and host is None:
            raise ValueError("TLS needs host and port")
        if unix_socket is not None and host is None and port is None:
            self.where, tcp = unix_socket, None
        elif unix_socket is None and host is not None and port is not None:
            self.where, tcp = f"{host}:{port}", (host, port)
        else:
            raise ValueError("give either unix_socket or both host and port")
        self.timeout = timeout
        self.max_frame = max_frame
        self._seqid = 0
        try:
            if not timeout > 0:
                raise TimeoutError  # as an expired asyncio.timeout() would
            if tcp is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(self.where)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(tcp, timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if ssl_context is not None:
                    try:  # the handshake (and the name check) happen here, under the timeout
                        sock = ssl_context.wrap_socket(sock, server_hostname=tcp[0])
                    except BaseException:
                        sock.close()
                        raise
        except TimeoutError as e:
            raise RpcError(f"cannot connect to {self.where}: no answer within {timeout} s") from e
        except OSError as e:
            raise RpcError(f"cannot connect to {self.where}: {e}") from e
        self._sock: socket.socket | None = sock

    def __repr__(self) -> str:
        return f"<WireClient {self.where} {'open' if self._sock else 'closed'}>"

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def call(self, method: str, *args: object) -> Any:
        """Call ``method`` with positional IDL arguments; returns its decoded result (None for
        void and oneway methods). ValueError (unknown method) and TypeError (arguments that do
        not fit the IDL) leave the connection alone."""
        seqid = (self._seqid + 1) & 0x7FFFFFFF
        data = encode_call(method, seqid, args)
        sock = self._sock
        if sock is None:
            raise RpcError(f"{self.where}: closed")
        self._seqid = seqid
        deadline = time.monotonic() + self.timeout
        try:
            self._check_quiet(sock)
            sock.settimeout(self.timeout)
            sock.sendall(data)
            if S.METHODS[method][2]:  # oneway: no reply comes
                return None
            frame = self._read_frame(sock, deadline)
            return decode_reply(frame, method, seqid)
        except WireException:
            raise
        except TimeoutError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: no reply within {self.timeout} s") from e
        except OSError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: connection lost: {e}") from e
        except RpcError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: {e}") from e.__cause__
        except BaseException:
            self.close()  # interrupted mid-call: a late reply would answer the next call
            raise

    def _check_quiet(self, sock: socket.socket) -> None:
        # Between calls the server has nothing to say: bytes waiting now would be taken for the
        # next reply, and EOF means it hung up (restarted, or refused us) since the last call.
        sock.settimeout(0.0)
        try:
            # An SSLSocket cannot peek; a byte it reads here is an error below anyway. Its
            # SSLWantReadError means only TLS records came (TLS 1.3 session tickets): quiet.
            waiting = sock.recv(1) if hasattr(sock, "pending") else sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            if type(e).__name__ == "SSLWantReadError":
                return
            raise RpcError(f"closed: {e}") from e
        if not waiting:
            raise RpcError("closed by the server")
        raise RpcError("unexpected bytes from the server")

    def _read_frame(self, sock: socket.socket, deadline: float) -> bytes:
        (size,) = _I32.unpack(self._read(sock, 4, deadline))
        if not 0 < size <= self.max_frame:
            raise RpcError(f"reply frame of {size} bytes (limit {self.max_frame})")
        return self._read(sock, size, deadline)

    def _read(self, sock: socket.socket, n: int, deadline: float) -> bytes:
        # In chunks, so memory follows the bytes that arrive, not the length the peer declared.
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(min(n - len(buf), _CHUNK))
            if not chunk:
                raise RpcError("connection closed by the server")
            buf += chunk
        return bytes(buf)

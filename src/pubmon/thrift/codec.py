"""The Thrift binary protocol, once: a strict decoder for untrusted bytes and an encoder.

Used by everything in pubmon that speaks Thrift: the daemon's server (``server``), the async
client (``client``: probes, the HTTP counters, tests) and the CLI's blocking client
(``blocking``). It is driven by one schema form, the plain data in ``schema`` (generated from
``idl/*.thrift`` through thriftpy2 by ``tools/schema_gen.py``; a test fails when the two
disagree), and imports neither thriftpy2 nor asyncio, because ``pubmon status`` must start and
exit within 100 ms: importing asyncio costs ~50 ms of that and any thriftpy2 module ~40 ms.

Why one schema form and pluggable classes: the daemon's handlers build and raise thriftpy2's
generated classes (``idl.pubmon().PublisherInfo``, ``UnknownPublisher``), and its callers catch
them; the CLI cannot import them. So a ``Service`` is the schema of one service *bound* to the
classes decoded structs are made of: ``idl.bind(...)`` binds thriftpy2's classes (daemon, async
client), ``Service(name)`` binds this module's plain ``Struct`` and ``DeclaredException``
classes (CLI). Either way the same code reads and writes the bytes, by IDL field name: a
decoded struct is ``cls(**fields)`` (every IDL field given, None when unset), an encoded one is
read with ``getattr``. A struct is known by its class's ``__name__``, which is its IDL name for
thriftpy2's classes and ours alike.

Why not thriftpy2's own codecs (0.7.1, measured here): cybin's ``TCyBinaryProtocol`` mallocs a
declared string length (a 40-byte frame declaring 2 GiB costs 2 GiB of RSS); the pure-Python
codec trusts declared container sizes (``LIST<VOID>`` of 10**7 elements, a 12-byte payload,
spun 4.9 s of CPU) and its map reader misreads a wire ``STRING`` key type.

The rules (one set, for requests the server reads and replies the clients read):

- Only the strict (versioned) message header is accepted, and a message must use its bytes
  exactly: stray bytes after it are an error. Running out of bytes raises ``Incomplete``, which
  the async client's buffered transport reads as "wait for more".
- Lengths and counts are checked against the bytes actually present before anything is read or
  allocated: a string's length must fit in what is left; a container's count times the fewest
  bytes one element of its wire type can take (1 for a bool or a struct, 4 for a string, 6 for a
  map...) must fit too, so a 12-byte message cannot declare 2**31 elements. Negative lengths and
  counts and unknown wire types are errors. A decoded value therefore never costs more than a
  small multiple of the message's size.
- Nesting (structs and containers, counted together) is capped at ``MAX_DEPTH`` = 64,
  thriftpy2's limit, in the decoder, the skipper and the encoder.
- Frames: a 4-byte big-endian length, then one message. A length <= 0 or over the reader's cap
  is ``BadFrame``; the caps are the reader's (the server: 1 MiB, 16 KiB for TCP peers without a
  client certificate; the clients: 16 MiB by default).
- Unknown field ids are skipped (a newer peer may add fields). A known field whose wire type
  differs from the schema, including the element, key or value type of a container anywhere
  inside it, is skipped too and the field stays unset, as Thrift's generated code does: a peer
  built from another revision of the IDL stays readable, and a field that is unset is something
  every reader handles already (a reply whose result is unset is an error, "the reply carries
  no result"). Before, the CLI's decoder failed the whole reply instead, and the server's
  returned an empty container for a mistyped one (a value nobody sent).
- ``string`` is decoded as UTF-8 with invalid bytes backslash-escaped (``"a\\\\xffb"``), in
  method names too: a string field is always a ``str`` (the server's decoder returned ``bytes``
  for those before, so a handler got either type) and one bad byte in a log line does not
  lose the reply. ``binary`` is ``bytes``. Sets are decoded as lists, bools are any
  non-zero byte, enums are their i32.
- The encoder checks every value against its IDL type (``TypeError`` naming ``Struct.field``,
  out-of-range integers included; a struct must be of the class named as the IDL struct, or an
  ``Encoded``) before anything is sent; unset (None) fields are left out.
"""

from __future__ import annotations

__all__ = [
    "CALL",
    "EXCEPTION",
    "INTERNAL_ERROR",
    "MAX_DEPTH",
    "ONEWAY",
    "REPLY",
    "UNKNOWN",
    "UNKNOWN_METHOD",
    "ApplicationError",
    "BadFrame",
    "DeclaredException",
    "Encoded",
    "Incomplete",
    "Method",
    "ProtocolViolation",
    "Reader",
    "Service",
    "Struct",
    "encode_error",
    "encode_struct",
    "field_encoder",
    "frame_length",
    "plain_class",
]

import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, final

from pubmon.errors import PubmonError
from pubmon.thrift import schema as S

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pubmon.thrift.schema import Detail, Fields

MAX_DEPTH: Final = 64

# Message types.
CALL: Final = S.CALL
REPLY: Final = S.REPLY
EXCEPTION: Final = S.EXCEPTION
ONEWAY: Final = S.ONEWAY
# TApplicationException types (Apache Thrift, thriftpy2.thrift.TApplicationException).
UNKNOWN: Final = 0
UNKNOWN_METHOD: Final = 1
INTERNAL_ERROR: Final = 6

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
# TApplicationException's text when it carries no message (as thriftpy2's __str__ words it).
_APP_ERRORS = {
    1: "Unknown method",
    2: "Invalid message type",
    3: "Wrong method name",
    4: "Bad sequence ID",
    5: "Missing result",
}


class ProtocolViolation(Exception):
    """The bytes are not a well-formed Thrift binary message of the expected shape."""


class Incomplete(ProtocolViolation):
    """The message runs past the end of the bytes given (truncated, or not all received yet)."""


class BadFrame(ProtocolViolation):
    """A frame length that is zero, negative or over the limit."""


class _Mismatch(Exception):
    """A container inside a field has other element types than the schema says: skip the field."""


class ApplicationError(Exception):
    """A ``TApplicationException`` the peer answered with: ``type`` (``UNKNOWN_METHOD``, ...) and
    ``message``; its text is the message, or the type's name when there is none."""

    def __init__(self, type: int | None = None, message: str | None = None) -> None:
        default = "Default (unknown) TApplicationException"
        super().__init__(message or _APP_ERRORS.get(type or 0, default))
        self.type = type or 0
        self.message = message or ""


class Struct:
    """A decoded IDL struct (of a ``Service`` bound to the plain classes): ``type(s).__name__``
    is its IDL name and every IDL field is an attribute, None when unset."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]


class DeclaredException(PubmonError):
    """An exception the IDL declares (``UnknownPublisher``...), as decoded with the plain classes.

    ``name`` is its IDL name, its IDL fields are attributes, ``message`` is its ``message`` field
    ("" when it has none) and ``fields`` is a ``Struct`` of them all.
    """

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        message = fields.get("message")
        self.message = message if isinstance(message, str) else ""
        self.fields = Struct(**fields)
        name = type(self).__name__
        super().__init__(f"{name}: {self.message}" if self.message else name)

    @property
    def name(self) -> str:
        return type(self).__name__


_PLAIN: dict[str, type] = {}


def plain_class(name: str) -> type:
    """The plain class for IDL struct or exception ``name`` (one per name and process)."""
    cls = _PLAIN.get(name)
    if cls is None:
        if name not in S.STRUCTS:
            raise KeyError(f"no struct {name!r} in the schema")
        base = DeclaredException if name in S.EXCEPTIONS else Struct
        cls = _PLAIN[name] = type(name, (base,), {"__module__": __name__, "__qualname__": name})
    return cls


@final
class Method:
    """One method of a bound service, as it travels."""

    __slots__ = ("arg_names", "args", "denied", "name", "oneway", "result", "throws", "void")

    def __init__(self, name: str, spec: S.MethodDef, classes: Callable[[str], type]) -> None:
        self.name = name
        self.args, self.result, self.oneway = spec
        self.arg_names = tuple(f[1] for f in self.args)  # IDL order: the handler's positions
        self.void = all(f[0] != 0 for f in self.result)
        # (exception class, result field) for every exception the method declares.
        self.throws: tuple[tuple[type, str], ...] = tuple(
            (classes(_name(d)), f) for fid, f, _, d in self.result if fid != 0
        )
        # The declared exception named PermissionDenied, if any: how the server refuses a call.
        self.denied = next(
            ((c, f) for c, f in self.throws if c.__name__ == "PermissionDenied"), None
        )

    def __repr__(self) -> str:
        return f"<Method {self.name}>"


def _name(detail: Detail) -> str:
    assert isinstance(detail, str)
    return detail


@final
class Service:
    """The schema of service ``name`` bound to the classes its structs decode to.

    ``classes(idl_name)`` gives the class of an IDL struct or exception; by default the plain
    ``Struct``/``DeclaredException`` subclasses of this module (``plain_class``).
    """

    def __init__(self, name: str, classes: Callable[[str], type] = plain_class) -> None:
        spec = S.SERVICES.get(name)
        if spec is None:
            raise KeyError(f"no service {name!r} in the schema")
        self.name = name
        self.classes = classes
        self.methods = {m: Method(m, d, classes) for m, d in spec.items()}
        self._makers: dict[str, tuple[type, _Plan, bool]] = {}

    def __repr__(self) -> str:
        return f"<Service {self.name}>"

    def method(self, name: str) -> Method:
        """Method ``name``; ValueError when the service has none."""
        m = self.methods.get(name)
        if m is None:
            raise ValueError(f"no method {name!r} in {self.name}")
        return m

    # --- encoding -----------------------------------------------------------------------------

    def encode_call(
        self, method: str, seqid: int, args: Sequence[object], *, framed: bool = True
    ) -> bytes:
        """The CALL (ONEWAY for oneway methods) of ``method`` with positional IDL ``args``;
        missing trailing arguments and None are left unset.

        Raises ValueError for a method the service lacks, TypeError for too many arguments or a
        value that does not fit its IDL type.
        """
        m = self.method(method)
        if len(args) > len(m.args):
            raise TypeError(f"{method}() takes {len(m.args)} arguments, got {len(args)}")
        values = dict(zip(m.arg_names, args, strict=False))
        mtype = S.ONEWAY if m.oneway else S.CALL
        return _message(method, mtype, seqid, f"{method}_args", m.args, values, framed)

    def encode_reply(
        self, method: Method, seqid: int, field: str | None = None, value: object = None
    ) -> bytes:
        """The framed REPLY to ``method``: ``field`` ("success", or the result field of a
        declared exception) set to ``value``, or nothing (a void method's answer).

        Raises TypeError/ValueError when ``value`` does not fit; nothing is sent then, so the
        caller may answer with an error instead.
        """
        values = {} if field is None else {field: value}
        return _message(
            method.name, S.REPLY, seqid, f"{method.name}_result", method.result, values, True
        )

    # --- decoding -----------------------------------------------------------------------------

    def decode_call(self, data: bytes) -> tuple[str, int, int, Method | None, Reader]:
        """(name, message type, seqid, method or None when unknown, reader positioned on the
        arguments) of a request; see ``decode_args``."""
        reader = Reader(data, self)
        name, mtype, seqid = reader.message_begin()
        if mtype not in (S.CALL, S.ONEWAY):
            raise ProtocolViolation(f"message type {mtype} from a client")
        return name, mtype, seqid, self.methods.get(name), reader

    def decode_args(self, reader: Reader, method: Method) -> list[Any]:
        """The positional arguments of a call (unset ones None); the message must end there."""
        values = reader.read_fields(method.args, MAX_DEPTH)
        reader.expect_end()
        return [values[a] for a in method.arg_names]

    def decode_reply(self, data: bytes, method: Method, seqid: int) -> Any:
        """The value a reply (without its frame length) to ``method`` #``seqid`` carries: the
        success value, or None for a void or oneway method.

        Raises the declared exception object (of the bound class) the reply carries,
        ``ApplicationError`` for a TApplicationException, and ``ProtocolViolation`` for a reply
        to another method or seqid, bytes that are not a well-formed reply, or a reply of a
        non-void method that carries no result.
        """
        reader = Reader(data, self)
        name, mtype, got = reader.message_begin()
        if name != method.name or got != seqid:
            raise ProtocolViolation(f"reply to {name!r} #{got}, expected {method.name!r} #{seqid}")
        if mtype == S.EXCEPTION:
            app = reader.read_fields(S.APPLICATION_EXCEPTION, MAX_DEPTH)
            reader.expect_end()
            raise ApplicationError(app["type"], app["message"])
        if mtype != S.REPLY:
            raise ProtocolViolation(f"message type {mtype} in a reply")
        result = reader.read_fields(method.result, MAX_DEPTH)
        reader.expect_end()
        if (success := result.get("success")) is not None:
            return success
        for _, field in method.throws:
            if (err := result[field]) is not None:
                raise err
        if not method.void:
            raise ProtocolViolation("the reply carries no result")
        return None

    def _maker(self, name: str) -> tuple[type, _Plan, bool]:
        known = self._makers.get(name)
        if known is None:
            cls = self.classes(name)
            plain = isinstance(cls, type) and issubclass(cls, Struct)
            known = self._makers[name] = (cls, _plan(S.STRUCTS[name]), plain)
        return known


# How to read a field: (name, wire type, ttype, detail, struct.Struct for scalars).
_Slot = tuple[str, int, int, "Detail", struct.Struct | None]
# How to write one: (name, field header bytes, ttype, detail, struct.Struct for scalars).
_Write = tuple[str, bytes, int, "Detail", struct.Struct | None]


@final
class _Plan:
    """A struct's fields arranged for the decoder (by id) and the encoder (in schema order)."""

    __slots__ = ("fields", "slots", "unset", "writes")

    def __init__(self, fields: Fields) -> None:
        self.fields = fields  # keeps the id of `fields` (the _PLANS key) taken
        self.slots: dict[int, _Slot] = {
            fid: (f, _WIRE.get(t, t), t, d, _SCALARS.get(t)) for fid, f, t, d in fields
        }
        self.unset: dict[str, None] = dict.fromkeys(f[1] for f in fields)
        self.writes: tuple[_Write, ...] = tuple(
            (f, _FIELD.pack(_WIRE.get(t, t), fid), t, d, _SCALARS.get(t)) for fid, f, t, d in fields
        )


_PLANS: dict[int, _Plan] = {}


def _plan(fields: Fields) -> _Plan:
    plan = _PLANS.get(id(fields))
    if plan is None:
        plan = _PLANS[id(fields)] = _Plan(fields)
    return plan


def frame_length(prefix: bytes | bytearray | memoryview, limit: int) -> int:
    """The length a 4-byte frame prefix declares; BadFrame when it is <= 0 or over ``limit``."""
    (size,) = _I32.unpack_from(prefix)
    if not 0 < size <= limit:
        raise BadFrame(f"frame of {size} bytes (limit {limit})")
    return int(size)


# --- decoding ----------------------------------------------------------------------------------


@final
class Reader:
    """Reads one message from ``buf``; every method advances ``pos`` or raises
    ProtocolViolation (Incomplete when it would have to read past the end)."""

    __slots__ = ("buf", "pos", "service")

    def __init__(self, buf: bytes, service: Service) -> None:
        self.buf = buf
        self.pos = 0
        self.service = service

    def message_begin(self) -> tuple[str, int, int]:
        """(name, message type, seqid)."""
        (head,) = self._unpack(_U32)
        if head & _VERSION_MASK != _VERSION_1:
            raise ProtocolViolation(f"bad message header 0x{head:08x}")
        name = self._take().decode(errors="backslashreplace")
        (seqid,) = self._unpack(_I32)
        return name, head & 0xFF, seqid

    def expect_end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation(f"{len(self.buf) - self.pos} stray bytes after the message")

    def read_fields(self, fields: Fields, depth: int) -> dict[str, Any]:
        """Every field of a struct (unset ones None), by name."""
        plan = _plan(fields)
        return self._fields(plan.slots, plan.unset.copy(), depth)

    def _fields(
        self, slots: dict[int, _Slot], values: dict[str, Any], depth: int
    ) -> dict[str, Any]:
        if depth <= 0:
            raise ProtocolViolation("structs nested too deeply")
        buf = self.buf
        while True:
            if self.pos < len(buf) and buf[self.pos] == S.STOP:
                self.pos += 1
                return values
            ftype, fid = self._unpack(_FIELD)
            slot = slots.get(fid)
            if slot is None:
                self._skip(ftype, depth - 1)  # a field this side does not know: a newer peer
                continue
            name, wtype, ttype, detail, scalar = slot
            if ftype != wtype:
                self._skip(ftype, depth - 1)  # another type than ours: left unset
                continue
            # Scalars and strings inline: 1000 PublisherInfo are 11000 of them.
            if scalar is not None:
                (values[name],) = self._unpack(scalar)
            elif ttype == S.STRING:
                values[name] = self._take().decode(errors="backslashreplace")
            elif ttype in (S.LIST, S.SET, S.MAP):
                start = self.pos
                try:
                    values[name] = self._value(ttype, detail, depth - 1)
                except _Mismatch:
                    self.pos = start
                    self._skip(ftype, depth - 1)
            else:
                values[name] = self._value(ttype, detail, depth - 1)

    def _struct(self, name: str, depth: int) -> Any:
        cls, plan, plain = self.service._maker(name)
        values = self._fields(plan.slots, plan.unset.copy(), depth)
        if plain:  # our own Struct: its __dict__ is the fields (1000 PublisherInfo for the CLI)
            obj: Any = object.__new__(cls)
            obj.__dict__ = values
            return obj
        return cls(**values)

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
            raise ProtocolViolation("values nested too deeply")
        if ttype == S.STRUCT:
            return self._struct(_name(detail), depth)
        if ttype == S.LIST or ttype == S.SET:
            assert isinstance(detail, tuple) and isinstance(detail[0], int)
            etype, esub = detail
            wtype, n = self._unpack(_LIST)
            self._check_count(n, wtype)
            if wtype != _WIRE.get(etype, etype):
                raise _Mismatch
            return [self._value(etype, esub, depth - 1) for _ in range(n)]
        if ttype == S.MAP:
            assert isinstance(detail, tuple) and isinstance(detail[0], tuple)
            assert isinstance(detail[1], tuple)
            (ktype, ksub), (vtype, vsub) = detail
            wk, wv, n = self._unpack(_MAP)
            self._check_count(n, wk, wv)
            if wk != _WIRE.get(ktype, ktype) or wv != _WIRE.get(vtype, vtype):
                raise _Mismatch
            out = {}
            for _ in range(n):
                key = self._value(ktype, ksub, depth - 1)
                out[key] = self._value(vtype, vsub, depth - 1)
            return out
        raise ProtocolViolation(f"unsupported type {ttype} in the schema")

    def _skip(self, ttype: int, depth: int) -> None:
        """Step over one value of wire type ``ttype`` without building it."""
        if ttype in _SCALARS or ttype == S.BOOL:
            self._advance(_MIN_SIZE[ttype])
        elif ttype == S.STRING:
            (n,) = self._unpack(_I32)
            self._advance(n)
        elif ttype not in _MIN_SIZE:
            raise ProtocolViolation(f"unknown type {ttype}")
        elif depth <= 0:
            raise ProtocolViolation("values nested too deeply")
        elif ttype == S.STRUCT:
            while True:
                (ftype,) = self._unpack(_I8)
                if ftype == S.STOP:
                    return
                self._advance(2)
                self._skip(ftype, depth - 1)
        elif ttype == S.LIST or ttype == S.SET:
            etype, n = self._unpack(_LIST)
            self._check_count(n, etype)
            for _ in range(n):
                self._skip(etype, depth - 1)
        else:
            ktype, vtype, n = self._unpack(_MAP)
            self._check_count(n, ktype, vtype)
            for _ in range(n):
                self._skip(ktype, depth - 1)
                self._skip(vtype, depth - 1)

    def _check_count(self, n: int, *types: int) -> None:
        # Refuse a count the remaining bytes cannot hold before any loop runs or anything is
        # allocated: a 12-byte message may declare 2**31 elements.
        size = 0
        for t in types:
            if t not in _MIN_SIZE:
                raise ProtocolViolation(f"unknown element type {t}")
            size += _MIN_SIZE[t]
        if n < 0:
            raise ProtocolViolation(f"negative container size {n}")
        if n * size > len(self.buf) - self.pos:
            raise Incomplete(f"container of {n} elements in {len(self.buf) - self.pos} bytes")

    def _unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        try:
            values: tuple[Any, ...] = st.unpack_from(self.buf, self.pos)
        except struct.error:
            raise Incomplete("message ends early") from None
        self.pos += st.size
        return values

    def _advance(self, n: int) -> None:
        if n < 0:
            raise ProtocolViolation(f"negative length {n}")
        if self.pos + n > len(self.buf):
            raise Incomplete(f"{n} bytes declared, {len(self.buf) - self.pos} left")
        self.pos += n

    def _take(self) -> bytes:
        (n,) = self._unpack(_I32)
        start = self.pos
        self._advance(n)
        return bytes(self.buf[start : self.pos])


# --- encoding ----------------------------------------------------------------------------------


class Encoded(bytes):
    """A struct value already encoded (fields, then STOP): written as is where one is expected.

    For replies that repeat mostly unchanged structs (1000 PublisherInfo in listPublishers).
    """


def encode_error(name: str, seqid: int, kind: int, message: str) -> bytes:
    """A framed TApplicationException reply."""
    values = {"message": message, "type": kind}
    return _message(
        name, S.EXCEPTION, seqid, "TApplicationException", S.APPLICATION_EXCEPTION, values, True
    )


def encode_struct(obj: object, *, skip: str = "") -> Encoded:
    """``obj`` (an IDL struct, known by its class name) encoded, leaving out field ``skip`` (to
    be sent fresh, see ``field_encoder``)."""
    name = type(obj).__name__
    out = bytearray()
    try:
        fields = _struct_fields(name)
        _write_fields(out, name, fields, lambda a: getattr(obj, a, None), MAX_DEPTH, skip)
    except struct.error as e:
        raise TypeError(f"cannot encode {name}: {e}") from e
    return Encoded(out)


def field_encoder(cls: type, attr: str) -> Callable[[Any], bytes]:
    """Encodes one numeric field of IDL struct ``cls`` (header and value). Thrift fields may come
    in any order, so these bytes put in front of an ``encode_struct(..., skip=attr)`` make the
    struct."""
    found = [(fid, t) for fid, f, t, _ in _struct_fields(cls.__name__) if f == attr]
    if not found or found[0][1] not in _SCALARS:
        raise KeyError(f"{cls.__name__} has no numeric field {attr!r}")
    fid, ttype = found[0]
    header = _FIELD.pack(ttype, fid)
    pack = _SCALARS[ttype].pack
    return lambda value: header + pack(value)


def _struct_fields(name: str) -> Fields:
    fields = S.STRUCTS.get(name)
    if fields is None:
        raise TypeError(f"{name} is not an IDL struct")
    return fields


def _message(
    name: str, mtype: int, seqid: int, where: str, fields: Fields, values: Mapping[str, Any],
    framed: bool,
) -> bytes:  # fmt: skip
    out = bytearray(4) if framed else bytearray()
    raw_name = name.encode()
    out += _U32.pack(_VERSION_1 | mtype)
    out += _I32.pack(len(raw_name))
    out += raw_name
    out += _I32.pack(seqid)
    try:
        _write_fields(out, where, fields, values.get, MAX_DEPTH)
    except struct.error as e:
        raise TypeError(f"cannot encode {name}: {e}") from e
    if framed:
        _I32.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def _write_fields(
    out: bytearray, where: str, fields: Fields, get: Callable[[str], Any], depth: int,
    skip: str = "",
) -> None:  # fmt: skip
    if depth <= 0:
        raise ValueError("structs nested too deeply")
    for name, header, ttype, detail, scalar in _plan(fields).writes:
        value = get(name)
        if value is None or name == skip:
            continue
        out += header
        try:
            if scalar is not None:  # inline: 1000 PublisherInfo are 11000 scalars and strings
                out += scalar.pack(value)
            elif ttype == S.STRING and type(value) is str:
                raw = value.encode()
                out += _I32.pack(len(raw))
                out += raw
            else:
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
        name = _name(detail)
        if type(value) is Encoded:
            out += value
            return
        if type(value).__name__ != name:
            raise TypeError(f"expected a {name}, got {type(value).__name__}")
        _write_fields(out, name, S.STRUCTS[name], lambda a: getattr(value, a, None), depth)
    elif ttype == S.LIST or ttype == S.SET:
        if not isinstance(value, list | tuple | set | frozenset):
            raise TypeError(f"expected a list or set, got {type(value).__name__}")
        assert isinstance(detail, tuple) and isinstance(detail[0], int)
        etype, esub = detail
        out += _LIST.pack(_WIRE.get(etype, etype), len(value))
        for item in value:
            _write_value(out, etype, esub, item, depth - 1)
    elif ttype == S.MAP:
        if not isinstance(value, dict):
            raise TypeError(f"expected a dict, got {type(value).__name__}")
        assert isinstance(detail, tuple) and isinstance(detail[0], tuple)
        assert isinstance(detail[1], tuple)
        (ktype, ksub), (vtype, vsub) = detail
        out += _MAP.pack(_WIRE.get(ktype, ktype), _WIRE.get(vtype, vtype), len(value))
        for key, item in value.items():
            _write_value(out, ktype, ksub, key, depth - 1)
            _write_value(out, vtype, vsub, item, depth - 1)
    else:
        raise TypeError(f"unsupported type {ttype} in the schema")

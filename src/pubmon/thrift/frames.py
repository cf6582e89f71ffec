"""Thrift binary-protocol messages: a strict decoder for untrusted bytes and a plain encoder.

The codec works on whole messages in memory and on thriftpy2's generated classes
(``thrift_spec``), so it produces and accepts exactly what thriftpy2's codecs do on the wire.
``rpc.py`` owns the connections; it hands complete frames (or, in buffered mode, everything
received so far) to ``Reader``, and builds replies with ``encode_message``.

Why not thriftpy2's own codecs (0.7.1, measured here):

- cybin ``TCyBinaryProtocol`` mallocs a declared string length: a 40-byte frame declaring 2 GiB
  costs 2 GiB of RSS (reference/thrift.md §2).
- The pure-Python ``protocol.binary`` codec trusts declared container sizes and skips unknown
  element types without reading a byte: ``LIST<VOID>`` with 10**7 elements, a 12-byte payload,
  spun 4.9 s of CPU; 2**31 would spin for minutes. Its map reader also swaps a wire ``STRING`` key
  type for the spec's type and then reads misaligned bytes.
- Importing ``thriftpy2.protocol`` costs ~21 ms of CLI start time.

Here every length and count is checked against the bytes actually present before anything is
read or allocated, unknown types are errors, nesting is capped at 64 (thriftpy2's limit), and
running out of bytes raises ``Incomplete`` (a ``ProtocolViolation``), which the buffered client
uses to mean "read more".
"""

from __future__ import annotations

__all__ = [
    "MAX_DEPTH",
    "BadFrame",
    "Encoded",
    "Incomplete",
    "Method",
    "ProtocolViolation",
    "Reader",
    "decode_reply",
    "encode_error",
    "encode_message",
    "encode_struct",
    "field_encoder",
    "methods",
]

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thriftpy2.thrift import TApplicationException, TMessageType, TPayload, TType

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

_SCALARS = {
    TType.BYTE: _I8,
    TType.I16: _I16,
    TType.I32: _I32,
    TType.I64: _I64,
    TType.DOUBLE: _DOUBLE,
}
# Bytes taken by fixed-size values, for skipping.
_FIXED = {TType.BOOL: 1, **{t: s.size for t, s in _SCALARS.items()}}
# thriftpy2 spells `binary` as BINARY (18) in specs but sends it as STRING (11), like Apache.
_WIRE = {TType.BINARY: TType.STRING}
_KNOWN = frozenset(
    {*_FIXED, TType.STRING, TType.STRUCT, TType.MAP, TType.SET, TType.LIST},
)


class ProtocolViolation(Exception):
    """The bytes are not a well-formed Thrift binary message of the expected shape."""


class Incomplete(ProtocolViolation):
    """The message runs past the end of the bytes given (truncated, or not all received yet)."""


class BadFrame(ProtocolViolation):
    """A frame length that is zero, negative or over the limit."""


@dataclass(frozen=True, slots=True)
class Method:
    """One service method as it travels: its payload classes and the exceptions it declares."""

    name: str
    args_cls: Any
    arg_names: tuple[str, ...]  # in IDL order, which is also the handler's positional order
    result_cls: Any
    oneway: bool
    throws: tuple[tuple[type[BaseException], str], ...]  # (IDL exception class, result field)
    denied: tuple[Any, str] | None  # the declared exception class named PermissionDenied


def methods(service: type) -> dict[str, Method]:
    """Every method of a thriftpy2 service class, inherited (``extends``) ones included."""
    table = {}
    for name in service.thrift_services:  # type: ignore[attr-defined]
        args_cls = getattr(service, f"{name}_args")
        result_cls = getattr(service, f"{name}_result")
        throws = tuple((f[2], f[1]) for fid, f in result_cls.thrift_spec.items() if fid != 0)
        table[name] = Method(
            name=name,
            args_cls=args_cls,
            arg_names=tuple(f[1] for f in args_cls.thrift_spec.values()),
            result_cls=result_cls,
            oneway=bool(result_cls.oneway),
            throws=throws,
            denied=next(((c, f) for c, f in throws if c.__name__ == "PermissionDenied"), None),
        )
    return table


def decode_reply(data: bytes, method: Method, seqid: int) -> Any:
    """The result struct of a reply to ``method`` #``seqid``, or the TApplicationException it
    carries. A reply to another method or seqid is a ProtocolViolation."""
    msg = Reader(data)
    name, mtype, got = msg.message_begin()
    if name != method.name or got != seqid:
        raise ProtocolViolation(f"reply to {name!r} #{got}, expected {method.name!r} #{seqid}")
    if mtype == TMessageType.EXCEPTION:
        result = msg.read_struct(TApplicationException)
    elif mtype == TMessageType.REPLY:
        result = msg.read_struct(method.result_cls)
    else:
        raise ProtocolViolation(f"message type {mtype} in a reply")
    msg.expect_end()
    return result


def _wire(ttype: int) -> int:
    return _WIRE.get(ttype, ttype)


def _split(spec: Any) -> tuple[int, Any]:
    """A container's element spec is either a bare type or ``(type, subspec)``."""
    return (spec, None) if isinstance(spec, int) else (spec[0], spec[1])


class Reader:
    """Decodes one message from ``buf`` starting at ``pos``; every method advances ``pos``.

    Raises ``ProtocolViolation`` for malformed input and ``Incomplete`` when it would have to read
    past ``len(buf)``; it never allocates more than a small multiple of ``len(buf)``.
    """

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def message_begin(self) -> tuple[str, int, int]:
        """(name, message type, seqid). Only the strict (versioned) header is accepted."""
        (head,) = self._unpack(_U32)
        if head & _VERSION_MASK != _VERSION_1:
            raise ProtocolViolation(f"bad message header 0x{head:08x}")
        try:
            name = self._take().decode()
        except UnicodeDecodeError as e:
            raise ProtocolViolation("method name is not UTF-8") from e
        (seqid,) = self._unpack(_I32)
        return name, head & 0xFF, seqid

    def read_struct(self, cls: type[TPayload], depth: int = MAX_DEPTH) -> Any:
        """A new ``cls()`` with the fields found; unknown or mistyped fields are skipped."""
        if depth <= 0:
            raise ProtocolViolation("structs nested too deeply")
        obj = cls()
        spec = cls.thrift_spec
        while True:
            (ftype,) = self._unpack(_I8)
            if ftype == TType.STOP:
                return obj
            (fid,) = self._unpack(_I16)
            field = spec.get(fid)
            if field is None or _wire(field[0]) != ftype:
                self.skip(ftype, depth - 1)
                continue
            sub = field[2] if len(field) == 4 else None
            setattr(obj, field[1], self._value(field[0], sub, depth - 1))

    def expect_end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolViolation(f"{len(self.buf) - self.pos} stray bytes after the message")

    def skip(self, ttype: int, depth: int) -> None:
        """Step over one value of wire type ``ttype`` without building it."""
        size = _FIXED.get(ttype)
        if size is not None:
            self._advance(size)
        elif ttype == TType.STRING:
            (n,) = self._unpack(_I32)
            self._advance(n)
        elif depth <= 0:
            raise ProtocolViolation("values nested too deeply")
        elif ttype == TType.STRUCT:
            while True:
                (ftype,) = self._unpack(_I8)
                if ftype == TType.STOP:
                    return
                self._advance(2)
                self.skip(ftype, depth - 1)
        elif ttype in (TType.LIST, TType.SET):
            etype, n = self._unpack(_LIST)
            self._check_count(n, etype)
            for _ in range(n):
                self.skip(etype, depth - 1)
        elif ttype == TType.MAP:
            ktype, vtype, n = self._unpack(_MAP)
            self._check_count(n, ktype, vtype)
            for _ in range(n):
                self.skip(ktype, depth - 1)
                self.skip(vtype, depth - 1)
        else:
            raise ProtocolViolation(f"unknown type {ttype}")

    def _value(self, ttype: int, spec: Any, depth: int) -> Any:
        scalar = _SCALARS.get(ttype)
        if scalar is not None:
            return self._unpack(scalar)[0]
        if ttype == TType.STRING:
            raw = self._take()
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return raw  # what thriftpy2 does (decode_response=True, strict_decode=False)
        if ttype == TType.BOOL:
            return self._unpack(_I8)[0] != 0
        if ttype == TType.BINARY:
            return self._take()
        if depth <= 0:
            raise ProtocolViolation("values nested too deeply")
        if ttype == TType.STRUCT:
            return self.read_struct(spec, depth)
        if ttype in (TType.LIST, TType.SET):
            etype, esub = _split(spec)
            wtype, n = self._unpack(_LIST)
            self._check_count(n, wtype)
            if wtype != _wire(etype):
                for _ in range(n):
                    self.skip(wtype, depth - 1)
                return []
            return [self._value(etype, esub, depth - 1) for _ in range(n)]
        if ttype == TType.MAP:
            (ktype, ksub), (vtype, vsub) = _split(spec[0]), _split(spec[1])
            wk, wv, n = self._unpack(_MAP)
            self._check_count(n, wk, wv)
            if wk != _wire(ktype) or wv != _wire(vtype):
                for _ in range(n):
                    self.skip(wk, depth - 1)
                    self.skip(wv, depth - 1)
                return {}
            out = {}
            for _ in range(n):
                key = self._value(ktype, ksub, depth - 1)
                out[key] = self._value(vtype, vsub, depth - 1)
            return out
        raise ProtocolViolation(f"unsupported type {ttype} in spec")

    def _check_count(self, n: int, *types: int) -> None:
        # Every known type takes at least one byte per value, so a count larger than the bytes
        # left is refused before any loop runs; unknown types (which would take none) are errors.
        for t in types:
            if t not in _KNOWN:
                raise ProtocolViolation(f"unknown element type {t}")
        if n < 0:
            raise ProtocolViolation(f"negative container size {n}")
        if n * len(types) > len(self.buf) - self.pos:
            raise Incomplete(f"container of {n} elements, {len(self.buf) - self.pos} bytes left")

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


def encode_message(name: str, mtype: int, seqid: int, payload: TPayload, *, framed: bool) -> bytes:
    """One complete message (with its 4-byte length prefix when ``framed``).

    Raises ``TypeError``/``ValueError`` when a field value does not fit its declared type; nothing
    is sent in that case, so the caller may answer with an error instead.
    """
    out = bytearray(4) if framed else bytearray()
    raw_name = name.encode()
    out += _U32.pack(_VERSION_1 | mtype)
    out += _I32.pack(len(raw_name))
    out += raw_name
    out += _I32.pack(seqid)
    try:
        _write_struct(out, payload, MAX_DEPTH)
    except struct.error as e:
        raise TypeError(f"cannot encode {name}: {e}") from e
    if framed:
        _I32.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def encode_error(name: str, seqid: int, kind: int, message: str) -> bytes:
    """A framed TApplicationException reply."""
    err = TApplicationException(kind, message)
    return encode_message(name, TMessageType.EXCEPTION, seqid, err, framed=True)


class Encoded(bytes):
    """A struct value already encoded (fields, then STOP): written as is where one is expected.

    For replies that repeat mostly unchanged structs (1000 PublisherInfo in listPublishers).
    """


def encode_struct(obj: TPayload, *, skip: str = "") -> Encoded:
    """`obj` encoded, leaving out field `skip` (to be sent fresh, see `field_encoder`)."""
    out = bytearray()
    try:
        _write_struct(out, obj, MAX_DEPTH, skip=skip)
    except struct.error as e:
        raise TypeError(f"cannot encode {type(obj).__name__}: {e}") from e
    return Encoded(out)


def field_encoder(cls: type, attr: str) -> Callable[[Any], bytes]:
    """Encodes one numeric field of `cls` (header and value). Thrift fields may come in any
    order, so these bytes put in front of an `encode_struct(..., skip=attr)` make the struct."""
    found = [(header, ttype) for name, header, ttype, _ in _plan(cls) if name == attr]
    if not found or found[0][1] not in _SCALARS:
        raise KeyError(f"{cls.__name__} has no numeric field {attr!r}")
    header, ttype = found[0]
    pack = _SCALARS[ttype].pack
    return lambda value: header + pack(value)


# Per struct class: (attribute, field header bytes, type, subspec) for each field.
_PLANS: dict[type, tuple[tuple[str, bytes, int, Any], ...]] = {}


def _plan(cls: type) -> tuple[tuple[str, bytes, int, Any], ...]:
    plan = _PLANS.get(cls)
    if plan is None:
        spec: dict[int, tuple[Any, ...]] = cls.thrift_spec  # type: ignore[attr-defined]
        plan = _PLANS[cls] = tuple(
            (f[1], _FIELD.pack(_wire(f[0]), fid), f[0], f[2] if len(f) == 4 else None)
            for fid, f in spec.items()
        )
    return plan


def _write_struct(out: bytearray, obj: TPayload, depth: int, skip: str = "") -> None:
    if depth <= 0:
        raise ValueError("structs nested too deeply")
    for name, header, ttype, sub in _plan(type(obj)):
        value = getattr(obj, name, None)
        if value is None or name == skip:
            continue  # unset optional (thriftpy2 also drops unset required fields)
        out += header
        try:
            _write_value(out, ttype, sub, value, depth - 1)
        except (TypeError, struct.error) as e:
            raise TypeError(f"{type(obj).__name__}.{name}: {e}") from None
    out.append(TType.STOP)


def _write_value(out: bytearray, ttype: int, spec: Any, value: Any, depth: int) -> None:
    if ttype == TType.STRING or ttype == TType.BINARY:
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
    elif ttype == TType.BOOL:
        out.append(1 if value else 0)
    elif depth <= 0:
        raise ValueError("values nested too deeply")
    elif ttype == TType.STRUCT:
        if type(value) is Encoded:
            out += value
            return
        if not isinstance(value, spec):
            raise TypeError(f"expected {spec.__name__}, got {type(value).__name__}")
        _write_struct(out, value, depth)
    elif ttype == TType.LIST or ttype == TType.SET:
        if not isinstance(value, list | tuple | set | frozenset):
            raise TypeError(f"expected a list or set, got {type(value).__name__}")
        etype, esub = _split(spec)
        out += _LIST.pack(_wire(etype), len(value))
        for item in value:
            _write_value(out, etype, esub, item, depth - 1)
    elif ttype == TType.MAP:
        if not isinstance(value, dict):
            raise TypeError(f"expected a dict, got {type(value).__name__}")
        (ktype, ksub), (vtype, vsub) = _split(spec[0]), _split(spec[1])
        out += _MAP.pack(_wire(ktype), _wire(vtype), len(value))
        for key, item in value.items():
            _write_value(out, ktype, ksub, key, depth - 1)
            _write_value(out, vtype, vsub, item, depth - 1)
    else:
        raise TypeError(f"unsupported type {ttype} in spec")

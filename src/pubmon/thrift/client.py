"""The async Thrift client: one connection, calls one at a time, every failure an `RpcError`.

For the daemon (probes, the HTTP counters) and tests; the CLI has the blocking twin in
``blocking``. Both use ``codec`` for the bytes and its rules (frame caps, strict decoding)::

    async with await ThriftClient.connect(svc, unix_socket=path, timeout=2) as client:
        status = await client.call("getStatus")

``svc`` is a service of the IDL: its thriftpy2 class (``idl.pubmon().PubmonService``) or name,
or a ``codec.Service``. Decoded structs and declared exceptions are thriftpy2's generated
classes (``idl.bind``) unless a ``codec.Service`` bound to other classes is given.
"""

from __future__ import annotations

__all__ = ["ThriftClient"]

import asyncio
import os
import ssl
from typing import Any, Literal, Self, final

from pubmon.errors import RpcError
from pubmon.thrift import idl
from pubmon.thrift.codec import (
    ApplicationError,
    BadFrame,
    Incomplete,
    Method,
    ProtocolViolation,
    Service,
    frame_length,
)


class _Replies(asyncio.Protocol):
    """The client's end of a connection: buffers reply bytes and wakes the call waiting for them.

    A protocol rather than streams: one future per wait and no readexactly machinery.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or EOFError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        self.closed.set_result(None)

    async def more(self) -> None:
        """Wait until more bytes arrive; raise once the connection is gone."""
        if self.lost is not None:
            raise self.lost
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


@final
class ThriftClient:
    """One connection to a Thrift server; calls go one at a time (concurrent callers queue).

    ``timeout`` bounds connecting and each whole call. Transport errors, timeouts, bad or
    mismatched replies (method name, seqid) and ``TApplicationException`` replies raise
    ``errors.RpcError`` and throw the connection away, as does cancelling a call mid-way; later
    calls raise ``RpcError("...: closed")``. IDL exceptions the method declares are raised as
    themselves and keep the connection. ``transport="buffered"`` speaks the unframed transport
    (thriftpy2's default), meant for probing children, whose replies are small; replies over
    ``max_frame`` bytes are refused in either mode.
    """

    def __init__(
        self, service: type | str | Service, replies: _Replies, *,
        where: str, timeout: float, framed: bool, max_frame: int,
    ) -> None:  # fmt: skip
        """Use ``await ThriftClient.connect(...)``."""
        self._service = service if isinstance(service, Service) else idl.bind(service)
        self._replies: _Replies | None = replies
        self._where = where
        self._timeout = timeout
        self._framed = framed
        self._max_frame = max_frame
        self._seqid = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        service: type | str | Service,
        *,
        unix_socket: str | os.PathLike[str] | None = None,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 5.0,
        transport: Literal["framed", "buffered"] = "framed",
        ssl_context: ssl.SSLContext | None = None,
        max_frame: int = 16 << 20,
    ) -> ThriftClient:
        """Connect to ``unix_socket`` or to ``host``:``port``; raises RpcError on failure."""
        if transport not in ("framed", "buffered"):
            raise ValueError(f"transport must be 'framed' or 'buffered', not {transport!r}")
        if unix_socket is not None and host is None and port is None:
            where, tcp = os.fspath(unix_socket), None
        elif unix_socket is None and host is not None and port is not None:
            where, tcp = f"{host}:{port}", (host, port)
        else:
            raise ValueError("give either unix_socket or both host and port")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                if tcp is None:
                    _, replies = await loop.create_unix_connection(_Replies, where)
                else:
                    hostname = tcp[0] if ssl_context else None
                    _, replies = await loop.create_connection(
                        _Replies, *tcp, ssl=ssl_context, server_hostname=hostname
                    )
        except TimeoutError as e:
            raise RpcError(f"cannot connect to {where}: no answer within {timeout} s") from e
        except OSError as e:
            raise RpcError(f"cannot connect to {where}: {e}") from e
        framed = transport == "framed"
        return cls(
            service, replies, where=where, timeout=timeout, framed=framed, max_frame=max_frame
        )

    def __repr__(self) -> str:
        return f"<ThriftClient {self._where} {'open' if self._replies else 'closed'}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, method: str, *args: object) -> object:
        """Call ``method`` with positional IDL arguments (missing trailing ones are unset);
        returns its result, None for void and oneway methods.

        A method the service lacks raises ValueError, arguments that do not fit their IDL types
        raise TypeError; neither touches the connection.
        """
        spec = self._service.method(method)
        async with self._lock:
            replies = self._replies
            if replies is None or replies.lost is not None:
                self._abort()
                raise RpcError(f"{self._where}: closed")
            seqid = self._seqid = (self._seqid + 1) & 0x7FFFFFFF
            data = self._service.encode_call(method, seqid, args, framed=self._framed)
            try:
                if replies.buf:
                    raise ProtocolViolation(f"{len(replies.buf)} unexpected bytes from the server")
                replies.transport.write(data)
                if spec.oneway:
                    return None
                async with asyncio.timeout(self._timeout):
                    return await self._read_reply(replies, spec, seqid)
            except TimeoutError as e:
                self._abort()
                raise RpcError(f"{self._where}: {method}: no reply within {self._timeout} s") from e
            except (OSError, EOFError, ProtocolViolation, ApplicationError) as e:
                self._abort()
                raise RpcError(f"{self._where}: {method}: {e or type(e).__name__}") from e
            except Exception as e:
                if any(isinstance(e, c) for c, _ in spec.throws):
                    raise  # a declared exception: the connection stays usable
                self._abort()
                raise
            except BaseException:
                self._abort()  # cancelled mid-call: a late reply would answer the next call
                raise

    async def _read_reply(self, replies: _Replies, spec: Method, seqid: int) -> Any:
        buf = replies.buf
        decode = self._service.decode_reply
        while True:
            if self._framed and len(buf) >= 4:
                size = frame_length(buf, self._max_frame)
                if len(buf) >= 4 + size:
                    data = bytes(buf[4 : 4 + size])
                    del buf[: 4 + size]
                    return decode(data, spec, seqid)
            elif not self._framed and buf:
                # No length prefix: decode what has arrived until it makes a whole message.
                try:
                    result = decode(bytes(buf), spec, seqid)
                except Incomplete:
                    if len(buf) > self._max_frame:
                        raise BadFrame(f"reply over {self._max_frame} bytes") from None
                except BaseException:
                    buf.clear()  # the whole message was read (a declared exception raises)
                    raise
                else:
                    buf.clear()
                    return result
            await replies.more()

    def _abort(self) -> None:
        if self._replies is not None:
            self._replies.transport.abort()
            self._replies = None

    async def close(self) -> None:
        """Close the connection (idempotent); never raises for a connection already broken."""
        replies, self._replies = self._replies, None
        if replies is None:
            return
        replies.transport.close()
        try:
            async with asyncio.timeout(1):
                await replies.closed
        except TimeoutError:
            replies.transport.abort()

"""Our own asyncio Thrift server and client: binary protocol, framed (or, client only, buffered).

thriftpy2 supplies the IDL classes; ``_frames`` encodes and decodes messages. The server exists
because thriftpy2's stock aio server has no frame cap, no idle timeout, no connection cap, no
owned connection tasks and drops the connection on undeclared errors (reference/thrift.md).

Server example::

    server = ThriftServer(idl.pubmon().PubmonService, handler, name="pubmon")
    await server.start_unix("/run/pubmon/pubmon.sock", allow_uids=[0])
    port = await server.start_tcp("127.0.0.1", 9090)
    ...
    await server.close()

Client example (the client lives in ``_client``)::

    async with await ThriftClient.connect(svc, unix_socket=path, timeout=2) as client:
        status = await client.call("getStatus")
"""

from __future__ import annotations

__all__ = ["Peer", "ThriftClient", "ThriftServer"]

import asyncio
import errno
import inspect
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Self, final

from thriftpy2.thrift import TApplicationException, TMessageType

from ._client import ThriftClient
from ._frames import (
    Method,
    ProtocolViolation,
    Reader,
    encode_error,
    encode_message,
    methods,
)
from ._trust import make_trusted_dirs
from .errors import PermissionDenied

logger = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11
# SO_SNDBUF of accepted sockets (the kernel doubles it). Left alone, loopback TCP grows a send
# buffer to 4 MiB (tcp_wmem) even for a peer that reads nothing: dozens of replies computed and
# held for nobody before backpressure reaches us.
_SNDBUF = 128 * 1024
_CERT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is calling: uid/pid from SO_PEERCRED on unix sockets, the TLS subject on TCP."""

    kind: Literal["unix", "tcp"]
    uid: int | None  # unix only
    pid: int | None  # unix only
    address: str  # the client's "host:port" on TCP; on unix, the socket path it connected to
    cert_subject: str | None = None  # verified client certificate, as "O=...,CN=..."
    gids: tuple[int, ...] = ()  # unix: SO_PEERCRED's gid, then the SO_PEERGROUPS groups
    cert_rdns: tuple[tuple[str, str], ...] = ()  # the subject's attributes, getpeercert names
    cert_sans: tuple[tuple[str, str], ...] = ()  # subjectAltName pairs, as getpeercert gives


@final
class ThriftServer:
    """Serves one Thrift service on any number of unix and TCP listeners.

    Contract:
    - Frames are a 4-byte big-endian length then one binary-protocol message. A length <= 0 or
      > ``max_frame`` closes the connection (``rejected_frames``); so does a malformed message
      (``errors``). A connection with no complete frame for ``idle_timeout`` s (not counting
      time spent in its own calls) is closed.
    - Past ``max_connections`` open connections, new ones are closed at once
      (``rejected_connections``, which also counts unix peers refused by uid).
    - Calls on one connection run one at a time, in order. Handler methods take the IDL arguments
      positionally. A plain ``def`` (which must not block) is answered straight from the read
      callback; an ``async def`` costs a task and a loop turn per call (+20-50 µs of server CPU
      measured here), so write hot read-only methods as plain functions. A call in progress is
      not cancelled when its client goes away, only by ``close()``.
    - ``admit(peer)``, when given, runs once per connection: a reason (str) refuses the peer,
      whose first call is then answered with PermissionDenied and the connection closed.
    - ``on_call(peer, method)`` runs before every call (refused ones included), then
      ``authorize(peer, method)``, which refuses by raising ``errors.PermissionDenied``. That, or
      the same error from the handler, is answered with the method's declared ``PermissionDenied``
      exception when it has one, else with ``TApplicationException`` (type UNKNOWN, message
      "PermissionDenied: ..."); oneway methods get no answer either way.
    - IDL exceptions the method declares go back as declared results; a ``TApplicationException``
      from the handler is sent as is; anything else is logged with its traceback and answered
      with ``TApplicationException(INTERNAL_ERROR)``. The connection stays usable.
    - ``close()`` stops every listener, closes every connection, cancels and awaits the calls in
      progress and removes its unix socket files.
    """

    def __init__(
        self,
        service: type,
        handler: object,
        *,
        name: str,
        max_frame: int = 1 << 20,
        idle_timeout: float = 300,
        max_connections: int = 1024,
        authorize: Callable[[Peer, str], None] | None = None,
        on_call: Callable[[Peer, str], None] | None = None,
        admit: Callable[[Peer], str | None] | None = None,
    ) -> None:
        self.name = name
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.ready = asyncio.Event()
        self.calls = 0
        self.errors = 0
        self.connections = 0
        self.connections_total = 0
        self.rejected_frames = 0
        self.rejected_connections = 0
        self._methods = methods(service)
        self._handlers = {name: getattr(handler, name, None) for name in self._methods}
        self._authorize = authorize
        self._on_call = on_call
        self.admit = admit
        self._servers: list[asyncio.Server] = []
        self._where: dict[str, asyncio.Server] = {}  # "unix:/path", "tcp:host:port" -> server
        self._conns: set[_Connection] = set()  # admitted and open
        self._protocols: set[_Connection] = set()  # every connection not yet lost
        self._tasks: set[asyncio.Task[bytes | None]] = set()  # async handler calls in progress
        self._sockets: list[tuple[str, int, int]] = []  # unix paths we created: (path, dev, ino)
        self._closing = False
        self._cap_logged = False

    def __repr__(self) -> str:
        state = "closing" if self._closing else "serving" if self._servers else "new"
        return f"<ThriftServer {self.name!r} {state} connections={self.connections}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_unix(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        allow_uids: Collection[int] | None = (),
    ) -> None:
        """Listen on a unix socket file with ``mode``; only peers whose SO_PEERCRED uid is in
        ``allow_uids`` or is our own uid get served (``None``: no uid check here, ``admit``
        and ``authorize`` decide).

        A stale socket file (nobody answers) is replaced; a live one raises
        ``OSError(EADDRINUSE)``; any other file there raises ``OSError(EEXIST)``.
        """
        path = os.fspath(path)
        _claim_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # bind() creates the file with the socket inode's mode less the umask: set both so
            # the file is born with exactly `mode` (no chmod by path, which follows symlinks).
            os.fchmod(sock.fileno(), mode)
            old = os.umask(0o777 & ~mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            st = os.stat(path)
            self._sockets.append((path, st.st_dev, st.st_ino))
            allowed = None if allow_uids is None else frozenset(allow_uids) | {os.getuid()}
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Connection(self, "unix", path, allowed), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._listening(server, f"unix:{path}")

    async def start_tcp(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Listen on TCP (TLS with ``ssl_context``); returns the bound port (``port=0``: any)."""
        server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self, "tcp", "", None),
            host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=min(self.idle_timeout, 60) if ssl_context else None,
        )
        bound: int = server.sockets[0].getsockname()[1]
        self._listening(server, f"{'tls' if ssl_context else 'tcp'}:{host}:{bound}")
        return bound

    def _listening(self, server: asyncio.Server, where: str) -> None:
        self._servers.append(server)
        self._where[where] = server
        logger.info("%s listening on %s", self.name, where)
        self.ready.set()

    def listening(self) -> list[str]:
        """Where it listens: "unix:/path", "tcp:host:port" or "tls:host:port" (bound port)."""
        return list(self._where)

    async def stop_listening(self, where: str) -> None:
        """Close one listener (a name from ``listening()``) and remove its socket file; the
        connections it accepted stay open and served."""
        server = self._where.pop(where)
        self._servers.remove(server)
        server.close()
        await server.wait_closed()
        if where.startswith("unix:"):
            path = where.removeprefix("unix:")
            for entry in [e for e in self._sockets if e[0] == path]:
                self._sockets.remove(entry)
                _remove_socket_file(*entry)

    def close_peers(self, doomed: Callable[[Peer], str | None]) -> int:
        """Close every connection whose peer ``doomed`` gives a reason for. One with a call in
        progress gets its reply first, then is closed. Returns how many."""
        n = 0
        for conn in list(self._conns):
            why = doomed(conn.peer)
            if why is None or conn.closing:
                continue
            n += 1
            conn.denied = why
            if not conn.busy:
                conn.closing = True
                conn.transport.close()
        return n

    async def close(self) -> None:
        """Stop listening, close every connection, cancel and await calls in progress, remove
        our socket files. Idempotent."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._protocols)
        for conn in conns:
            conn.transport.abort()
        for task in self._tasks:
            task.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(conn.gone for conn in conns))
        for server in self._servers:
            await server.wait_closed()
        for path, dev, ino in self._sockets:
            _remove_socket_file(path, dev, ino)
        self._sockets.clear()

    def _admit(self, conn: _Connection) -> bool:
        if self._closing or len(self._conns) >= self.max_connections:
            self.rejected_connections += 1
            if not self._cap_logged:
                logger.warning(
                    "%s: %d connections open, refusing more", self.name, len(self._conns)
                )
                self._cap_logged = True
            return False
        self._conns.add(conn)
        self.connections += 1
        self.connections_total += 1
        return True

    def _gone(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self.connections = len(self._conns)
        self._cap_logged = False

    def _call(
        self, frame: bytes, peer: Peer, denied: str | None = None
    ) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        """The encoded reply to one request frame (None: oneway), or a coroutine producing it
        when the handler is async. Raises ProtocolViolation."""
        msg = Reader(frame)
        name, mtype, seqid = msg.message_begin()
        if mtype not in (TMessageType.CALL, TMessageType.ONEWAY):
            raise ProtocolViolation(f"message type {mtype} from a client")
        self.calls += 1
        method, fn = self._methods.get(name), self._handlers.get(name)
        if method is None or fn is None:
            if mtype == TMessageType.ONEWAY:
                return None
            what = "unknown method" if method is None else "method not implemented"
            return encode_error(name, seqid, TApplicationException.UNKNOWN_METHOD, f"{what} {name}")
        args = msg.read_struct(method.args_cls)
        msg.expect_end()
        result = method.result_cls()
        try:
            if denied is not None:
                raise PermissionDenied(denied)
            if self._on_call is not None:
                self._on_call(peer, name)
            if self._authorize is not None:
                self._authorize(peer, name)
            value = fn(*[getattr(args, a) for a in method.arg_names])
        except Exception as e:
            return self._settle(method, seqid, result, e, peer)
        if inspect.isawaitable(value):
            return self._finish(method, seqid, result, value, peer)
        result.success = value
        return self._reply(method, seqid, result)

    async def _finish(
        self, method: Method, seqid: int, result: Any, pending: Awaitable[object], peer: Peer
    ) -> bytes | None:
        try:
            result.success = await pending
        except Exception as e:
            return self._settle(method, seqid, result, e, peer)
        return self._reply(method, seqid, result)

    def _settle(
        self, method: Method, seqid: int, result: Any, e: Exception, peer: Peer
    ) -> bytes | None:
        """The reply for a call that raised ``e``."""
        if isinstance(e, PermissionDenied):
            # Not logged here: whoever refused logs it, at most once a minute per peer.
            logger.debug("%s: refused %s to %s: %s", self.name, method.name, peer, e)
            if method.denied is None:
                denied = f"PermissionDenied: {e}"
                return self._fail(method, seqid, TApplicationException.UNKNOWN, denied)
            cls, field = method.denied
            setattr(result, field, cls(message=str(e)))
            return self._reply(method, seqid, result)
        if isinstance(e, TApplicationException):
            return self._fail(method, seqid, e.type, e.message or str(e))
        declared = next((f for c, f in method.throws if isinstance(e, c)), None)
        if declared is None:
            return self._internal_error(method, seqid, e)
        setattr(result, declared, e)
        return self._reply(method, seqid, result)

    def _reply(self, method: Method, seqid: int, result: Any) -> bytes | None:
        if method.oneway:
            return None
        try:
            return encode_message(method.name, TMessageType.REPLY, seqid, result, framed=True)
        except (TypeError, ValueError) as e:
            return self._internal_error(method, seqid, e)

    def _internal_error(self, method: Method, seqid: int, e: Exception) -> bytes | None:
        self.errors += 1
        logger.error("%s: %s failed", self.name, method.name, exc_info=e)
        return self._fail(method, seqid, TApplicationException.INTERNAL_ERROR, "internal error")

    def _fail(self, method: Method, seqid: int, kind: int, message: str) -> bytes | None:
        return None if method.oneway else encode_error(method.name, seqid, kind, message)


class _Connection(asyncio.Protocol):
    """One accepted connection: splits frames, runs calls one at a time, enforces the limits.

    A protocol rather than streams plus a task per connection: plain handlers are answered from
    ``data_received`` with no task wake-up. Measured here, an asyncio echo server cost 120-130 µs
    of CPU per round trip with streams and 60-100 µs as a protocol.
    """

    def __init__(
        self, server: ThriftServer, kind: Literal["unix", "tcp"], path: str, allowed: Any
    ) -> None:
        self.server = server
        self.kind = kind
        self.path = path
        self.allowed: frozenset[int] | None = allowed
        self.loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self.loop.create_future()
        self.buf = bytearray()
        self.busy = False  # an async call is in progress
        self.closing = False
        self.eof = False
        self.write_paused = False
        self.read_paused = False
        self.last = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.denied: str | None = None  # a refused peer: why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server._protocols.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            except OSError:
                pass
        if self.kind == "unix":
            try:
                creds = transport.get_extra_info("socket").getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size
                )
            except OSError:
                creds = _UCRED.pack(0, -1, -1)  # cannot tell who it is: refused below
            pid, uid, gid = _UCRED.unpack(creds)
            self.peer = Peer("unix", uid, pid, self.path, gids=(gid, *_peer_groups(sock)))
            if self.allowed is not None and uid not in self.allowed:
                # Answer its first call with PermissionDenied, then close: the client can tell
                # "refused" from "daemon gone". It never reaches a handler.
                server.rejected_connections += 1
                logger.warning("%s: refused uid=%d pid=%d on %s", server.name, uid, pid, self.path)
                self.denied = f"uid {uid} is not allowed on {self.path} ([control] allow_uids)"
        else:
            host, port = (transport.get_extra_info("peername") or ("?", 0))[:2]
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            peercert = transport.get_extra_info("peercert")
            cert = _subject(peercert)
            rdns = tuple(pair for rdn in (peercert or {}).get("subject", ()) for pair in rdn)
            sans = tuple((peercert or {}).get("subjectAltName", ()))
            self.peer = Peer("tcp", None, None, address, cert, cert_rdns=rdns, cert_sans=sans)
        if self.denied is None and server.admit is not None:
            self.denied = server.admit(self.peer)  # logged and counted by admit
        if not server._admit(self):
            return self._drop()
        self.timer = self.loop.call_later(server.idle_timeout, self._check_idle)

    def _drop(self) -> None:
        self.closing = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        self.server._protocols.discard(self)
        self.server._gone(self)
        self.gone.set_result(None)

    def eof_received(self) -> bool:
        self.eof = True
        return self.busy  # keep the transport open to send the reply in progress

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._pump()

    def _pump(self) -> None:
        """Run the complete frames in the buffer, one at a time, while nothing blocks them."""
        server, buf = self.server, self.buf
        while not (self.busy or self.write_paused or self.closing) and len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big", signed=True)
            if not 0 < size <= server.max_frame:
                server.rejected_frames += 1
                logger.info("%s: closing %s: frame of %d bytes", server.name, self.peer, size)
                return self._drop()
            if len(buf) < 4 + size:
                break
            frame = bytes(buf[4 : 4 + size])
            del buf[: 4 + size]
            self.last = self.loop.time()
            try:
                outcome = server._call(frame, self.peer, self.denied)
            except ProtocolViolation as e:
                server.errors += 1
                logger.info("%s: closing %s: %s", server.name, self.peer, e)
                return self._drop()
            if self.denied is not None:
                if isinstance(outcome, bytes):
                    self.transport.write(outcome)
                self.closing = True
                self.transport.close()
                return
            if isinstance(outcome, bytes):
                self.transport.write(outcome)
            elif outcome is not None:
                self.busy = True
                task = self.loop.create_task(outcome, name=f"{server.name} {self.peer.address}")
                server._tasks.add(task)
                task.add_done_callback(self._finished)
        if self.eof and not self.busy and not self.closing:
            self.transport.close()
        # Backpressure: hold at most one frame beyond the one being worked on.
        elif len(buf) > server.max_frame + 4 and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif self.read_paused and len(buf) <= server.max_frame + 4:
            self.read_paused = False
            self.transport.resume_reading()

    def _finished(self, task: asyncio.Task[bytes | None]) -> None:
        self.server._tasks.discard(task)
        self.busy = False
        self.last = self.loop.time()
        if task.cancelled() or self.closing:
            return
        if self.timer is None:  # _check_idle stopped while the call ran
            self.timer = self.loop.call_later(self.server.idle_timeout, self._check_idle)
        reply = task.result()  # _finish turns every Exception into a reply
        if reply is not None:
            self.transport.write(reply)
        if self.denied is not None:  # refused while the call ran (close_peers)
            self.closing = True
            self.transport.close()
            return
        self._pump()

    def _check_idle(self) -> None:
        # One timer per idle period, moved forward lazily, instead of re-arming it per frame.
        self.timer = None
        if self.closing or self.busy:
            return  # a call in progress is not idleness; _finished re-arms the timer
        due = self.last + self.server.idle_timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self._check_idle)
            return
        logger.debug("%s: closing idle %s", self.server.name, self.peer)
        self.closing = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a peer that stopped reading our replies
        else:
            self.transport.close()


def _subject(cert: dict[str, Any] | None) -> str | None:
    if not cert or "subject" not in cert:
        return None
    parts = [f"{_CERT_NAMES.get(k, k)}={v}" for rdn in cert["subject"] for k, v in rdn]
    return ",".join(parts)


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups at connect time (SO_PEERGROUPS); () if unavailable.
    Python caps the buffer at 1024 bytes: a peer in more than 256 groups is matched by its
    uid and primary gid only."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def _remove_socket_file(path: str, dev: int, ino: int) -> None:
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):  # not replaced by someone else since
            os.unlink(path)
    except FileNotFoundError:
        pass


def _claim_socket_path(path: str) -> None:
    """Make ``path`` free for bind: create its directory (0755, ours) if missing, refuse a
    directory that someone other than root or us could change (`_trust.check_path`), remove a
    stale socket, refuse a live one or a non-socket.

    Whoever can rename entries in the directory could put their own server in place of ours,
    and root's CLI would talk to it; so the directory and all above it must be trusted.
    """
    bad = make_trusted_dirs(os.path.dirname(os.path.abspath(path)), 0o755)
    if bad is not None:
        raise OSError(errno.EPERM, f"{bad}; someone else could replace the socket")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a unix connect never waits: it succeeds, is refused or EAGAINs
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        logger.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except FileNotFoundError:
        return
    except BlockingIOError:
        pass  # a full backlog: alive, just busy
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is answering on {path}")

"""Our own asyncio Thrift server: binary protocol, framed.

``codec`` encodes and decodes messages (its rules: frame caps, strict decoding); ``idl.bind``
gives it thriftpy2's classes, which the handlers build and raise. The server exists
because thriftpy2's stock aio server has no frame cap, no idle timeout, no connection cap, no
owned connection tasks and drops the connection on undeclared errors (reference/thrift.md).

Server example::

    server = ThriftServer(idl.pubmon().PubmonService, handler, name="pubmon")
    await server.start_unix("/run/pubmon/pubmon.sock", allow_uids=[0])
    port = await server.start_tcp("127.0.0.1", 9090)
    ...
    await server.close()

Client example (the client lives in ``client`` and is re-exported here)::

    async with await ThriftClient.connect(svc, unix_socket=path, timeout=2) as client:
        status = await client.call("getStatus")

Fairness and limits (issue 19). The server shares the daemon's one event loop with the watchdog
pings, signal handling and supervision, and anyone who can reach the TCP port (or, when other
uids are allowed, the unix socket) is a client. The bound: **no mix of clients keeps the loop
from its timers and signals for more than 100 ms** (CPU taken by other processes aside).
Measured with bench/floods.py (the worst gap between 100 ms watchdog pings, minus 100 ms) under
pipelined calls on 96 connections, 1000 connections holding partial frames, 150 that never read
their tails and 1100 idle ones: 5-60 ms, where the code before issue 19 let 96 pipelining
connections stop the loop for 7.7 s. The worst single turns are bursts of 1000 accepts or
closes (~40-60 ms in-process). How:

- One frame per connection per loop turn. A connection's complete frames wait in a run queue;
  while a frame waits, a call runs or a reply is unsent, the connection is not read at all
  (``pause_reading``), so a client that pipelines gets one call per turn and the kernel's
  buffers, not ours, hold the rest. Reads take at most what completes one frame, so a
  connection never buffers more than its frame cap + 4 bytes.
- A global budget per loop turn: calls are run from the queue until ``turn_budget`` (10 ms)
  of handler time is spent in that turn; the rest wait for the next turn, after timers, signals
  and other I/O had theirs. The worst turn is the budget plus one call (the most expensive
  call, ``listPublishers`` of 1000 publishers, takes ~3 ms). Async handlers (``tailLog``) do
  their heavy part after ``await fair_turn()``, which the same queue grants within the budget.
- Rate limits, in seconds of handler time per second: each peer (a uid on the unix socket, an
  IP address on TCP) at most ``peer_share`` (0.1 s/s, burst 50 ms; about 2000 getStatus/s),
  every peer together at most ``total_share`` (0.5 s/s, burst 100 ms), so RPC never takes more
  than half the loop. A peer in debt waits (its connections are not read) until its bucket
  refills. Per connection: one call in flight, one call per turn, none while a reply is
  unsent. The daemon's own uid on the unix socket is exempt from the rate limits and served
  first in every turn. A queued TCP connection whose peer left (reset, or closed its end) is
  dropped before its calls run.
- Memory: a TCP peer without a verified client certificate may send frames of at most
  ``max_frame_unauthenticated`` (16 KiB); the unix socket and mutual TLS get ``max_frame``.
  One reply at most is unsent per connection (no further frame is handled until it drained;
  ``tailLog`` pages its replies to stay under ~1 MiB; other replies are small: listPublishers
  of 1000 publishers is ~200 KB). Buffered requests, unsent replies and a fixed cost per open
  connection (300 KiB for TLS: asyncio's 256 KiB read buffer and the SSL state) count against
  ``memory_budget`` (64 MiB): past it new connections are refused and connections still
  sending a frame are not read (the partial-frame timeout then ends them). When a flood ends,
  freed heap is handed back to the kernel (``malloc_trim``: 36 -> 30 MiB after 1000 held frames).
- Timeouts: a TLS handshake has ``handshake_timeout`` (5 s); a frame, once its first byte
  arrived, must be complete within ``frame_timeout`` (10 s); a reply must be taken by the peer
  within ``send_timeout`` (30 s); a connection with nothing going on is closed after
  ``idle_timeout`` (300 s); a refused unix peer gets ``frame_timeout`` to read its refusal.
- Connection pools, counted from accept (before any TLS handshake): TCP at most
  ``max_connections`` (1024), ``max_connections_per_ip``, and ``max_handshakes`` (64) TLS
  handshakes at once; the unix socket has its own pool, ``max_unix_connections`` (128) and
  ``max_connections_per_uid``, which TCP cannot touch, and the daemon's own uid is never
  refused. Refused connections are closed at once (``rejected_connections``). The open-file
  limit is raised to fit both pools plus room for publishers (``ensure_fd_limit``).
"""

from __future__ import annotations

__all__ = ["Peer", "ThriftClient", "ThriftServer", "fair_turn"]

import asyncio
import collections
import contextvars
import errno
import inspect
import logging
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Self, final

from thriftpy2.thrift import TApplicationException

from pubmon.errors import PermissionDenied
from pubmon.host.inherited import inherited_socket, inherited_sockets
from pubmon.host.trust import make_trusted_dirs
from pubmon.thrift import codec, idl
from pubmon.thrift.client import ThriftClient
from pubmon.thrift.codec import (
    ApplicationError,
    BadFrame,
    Method,
    ProtocolViolation,
    encode_error,
    frame_length,
)
from pubmon.thrift.limits import TokenBucket, ensure_fd_limit, malloc_trim, port_holder
from pubmon.thrift.peer import subject_text

logger = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in Python 3.11
# SO_SNDBUF of accepted sockets (the kernel doubles it). Left alone, loopback TCP grows a send
# buffer to 4 MiB (tcp_wmem) even for a peer that reads nothing: dozens of replies computed and
# held for nobody before backpressure reaches us.
_SNDBUF = 128 * 1024
# SO_RCVBUF of TCP listeners (accepted sockets inherit it): requests are small, and a peer that
# pipelines while we do not read should fill a small kernel buffer, not a 6 MiB autotuned one.
_RCVBUF = 64 * 1024
_CONN_COST = 4 * 1024  # memory a plain connection costs us (transport, protocol, timer)
_TLS_COST = 300 * 1024  # ... and a TLS one (asyncio's 256 KiB SSL read buffer, BIOs, SSL*)
_ACCEPT_BATCH = 128  # connections accepted per readiness callback of a TCP listener
_ACCEPT_RETRY = 1.0  # s without accepting after EMFILE and the like
_PARK_MAX = 0.5  # s a rate-limited connection waits before it is looked at again
_MAX_BUCKETS = 4096  # rate-limit buckets kept before those of departed, idle peers are pruned
_FD_RESERVE = 512  # descriptors kept free for publishers' pipes, log files, probes
_TRIM_AFTER = 16 << 20  # a flood that buffered this much is trimmed once it is over ...
_TRIM_BELOW = 1 << 20  # ... i.e. once buffered memory is back under this
_CURRENT: contextvars.ContextVar[_Connection] = contextvars.ContextVar("pubmon_rpc_connection")


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


async def fair_turn() -> None:
    """In an async handler, before heavy synchronous work (building a big reply): wait until
    the server's run queue gives this connection a turn within the per-turn budget, so that
    many such calls waking at once (a burst of log lines for 100 `tail -f`) are spread over
    several loop turns. Returns at once outside a server call."""
    conn = _CURRENT.get(None)
    if conn is None or conn.closing:
        return
    fut = conn.loop.create_future()
    conn.server._enqueue(conn, fut)
    await fut
    conn.gate_t0 = time.perf_counter()


@final
class ThriftServer:
    """Serves one Thrift service on any number of unix and TCP listeners.

    Contract:
    - Frames are a 4-byte big-endian length then one binary-protocol message. A length <= 0 or
      over the connection's frame cap (``max_frame``; ``max_frame_unauthenticated`` for TCP
      peers without a verified client certificate) closes the connection
      (``rejected_frames``); so does a malformed message (``errors``). The timeouts, pools,
      rate limits and memory budget are those of the module docstring.
    - Refused connections (pools full, budget spent, server closing) are closed at once and
      counted in ``rejected_connections``, which also counts unix peers refused by uid.
    - Calls on one connection run one at a time, in order, one per loop turn. Handler methods
      take the IDL arguments positionally. A plain ``def`` (which must not block) is answered
      from the run queue; an ``async def`` costs a task and a loop turn per call, and should
      ``await fair_turn()`` before heavy work. A call in progress is not cancelled when its
      client goes away, only by ``close()``.
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
        service: type | str | codec.Service,
        handler: object,
        *,
        name: str,
        max_frame: int = 1 << 20,
        max_frame_unauthenticated: int = 16 << 10,
        idle_timeout: float = 300,
        frame_timeout: float = 10,
        send_timeout: float = 30,
        handshake_timeout: float = 5,
        max_connections: int = 1024,
        max_connections_per_ip: int | None = None,
        max_handshakes: int = 64,
        max_unix_connections: int = 128,
        max_connections_per_uid: int | None = None,
        memory_budget: int = 64 << 20,
        turn_budget: float = 0.010,
        peer_share: float = 0.10,
        total_share: float = 0.5,
        authorize: Callable[[Peer, str], None] | None = None,
        on_call: Callable[[Peer, str], None] | None = None,
        admit: Callable[[Peer], str | None] | None = None,
    ) -> None:
        self.name = name
        self.max_frame = max_frame
        self.max_frame_unauthenticated = min(max_frame_unauthenticated, max_frame)
        self.idle_timeout = idle_timeout
        # Never longer than the idle timeout (tests shorten that one to fractions of a second).
        self.frame_timeout = min(frame_timeout, idle_timeout)
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip or max_connections
        self.max_handshakes = max_handshakes
        self.max_unix_connections = max_unix_connections
        self.max_connections_per_uid = max_connections_per_uid or max_unix_connections
        self.memory_budget = memory_budget
        self.turn_budget = turn_budget
        self.peer_share = peer_share
        self.ready = asyncio.Event()
        self.calls = 0
        self.errors = 0
        self.connections = 0
        self.connections_total = 0
        self.rejected_frames = 0
        self.rejected_connections = 0
        self.throttled = 0  # times a peer had to wait for its rate limit
        self.memory = 0  # accounted bytes: buffered requests, unsent replies, per-connection cost
        self.memory_peak = 0
        self._service = service if isinstance(service, codec.Service) else idl.bind(service)
        self._handlers = {name: getattr(handler, name, None) for name in self._service.methods}
        self._authorize = authorize
        self._on_call = on_call
        self.admit = admit
        self._servers: list[asyncio.Server] = []  # unix listeners
        self._listeners: list[socket.socket] = []  # our own TCP listening sockets
        # "unix:/path", "tcp:host:port" -> its asyncio server, or our TCP listening sockets
        self._where: dict[str, asyncio.Server | list[socket.socket]] = {}
        self._conns: set[_Connection] = set()  # admitted and open
        self._protocols: set[_Connection] = set()  # every connection not yet lost
        self._tasks: set[asyncio.Task[Any]] = set()  # async calls and TCP openings in progress
        self._sockets: list[tuple[str, int, int]] = []  # unix paths we created: (path, dev, ino)
        self._closing = False
        self._refusal_logged = 0.0
        self._own_uid = os.getuid()
        # Pools: open connections by kind and by peer key ("ip:..." / "uid:...").
        self._open = {"unix": 0, "tcp": 0}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._handshakes = 0
        # The run queue: the daemon's own uid first, then everyone else, FIFO.
        self._urgent: collections.deque[tuple[_Connection, asyncio.Future[None] | None]] = (
            collections.deque()
        )
        self._queue: collections.deque[tuple[_Connection, asyncio.Future[None] | None]] = (
            collections.deque()
        )
        self._turn = 0
        self._spent = 0.0  # handler seconds spent in the current turn
        self._turn_pending = False
        self._buckets: dict[str, TokenBucket] = {}
        self._total = TokenBucket(total_share, 0.1)
        self._peer_burst = 0.05
        self._async_cost = 0.001  # moving average of an async call's gated step, s
        self._starved: set[_Connection] = set()  # not read because the memory budget is spent
        self._feeding = False
        self._trim_wanted = False
        self._scratch = bytearray(256 * 1024)  # where every connection's reads land first

    def __repr__(self) -> str:
        state = "closing" if self._closing else "serving" if self._servers else "new"
        return f"<ThriftServer {self.name!r} {state} connections={self.connections}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- listeners ----------------------------------------------------------------------------

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
        self._fd_headroom()
        inherited = inherited_socket(f"unix:{path}")  # [upgrade] hook: handed over by exec
        if inherited is not None:
            return await self._adopt_unix(path, inherited, allow_uids)
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
            allowed = None if allow_uids is None else frozenset(allow_uids) | {self._own_uid}
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Connection(self, "unix", path, allowed), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        self._listening(f"unix:{path}", server)

    async def start_tcp(
        self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """Listen on TCP (TLS with ``ssl_context``); returns the bound port (``port=0``: any).

        A port someone else holds raises ``OSError(EADDRINUSE)`` whose text names the holder.
        We accept connections ourselves (not ``create_server``) so that they count, and are
        capped per IP, from the moment they are accepted, before any TLS handshake.
        """
        loop = asyncio.get_running_loop()
        self._fd_headroom()
        handed = inherited_sockets(f"tcp:{host}:{port}")  # [upgrade] hook: handed over by exec
        if handed:
            return self._serve_tcp(host, handed, ssl_context)
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        socks: list[socket.socket] = []
        bound = port
        try:
            for family, type_, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if bound:
                    addr = (addr[0], bound, *addr[2:])
                try:
                    sock.bind(addr)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        holder = port_holder(bound or port)
                        raise OSError(
                            errno.EADDRINUSE, f"{os.strerror(errno.EADDRINUSE)} (held by {holder})"
                        ) from None
                    raise
                bound = sock.getsockname()[1]
                sock.listen(512)
                sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return self._serve_tcp(host, socks, ssl_context)

    def _serve_tcp(
        self, host: str, socks: list[socket.socket], ssl_context: ssl.SSLContext | None
    ) -> int:
        loop = asyncio.get_running_loop()
        bound: int = socks[0].getsockname()[1]
        for sock in socks:
            self._listeners.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock, ssl_context)
        self._listening(f"{'tls' if ssl_context else 'tcp'}:{host}:{bound}", socks)
        return bound

    async def _adopt_unix(
        self, path: str, sock: socket.socket, allow_uids: Collection[int] | None
    ) -> None:
        """[upgrade] Serve a unix listener handed over by the previous image: its file stays."""
        st = os.stat(path)
        self._sockets.append((path, st.st_dev, st.st_ino))
        allowed = None if allow_uids is None else frozenset(allow_uids) | {self._own_uid}
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: _Connection(self, "unix", path, allowed), sock=sock
        )
        self._servers.append(server)
        self._listening(f"unix:{path}", server)

    def _listening(self, where: str, what: asyncio.Server | list[socket.socket]) -> None:
        self._where[where] = what
        logger.info("%s listening on %s", self.name, where)
        self.ready.set()

    def listening(self) -> list[str]:
        """Where it listens: "unix:/path", "tcp:host:port" or "tls:host:port" (bound port)."""
        return list(self._where)

    async def stop_listening(self, where: str) -> None:
        """Close one listener (a name from ``listening()``) and remove its socket file; the
        connections it accepted stay open and served."""
        what = self._where.pop(where)
        if isinstance(what, list):
            loop = asyncio.get_running_loop()
            for sock in what:
                self._listeners.remove(sock)
                if sock.fileno() >= 0:
                    loop.remove_reader(sock.fileno())
                    sock.close()
            return
        self._servers.remove(what)
        what.close()
        await what.wait_closed()
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
            if not hasattr(conn, "peer"):
                continue  # a TCP connection still in its TLS handshake
            why = doomed(conn.peer)
            if why is None or conn.closing:
                continue
            n += 1
            conn.denied = why
            if not conn.busy:
                conn.closing = True
                conn.transport.close()
        return n

    def _fd_headroom(self) -> None:
        need = self.max_connections + self.max_unix_connections + _FD_RESERVE
        soft = ensure_fd_limit(need)
        if soft < need:
            cap = max(16, soft - self.max_unix_connections - _FD_RESERVE)
            if cap < self.max_connections:
                logger.warning(
                    "%s: open-file limit %d: TCP connections capped at %d (not %d)",
                    self.name,
                    soft,
                    cap,
                    self.max_connections,
                )
                self.max_connections = cap
                self.max_connections_per_ip = min(self.max_connections_per_ip, cap)

    def _accept(self, listener: socket.socket, ctx: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: stop accepting for a while, as asyncio does.
                    logger.error("%s: cannot accept: %s; pausing accept", self.name, exc)
                    loop.remove_reader(listener.fileno())
                    loop.call_later(_ACCEPT_RETRY, self._resume_accept, listener, ctx)
                    return
                continue  # ECONNABORTED and friends: that one connection is gone
            self._open_tcp(sock, addr, ctx)

    def _resume_accept(self, listener: socket.socket, ctx: ssl.SSLContext | None) -> None:
        if not self._closing and listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener, ctx)

    def _open_tcp(self, sock: socket.socket, addr: Any, ctx: ssl.SSLContext | None) -> None:
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        key = f"ip:{host}"
        why = self._refusal("tcp", key, trusted=False, tls=ctx is not None)
        if why is not None:
            self._refuse(f"tcp {host}", why)
            # RST rather than FIN: no TIME_WAIT on our side for a flood of refused connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = _Connection(self, "tcp", "", None)
        conn.sock = sock
        conn.key = key
        conn.address = f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
        self._enter(conn, tls=ctx is not None)
        if ctx is not None:
            self._handshakes += 1  # now, not when the task starts: the next accept checks it
        task = asyncio.get_running_loop().create_task(
            self._handshake(conn, sock, ctx), name=f"{self.name} accept {conn.address}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._opening_cancelled(t, conn, sock, ctx))

    def _opening_cancelled(
        self,
        task: asyncio.Task[None],
        conn: _Connection,
        sock: socket.socket,
        ctx: ssl.SSLContext | None,
    ) -> None:
        # close() may cancel the task before it ever ran (so its own cleanup never ran either).
        if task.cancelled() and conn.admitted and not conn.opening_done:
            if ctx is not None:
                self._handshakes -= 1
            self._leave(conn)
            sock.close()

    async def _handshake(
        self, conn: _Connection, sock: socket.socket, ctx: ssl.SSLContext | None
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: conn,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self.handshake_timeout if ctx is not None else None,
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            logger.debug("%s: %s did not open: %r", self.name, conn.address, exc)
            self._leave(conn)
            sock.close()
        except asyncio.CancelledError:
            self._leave(conn)
            sock.close()
            raise
        finally:
            conn.opening_done = True  # the opening ended, one way or the other
            if ctx is not None:
                self._handshakes -= 1

    async def close(self) -> None:
        """Stop listening, close every connection, cancel and await calls in progress, remove
        our socket files. Idempotent."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for server in self._servers:
            server.close()
        for sock in self._listeners:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
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

    # --- pools and memory ---------------------------------------------------------------------

    def _refusal(self, kind: str, key: str, *, trusted: bool, tls: bool = False) -> str | None:
        """Why a new connection may not open now, or None."""
        if self._closing:
            return "the server is closing"
        if trusted:
            return None  # the daemon's own uid: never refused
        if kind == "unix":
            if self._open["unix"] >= self.max_unix_connections:
                return f"{self._open['unix']} unix connections open ([control] max_connections)"
            if self._per_peer[key] >= self.max_connections_per_uid:
                return f"{self._per_peer[key]} connections open for {key}"
        else:
            if self._open["tcp"] >= self.max_connections:
                return f"{self._open['tcp']} TCP connections open ([monitor] max_connections)"
            if self._per_peer[key] >= self.max_connections_per_ip:
                return f"{self._per_peer[key]} connections open for {key}"
            if tls and self._handshakes >= self.max_handshakes:
                return f"{self._handshakes} TLS handshakes in progress"
        cost = _TLS_COST if tls else _CONN_COST
        if self.memory + cost > self.memory_budget:
            return f"memory budget spent ({self.memory >> 10} KiB buffered)"
        return None

    def _refuse(self, who: str, why: str) -> None:
        self.rejected_connections += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 10:  # one line per 10 s however hard the flood
            self._refusal_logged = now
            logger.warning("%s: refusing %s: %s (refused so far: %d)", self.name, who, why,
                           self.rejected_connections)  # fmt: skip

    def _enter(self, conn: _Connection, *, tls: bool = False) -> None:
        conn.admitted = True
        conn.cost = _TLS_COST if tls else _CONN_COST
        self._account(conn.cost)
        if not conn.trusted:
            self._open[conn.kind] += 1
            self._per_peer[conn.key] += 1
        self._conns.add(conn)
        self.connections = len(self._conns)
        self.connections_total += 1

    def _leave(self, conn: _Connection) -> None:
        if not conn.admitted:
            return
        conn.admitted = False
        self._conns.discard(conn)
        self.connections = len(self._conns)
        if not conn.trusted:
            self._open[conn.kind] -= 1
            self._per_peer[conn.key] -= 1
            if self._per_peer[conn.key] <= 0:
                del self._per_peer[conn.key]
                bucket = self._buckets.get(conn.key)
                if bucket is not None and bucket.wait(time.monotonic()) == 0 and bucket.full:
                    del self._buckets[conn.key]  # else it keeps its debt when it comes back
        self._account(-(conn.cost + len(conn.buf) + conn.unsent))
        conn.cost = conn.unsent = 0
        conn.buf = bytearray()
        self._starved.discard(conn)

    def _account(self, delta: int) -> None:
        self.memory += delta
        if delta > 0:
            if self.memory > self.memory_peak:
                self.memory_peak = self.memory
            return
        if self._starved and self.memory <= self.memory_budget * 3 // 4 and not self._feeding:
            self._feeding = True
            asyncio.get_running_loop().call_soon(self._feed_starved)
        if self.memory_peak >= _TRIM_AFTER and self.memory < _TRIM_BELOW and not self._trim_wanted:
            self._trim_wanted = True
            asyncio.get_running_loop().call_later(1.0, self._trim)

    def _feed_starved(self) -> None:
        self._feeding = False
        starved, self._starved = self._starved, set()
        for conn in starved:
            conn._poll()

    def _trim(self) -> None:
        self._trim_wanted = False
        if self.memory < _TRIM_BELOW:  # the flood is over (not just a lull)
            self.memory_peak = self.memory
            if malloc_trim():
                logger.info("%s: a flood of connections ended; free memory returned", self.name)

    @property
    def over_budget(self) -> bool:
        return self.memory > self.memory_budget

    # --- the run queue ------------------------------------------------------------------------

    def _offer(self, conn: _Connection) -> None:
        """``conn`` has a complete frame and nothing in flight: run it now if this turn has
        room and nobody is waiting, else queue it."""
        if (
            conn.stepped != self._turn
            and self._spent < self.turn_budget
            and not self._urgent
            and (conn.trusted or not self._queue)
        ):
            if conn.trusted or self._may_run(conn, None):  # else parked until it may
                self._step(conn)
            return
        self._enqueue(conn, None)

    def _enqueue(self, conn: _Connection, gate: asyncio.Future[None] | None) -> None:
        if gate is None:
            conn.queued = True
        (self._urgent if conn.trusted else self._queue).append((conn, gate))
        self._next_turn()

    def _next_turn(self) -> None:
        if not self._turn_pending:
            self._turn_pending = True
            asyncio.get_running_loop().call_soon(self._run_turn)

    def _may_run(self, conn: _Connection, gate: asyncio.Future[None] | None) -> bool:
        """Rate limits of an untrusted peer (and the memory budget for new replies): True to go
        on now; else the entry is parked until it may."""
        now = time.monotonic()
        bucket = self._buckets.get(conn.key)
        if bucket is None:
            if len(self._buckets) > _MAX_BUCKETS:  # many peers came and went: forget the idle
                for key, old in list(self._buckets.items()):
                    if key not in self._per_peer and old.wait(now) == 0 and old.full:
                        del self._buckets[key]
            bucket = self._buckets[conn.key] = TokenBucket(self.peer_share, self._peer_burst)
        wait = max(bucket.wait(now), self._total.wait(now))
        if wait == 0 and self.over_budget and gate is None:
            wait = 0.05  # no new replies while the memory budget is spent
        if wait == 0:
            return True
        self.throttled += 1
        if gate is None:
            conn.queued = True
        # Back in the queue within _PARK_MAX at the latest, to notice a peer that reset it
        # (a parked connection is not read) and to park it again if still in debt.
        asyncio.get_running_loop().call_later(min(wait, _PARK_MAX), self._unpark, conn, gate)
        return False

    def _unpark(self, conn: _Connection, gate: asyncio.Future[None] | None) -> None:
        if conn.closing:
            if gate is not None and not gate.done():
                gate.cancel()
            return
        self._enqueue(conn, gate)

    def _run_turn(self) -> None:
        """Once per loop turn while anything is queued: run queued calls (and grant waiting
        ``fair_turn``s) until the turn's budget is spent; one entry per connection."""
        self._turn_pending = False
        self._turn += 1
        self._spent = 0.0
        for queue in (self._urgent, self._queue):
            for _ in range(len(queue)):
                if self._spent >= self.turn_budget:
                    break
                conn, gate = queue.popleft()
                if gate is None:
                    conn.queued = False
                if not conn.closing and conn.peer_gone():
                    conn._drop()  # its calls are for nobody (it left while it waited)
                if conn.closing:
                    if gate is not None and not gate.done():
                        gate.cancel()
                    continue
                if not conn.trusted and not self._may_run(conn, gate):
                    continue
                if gate is None:
                    self._step(conn)
                elif not gate.done():
                    gate.set_result(None)
                    self._spend(self._async_cost)
        if self._urgent or self._queue:
            self._next_turn()

    def _step(self, conn: _Connection) -> None:
        started = time.perf_counter()
        conn.stepped = self._turn
        conn._take_frame()
        self._charge(conn, time.perf_counter() - started)

    def _spend(self, cost: float) -> None:
        self._spent += cost
        self._next_turn()  # a new turn starts the count again

    def _charge(self, conn: _Connection, cost: float) -> None:
        """``cost`` seconds of handler time used on behalf of ``conn``."""
        self._spend(cost)
        if not conn.trusted:
            now = time.monotonic()
            self._total.charge(cost, now)
            bucket = self._buckets.get(conn.key)
            if bucket is not None:
                bucket.charge(cost, now)

    # --- calls --------------------------------------------------------------------------------

    def _call(
        self, frame: bytes, conn: _Connection
    ) -> bytes | Coroutine[Any, Any, bytes | None] | None:
        """The encoded reply to one request frame (None: oneway), or a coroutine producing it
        when the handler is async. Raises ProtocolViolation."""
        peer, denied = conn.peer, conn.denied
        name, mtype, seqid, method, msg = self._service.decode_call(frame)
        self.calls += 1
        fn = self._handlers.get(name)
        if method is None or fn is None:
            if mtype == codec.ONEWAY:
                return None
            what = "unknown method" if method is None else "method not implemented"
            return encode_error(name, seqid, codec.UNKNOWN_METHOD, f"{what} {name}")
        args = self._service.decode_args(msg, method)
        try:
            if denied is not None:
                raise PermissionDenied(denied)
            if self._on_call is not None:
                self._on_call(peer, name)
            if self._authorize is not None:
                self._authorize(peer, name)
            value = fn(*args)
        except Exception as e:
            return self._settle(method, seqid, e, peer)
        if inspect.isawaitable(value):
            return self._finish(method, seqid, value, conn)
        return self._reply(method, seqid, "success", value)

    async def _finish(
        self, method: Method, seqid: int, pending: Awaitable[object], conn: _Connection
    ) -> bytes | None:
        error: Exception | None = None
        value: object = None
        try:
            value = await pending
        except Exception as e:
            error = e
        if conn.gate_t0 is None:
            await fair_turn()  # encoding a reply is work too: within the turn's budget
        started = conn.gate_t0 if conn.gate_t0 is not None else time.perf_counter()
        conn.gate_t0 = None
        if error is not None:
            reply = self._settle(method, seqid, error, conn.peer)
        else:
            reply = self._reply(method, seqid, "success", value)
        cost = time.perf_counter() - started
        self._async_cost = 0.8 * self._async_cost + 0.2 * cost
        self._charge(conn, cost)
        return reply

    def _settle(self, method: Method, seqid: int, e: Exception, peer: Peer) -> bytes | None:
        """The reply for a call that raised ``e``."""
        if isinstance(e, PermissionDenied):
            # Not logged here: whoever refused logs it, at most once a minute per peer.
            logger.debug("%s: refused %s to %s: %s", self.name, method.name, peer, e)
            if method.denied is None:
                denied = f"PermissionDenied: {e}"
                return self._fail(method, seqid, codec.UNKNOWN, denied)
            cls, field = method.denied
            return self._reply(method, seqid, field, cls(message=str(e)))
        if isinstance(e, ApplicationError | TApplicationException):  # ours, or thriftpy2's
            return self._fail(method, seqid, e.type, e.message or str(e))
        declared = next((f for c, f in method.throws if isinstance(e, c)), None)
        if declared is None:
            return self._internal_error(method, seqid, e)
        return self._reply(method, seqid, declared, e)

    def _reply(self, method: Method, seqid: int, field: str, value: object) -> bytes | None:
        if method.oneway:
            return None
        try:
            return self._service.encode_reply(method, seqid, field, value)
        except (TypeError, ValueError) as e:
            return self._internal_error(method, seqid, e)

    def _internal_error(self, method: Method, seqid: int, e: Exception) -> bytes | None:
        self.errors += 1
        logger.error("%s: %s failed", self.name, method.name, exc_info=e)
        return self._fail(method, seqid, codec.INTERNAL_ERROR, "internal error")

    def _fail(self, method: Method, seqid: int, kind: int, message: str) -> bytes | None:
        return None if method.oneway else encode_error(method.name, seqid, kind, message)


class _Connection(asyncio.BufferedProtocol):
    """One accepted connection: buffers at most one frame beyond the one in the run queue,
    runs its calls one at a time, enforces its timeouts.

    A protocol rather than streams plus a task per connection: plain handlers are answered
    without a task wake-up. Measured here, an asyncio echo server cost 120-130 µs of CPU per
    round trip with streams and 60-100 µs as a protocol. A buffered one, so that each read
    takes at most what fits in one frame beyond the buffer: a connection never holds more than
    ``max_frame + 4`` bytes of request, however much a client pipelines (asyncio's plain
    protocols read 256 KiB at a time).
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
        self.key = ""  # the peer whose pool and rate limit this connection counts in
        self.address = ""
        self.trusted = False  # the daemon's own uid on the unix socket
        self.admitted = False
        self.opening_done = False  # a TCP opening task ran to its end
        self.sock: socket.socket | None = None  # TCP: the accepted socket (for peer_gone)
        self.cost = 0  # fixed memory cost accounted while admitted
        self.unsent = 0  # reply bytes accounted while writing is paused
        self.max_frame = server.max_frame
        self.busy = False  # an async call is in progress
        self.queued = False  # in the run queue (or parked by a rate limit) with a frame
        self.stepped = -1  # the server turn in which this connection last ran a frame
        self.gate_t0: float | None = None  # when fair_turn() let the current call go on
        self.closing = False
        self.eof = False
        self.write_paused = False
        self.read_paused = False
        self.opened = self.last = self.loop.time()
        self.frame_started: float | None = None  # first byte of the frame being received
        self.send_started = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.denied: str | None = None  # a refused peer: why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        server._protocols.add(self)
        # pause_writing() as soon as a reply is not taken at once, resume_writing() when all of
        # it is: "unsent reply" is exactly the paused state. (high=1, not 0: asyncio's TLS
        # transport pauses at size >= high, so 0 would pause with nothing to send.) On TLS, only
        # after this callback: the handshake may leave session tickets to flush, which asyncio
        # flushes right after connection_made() unless we paused reading for them.
        if self.kind == "tcp" and transport.get_extra_info("sslcontext") is not None:
            self.loop.call_soon(transport.set_write_buffer_limits, 1, 0)
        else:
            transport.set_write_buffer_limits(high=1, low=0)
        if self.kind == "unix":
            sock = transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            except OSError:
                creds = _UCRED.pack(0, -1, -1)  # cannot tell who it is: refused below
            pid, uid, gid = _UCRED.unpack(creds)
            self.peer = Peer("unix", uid, pid, self.path, gids=(gid, *_peer_groups(sock)))
            self.key = f"uid:{uid}"
            self.trusted = uid == server._own_uid
            why = server._refusal("unix", self.key, trusted=self.trusted)
            if why is not None:
                server._refuse(f"uid {uid} pid {pid}", why)
                self.closing = True
                transport.abort()
                return
            server._enter(self)
            if self.allowed is not None and uid not in self.allowed:
                # Answer its first call with PermissionDenied, then close: the client can tell
                # "refused" from "daemon gone". It never reaches a handler.
                server.rejected_connections += 1
                logger.warning("%s: refused uid=%d pid=%d on %s", server.name, uid, pid, self.path)
                self.denied = f"uid {uid} is not allowed on {self.path} ([control] allow_uids)"
        else:
            peercert = transport.get_extra_info("peercert")
            cert = _subject(peercert)
            rdns = tuple(pair for rdn in (peercert or {}).get("subject", ()) for pair in rdn)
            sans = tuple((peercert or {}).get("subjectAltName", ()))
            self.peer = Peer("tcp", None, None, self.address, cert, cert_rdns=rdns, cert_sans=sans)
            if cert is None:
                self.max_frame = server.max_frame_unauthenticated
            if not self.admitted:  # closed by close() during the handshake
                self.closing = True
                transport.abort()
                return
        if self.denied is None and server.admit is not None:
            self.denied = server.admit(self.peer)  # logged and counted by admit
        self._arm(self._deadline())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        self.server._protocols.discard(self)
        self.server._leave(self)
        self.buf = bytearray()
        if not self.gone.done():
            self.gone.set_result(None)

    def _drop(self) -> None:
        self.closing = True
        self.transport.abort()

    def peer_gone(self) -> bool:
        """True if the TCP peer reset the connection or closed its end (and sent nothing more).
        A connection waiting for its turn is not read, so this is how a client that left is
        noticed before its queued calls are run for nobody (at its rate limit, for seconds).
        The price: a TCP client that half-closes after pipelining calls gets no answer to
        those that had to wait. Unix peers are not checked (they are local and allowed)."""
        if self.sock is None:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # ECONNRESET and the like

    def eof_received(self) -> bool:
        self.eof = True
        self._poll()
        return not self.closing  # keep the transport open to answer what was already sent

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_started = self.loop.time()
        self.unsent = self.transport.get_write_buffer_size()
        self.server._account(self.unsent)
        self._arm(self.send_started + self.server.send_timeout)
        self._poll()

    def resume_writing(self) -> None:
        self.write_paused = False
        unsent, self.unsent = self.unsent, 0
        self.last = self.loop.time()
        self.server._account(-unsent)
        self._poll()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Reads land in the server's scratch buffer and are copied out in buffer_updated(),
        # in the same callback: no per-connection read buffer. Never 0 bytes (that reads as EOF).
        room = max(1, self.max_frame + 4 - len(self.buf))
        scratch = self.server._scratch
        return memoryview(scratch)[: min(room, len(scratch))]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        if not self.buf and self.frame_started is None:
            self.frame_started = self.loop.time()
            self._arm(self.frame_started + self.server.frame_timeout)
        self.buf += memoryview(self.server._scratch)[:nbytes]
        self.server._account(nbytes)
        self._poll()

    def _frame_size(self) -> int | None:
        """Size of the frame at the head of the buffer once its length is in, else None."""
        if len(self.buf) < 4:
            return None
        return int.from_bytes(self.buf[:4], "big", signed=True)

    def _poll(self) -> None:
        """Decide, after anything changed: offer a complete frame to the run queue, pause or
        resume reading, close after EOF once everything was answered."""
        if self.closing:
            return
        server = self.server
        size = self._frame_size()
        if size is not None:
            try:
                frame_length(self.buf, self.max_frame)
            except BadFrame as e:
                server.rejected_frames += 1
                logger.info("%s: closing %s: %s", server.name, self.peer, e)
                return self._drop()
        complete = size is not None and len(self.buf) >= 4 + size
        blocked = self.busy or self.write_paused
        if complete and not blocked and not self.queued:
            server._offer(self)  # ran it, queued it or parked it: look again
            return self._poll()
        if self.eof:
            if not (complete or blocked or self.queued):
                self.closing = True
                self.transport.close()  # sends what is buffered first
            return
        starved = not self.trusted and server.over_budget
        if starved:
            server._starved.add(self)
        else:
            server._starved.discard(self)
        pause = complete or blocked or self.queued or starved
        if pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif not pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def _take_frame(self) -> None:
        """Run the frame at the head of the buffer (the run queue says it is our turn)."""
        server, buf = self.server, self.buf
        size = self._frame_size()
        if self.closing or size is None or len(buf) < 4 + size or self.busy or self.write_paused:
            return self._poll()
        frame = bytes(buf[4 : 4 + size])
        del buf[: 4 + size]
        server._account(-(4 + size))
        now = self.last = self.loop.time()
        self.frame_started = now if buf else None
        try:
            outcome = server._call(frame, self)
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
            token = _CURRENT.set(self)
            try:
                task = self.loop.create_task(outcome, name=f"{server.name} {self.peer.address}")
            finally:
                _CURRENT.reset(token)
            server._tasks.add(task)
            task.add_done_callback(self._finished)
        self._poll()

    def _finished(self, task: asyncio.Task[bytes | None]) -> None:
        self.server._tasks.discard(task)
        self.busy = False
        self.last = self.loop.time()
        if task.cancelled() or self.closing:
            return
        reply = task.result()  # _finish turns every Exception into a reply
        if reply is not None:
            self.transport.write(reply)
        if self.denied is not None:  # refused while the call ran (close_peers)
            self.closing = True
            self.transport.close()
            return
        self._arm(self._deadline())
        self._poll()

    def _deadline(self) -> float:
        """When this connection is next due to be closed if nothing happens."""
        server = self.server
        if self.denied is not None:
            return self.opened + server.frame_timeout
        if self.write_paused:
            return self.send_started + server.send_timeout
        due = self.last + server.idle_timeout
        if self.frame_started is not None:
            due = min(due, self.frame_started + server.frame_timeout)
        return due

    def _arm(self, due: float) -> None:
        if self.timer is not None:
            if self.timer.when() <= due:
                return  # fires earlier; _check_idle looks again then
            self.timer.cancel()
        self.timer = self.loop.call_at(due, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per connection, moved lazily to the next deadline.
        self.timer = None
        if self.closing:
            return
        if self.busy:
            return  # a call in progress is not idleness; _finished re-arms the timer
        size = self._frame_size()
        if (self.queued or (size is not None and len(self.buf) >= 4 + size)) and not (
            self.write_paused or self.denied
        ):
            # A complete frame waiting for its turn is not the peer's delay.
            self._arm(self.loop.time() + self.server.frame_timeout)
            return
        due = self._deadline()
        if self.loop.time() < due:
            self._arm(due)
            return
        what = (
            "refused"
            if self.denied
            else "unread reply"
            if self.write_paused
            else "partial frame"
            if self.frame_started is not None
            else "idle"
        )
        logger.debug("%s: closing %s %s", self.server.name, what, self.peer)
        self.closing = True
        if self.transport.get_write_buffer_size():
            self.transport.abort()  # a peer that stopped reading our replies
        else:
            self.transport.close()


def _subject(cert: dict[str, Any] | None) -> str | None:
    if not cert or "subject" not in cert:
        return None
    return subject_text(pair for rdn in cert["subject"] for pair in rdn)


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

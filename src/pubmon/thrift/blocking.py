"""The blocking Thrift client the CLI uses: no thriftpy2, no asyncio, only socket and ``codec``.

``pubmon status`` must start and exit within 100 ms. Importing asyncio (with ssl, logging,
concurrent.futures) costs ~50 ms of that and importing any thriftpy2 module ~40 ms (its package
``__init__`` pulls in the IDL parser, ply, urllib and http.client), before the IDL is even
loaded. So this client speaks the framed binary protocol through ``codec`` from the generated
plain-data ``schema``, with the same rules as the async ``client``. Example::

    with BlockingClient(unix_socket="/run/pubmon/pubmon.sock", timeout=5) as client:
        for info in client.call("listPublishers"):
            print(info.name, info.state)

What comes back: structs as ``codec.Struct`` objects (every IDL field an attribute, None when
unset), lists (also for sets), dicts, ints (enums too), floats, bools, str and bytes
(``binary``). Declared IDL exceptions are raised as ``codec.DeclaredException`` subclasses
named after them (``exc.name``, ``exc.message``); the connection stays usable.
"""

from __future__ import annotations

__all__ = ["BlockingClient", "DeclaredException", "Struct"]

import socket
import time
from typing import Any, final

from pubmon.errors import RpcError
from pubmon.thrift.codec import (
    ApplicationError,
    DeclaredException,
    ProtocolViolation,
    Service,
    Struct,
    frame_length,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

_CHUNK = 1 << 16


@final
class BlockingClient:
    """One blocking connection to a PubmonService (framed binary protocol); connects at once.

    Give ``unix_socket``, or ``host`` and ``port``; with ``ssl_context`` the TCP connection
    speaks TLS, and the server's certificate is checked against ``host`` as the context says
    (``ssl.create_default_context`` checks the name). ``timeout`` bounds connecting and each whole
    call. Failing to connect raises ``RpcError`` with the ``OSError`` as its ``__cause__``.
    ``call`` raises ``DeclaredException`` for the IDL exceptions the method declares (the connection
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
        service: str | Service = "PubmonService",
    ) -> None:
        if ssl_context is not None and host is None:
            raise ValueError("TLS needs host and port")
        if unix_socket is not None and host is None and port is None:
            self.where, tcp = unix_socket, None
        elif unix_socket is None and host is not None and port is not None:
            self.where, tcp = f"{host}:{port}", (host, port)
        else:
            raise ValueError("give either unix_socket or both host and port")
        self.service = service if isinstance(service, Service) else Service(service)
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
        return f"<BlockingClient {self.where} {'open' if self._sock else 'closed'}>"

    def __enter__(self) -> BlockingClient:
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
        spec = self.service.method(method)
        seqid = (self._seqid + 1) & 0x7FFFFFFF
        data = self.service.encode_call(method, seqid, args)
        sock = self._sock
        if sock is None:
            raise RpcError(f"{self.where}: closed")
        self._seqid = seqid
        deadline = time.monotonic() + self.timeout
        try:
            self._check_quiet(sock)
            sock.settimeout(self.timeout)
            sock.sendall(data)
            if spec.oneway:  # no reply comes
                return None
            frame = self._read_frame(sock, deadline)
        except TimeoutError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: no reply within {self.timeout} s") from e
        except OSError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: connection lost: {e}") from e
        except (ProtocolViolation, ApplicationError) as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: {e}") from e
        except RpcError as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: {e}") from e.__cause__
        except BaseException:
            self.close()  # interrupted mid-call: a late reply would answer the next call
            raise
        try:
            return self.service.decode_reply(frame, spec, seqid)
        except (ProtocolViolation, ApplicationError) as e:
            self.close()
            raise RpcError(f"{self.where}: {method}: {e}") from e
        # a declared exception propagates: the reply was whole, the connection stays usable

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
        size = frame_length(self._read(sock, 4, deadline), self.max_frame)
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

"""A cheap fb303 `getStatus` answerer on many ports, for measuring the prober and not the child.

    fb303_responder.py FIRST_PORT COUNT [--buffered]

Listens on 127.0.0.1:FIRST_PORT .. FIRST_PORT+COUNT-1 and answers every framed (or buffered)
binary-protocol call with ALIVE (getStatus) or "" (anything else), by hand, without decoding
the arguments: a real demo publisher costs ~20 MiB and a Python interpreter each, so 1000 of
them would measure the machine, not the daemon's probing. Prints "ready" once every port
listens. Uses only the standard library.
"""

from __future__ import annotations

import asyncio
import struct
import sys

_VERSION = 0x80010000
_REPLY = 2
_ALIVE = 2


def _reply(name: bytes, seqid: int) -> bytes:
    body = struct.pack("!II", _VERSION | _REPLY, len(name)) + name + struct.pack("!i", seqid)
    if name == b"getStatus":
        body += struct.pack("!bhi", 8, 0, _ALIVE) + b"\x00"  # success: i32 field 0
    elif name == b"getStatusDetails":
        body += struct.pack("!bhI", 11, 0, 0) + b"\x00"  # success: "" (string field 0)
    else:
        body += b"\x00"  # void
    return body


class _Conn(asyncio.Protocol):
    def __init__(self, framed: bool) -> None:
        self.framed = framed
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = bytearray()
        while True:
            msg = self._one()
            if msg is None:
                break
            name, seqid = msg
            reply = _reply(name, seqid)
            out += struct.pack("!i", len(reply)) + reply if self.framed else reply
        if out and self.transport is not None:
            self.transport.write(bytes(out))

    def _one(self) -> tuple[bytes, int] | None:
        buf, off = self.buf, 4 if self.framed else 0
        if self.framed:
            if len(buf) < 4:
                return None
            size = struct.unpack_from("!i", buf)[0]
            if len(buf) < 4 + size:
                return None
        if len(buf) < off + 8:
            return None
        (n,) = struct.unpack_from("!I", buf, off + 4)
        if len(buf) < off + 8 + n + 4:
            return None
        name = bytes(buf[off + 8 : off + 8 + n])
        (seqid,) = struct.unpack_from("!i", buf, off + 8 + n)
        if self.framed:
            del buf[: 4 + size]
        else:  # the calls we answer carry at most one string argument, then STOP
            end = off + 8 + n + 4
            if len(buf) <= end:
                return None
            if buf[end] == 0:
                end += 1
            else:  # one string field: type(1) id(2) len(4) bytes, then STOP
                if len(buf) < end + 7:
                    return None
                (k,) = struct.unpack_from("!I", buf, end + 3)
                if len(buf) < end + 7 + k + 1:
                    return None
                end += 7 + k + 1
            del buf[:end]
        return name, seqid


async def main(first: int, count: int, framed: bool) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: _Conn(framed), "127.0.0.1", port, backlog=16)
        for port in range(first, first + count)
    ]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), "--buffered" not in sys.argv))

"""A hostile client of the daemon's Thrift listeners, run as another user (uid 65534) by
tests/test_rpc_limits.py and bench/floods.py. Standard library only, so any python runs it.

    attacker.py pipeline HOST PORT CONNS SECONDS FRAME_HEX   # pipelined calls, replies read
    attacker.py hold HOST PORT CONNS SIZE SECONDS             # SIZE-byte frame minus one byte
    attacker.py noread HOST PORT CONNS SECONDS FRAME_HEX      # one call each, reply never read
    attacker.py idle HOST PORT CONNS SECONDS                  # connect and say nothing
    attacker.py idle-unix PATH CONNS SECONDS                  # the same on a unix socket
    attacker.py squat PORT                                     # bind+listen 127.0.0.1:PORT

HOST "unix:PATH" means the unix socket at PATH. Every mode is bounded by SECONDS (squat: until
stdin closes), prints "ready" once its connections are open, and one JSON line at the end:
connections opened, how many the server closed, bytes sent and received.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import struct
import sys
import time


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def _connect(host: str, port: int) -> socket.socket | None:
    try:
        if host.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(host[5:])
        else:
            s = socket.create_connection((host, port), timeout=5)
    except OSError:
        return None
    s.setblocking(False)
    return s


def _open(host: str, port: int, conns: int) -> list[socket.socket]:
    _raise_fd_limit(conns)
    out = []
    for _ in range(conns):
        s = _connect(host, port)
        if s is not None:
            out.append(s)
    print("ready", flush=True)
    return out


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(65536, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _report(socks: list[socket.socket], **extra: int) -> None:
    closed = sum(_closed_by_server(s) for s in socks)
    print(json.dumps({"opened": len(socks), "closed_by_server": closed, **extra}), flush=True)
    for s in socks:
        s.close()


def pipeline(host: str, port: int, conns: int, seconds: float, frame: bytes) -> None:
    """Keep every connection's send buffer full of pipelined calls; read and drop replies."""
    socks = _open(host, port, conns)
    chunk = frame * max(1, (64 * 1024) // len(frame))
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent = received = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, events in sel.select(timeout=0.1):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                if events & selectors.EVENT_READ:
                    data = s.recv(256 * 1024)
                    if not data:
                        sel.unregister(s)
                        continue
                    received += len(data)
                if events & selectors.EVENT_WRITE:
                    sent += s.send(chunk)
            except BlockingIOError:
                pass
            except OSError:
                sel.unregister(s)
    _report(socks, sent=sent, received=received)


def hold(host: str, port: int, conns: int, size: int, seconds: float) -> None:
    """Each connection sends a frame header for SIZE bytes and all but the last byte."""
    socks = _open(host, port, conns)
    body = struct.pack(">i", size) + b"\x80" * (size - 1)
    sent = 0
    for s in socks:
        s.setblocking(True)
        s.settimeout(0.5)
        try:
            s.sendall(body)
            sent += len(body)
        except OSError:
            pass
        s.setblocking(False)
    print("sent", flush=True)
    time.sleep(seconds)
    _report(socks, sent=sent)


def noread(host: str, port: int, conns: int, seconds: float, frame: bytes) -> None:
    """Each connection sends one call and never reads the reply."""
    socks = _open(host, port, conns)
    sent = 0
    for s in socks:
        try:
            sent += s.send(frame)
        except OSError:
            pass
    print("sent", flush=True)
    time.sleep(seconds)
    _report(socks, sent=sent)


def idle(host: str, port: int, conns: int, seconds: float) -> None:
    socks = _open(host, port, conns)
    time.sleep(seconds)
    _report(socks)


def squat(port: int) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen(1)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "pipeline":
        pipeline(args[0], int(args[1]), int(args[2]), float(args[3]), bytes.fromhex(args[4]))
    elif mode == "hold":
        hold(args[0], int(args[1]), int(args[2]), int(args[3]), float(args[4]))
    elif mode == "noread":
        noread(args[0], int(args[1]), int(args[2]), float(args[3]), bytes.fromhex(args[4]))
    elif mode == "idle":
        idle(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif mode == "idle-unix":
        idle(f"unix:{args[0]}", 0, int(args[1]), float(args[2]))
    elif mode == "squat":
        squat(int(args[0]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

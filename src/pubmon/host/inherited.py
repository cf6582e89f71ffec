"""Listening sockets handed over by `pubmon upgrade`, for the listeners to reuse.

The new image puts them here (`pubmon.daemon.upgrade.Handover`) before the listeners start; a
listener asks for its own by key and serves it instead of binding: a client that connected
while the daemon was between the two images is in its backlog, and is answered.
Keys: "unix:<path>", "tcp:<host>:<port>", "http:<host>:<port>", as the config says them.
"""

from __future__ import annotations

__all__ = ["inherited_socket", "inherited_sockets", "offer", "unclaimed"]

import socket

_inherited: dict[str, socket.socket] = {}


def offer(key: str, sock: socket.socket) -> None:
    _inherited[key] = sock


def inherited_socket(key: str) -> socket.socket | None:
    """The listening socket handed over for `key`, once; None when there is none."""
    return _inherited.pop(key, None)


def inherited_sockets(key: str) -> list[socket.socket]:
    """Every socket handed over for `key` (a TCP listener may be one per address family: keys
    `key`, `key#1`, ...), once; [] when there is none."""
    out = []
    for i in range(16):
        sock = _inherited.pop(key if i == 0 else f"{key}#{i}", None)
        if sock is None:
            break
        out.append(sock)
    return out


def unclaimed() -> dict[str, socket.socket]:
    """Those no listener asked for (the config no longer listens there); forgets them."""
    out = dict(_inherited)
    _inherited.clear()
    return out

"""Small resource helpers for the Thrift server's limits: token buckets, file-descriptor headroom,
giving freed heap back to the kernel, and naming who holds a TCP port.

Kept apart from ``rpc`` so that the server module reads as connection handling; nothing here
knows about Thrift.
"""

from __future__ import annotations

__all__ = ["TokenBucket", "ensure_fd_limit", "malloc_trim", "port_holder"]

import ctypes
import ctypes.util
import logging
import os
import resource
import time
from typing import final

logger = logging.getLogger(__name__)

_TCP_TIME_WAIT = "06"  # /proc/net/tcp state; such entries have no socket (inode 0)


@final
class TokenBucket:
    """Seconds of handler time a peer may spend: refilled at ``rate`` per second up to ``burst``.

    Charged after the fact (a call's cost is known only once it ran), so the level may go
    negative; ``wait()`` is then how long until it is back at zero and the peer may go again.
    """

    __slots__ = ("burst", "level", "rate", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until the bucket is not in debt (0: go now)."""
        self._refill(now)
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def charge(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost

    @property
    def full(self) -> bool:
        return self.level >= self.burst


def ensure_fd_limit(need: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``need`` (never above the hard limit, never
    lower than it is); returns the soft limit now in force.

    systemd starts services with a soft limit of 1024: a TCP connection pool of that size
    would take every descriptor, and then the control socket, publishers' pipes and log files
    could not be opened. asyncio waits with epoll, so descriptors above 1024 are safe.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need if soft == resource.RLIM_INFINITY else soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    return soft


_libc: ctypes.CDLL | bool | None = False  # False: not looked up yet


def malloc_trim() -> bool:
    """Ask glibc to return free heap memory to the kernel (``malloc_trim(0)``).

    After a flood of connections the freed buffers stay in the process as free heap (glibc
    raised its mmap threshold when the first big buffers were freed, so later ones came from
    the heap): RSS stays at the flood's peak until something is trimmed. False where there is
    no glibc.
    """
    global _libc
    if _libc is False:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else None
        except OSError:
            _libc = None
        if _libc is not None and not hasattr(_libc, "malloc_trim"):
            _libc = None
    if not isinstance(_libc, ctypes.CDLL):
        return False
    _libc.malloc_trim(0)
    return True


def port_holder(port: int) -> str:
    """Who holds TCP ``port`` on this host, as "pid 123 (cmd line), uid 0", for an error
    message. Found through /proc/net/tcp{,6} (the socket's inode) and then /proc/*/fd; says
    "unknown" (with the owning uid when the kernel tells it) when no process we can see has it.
    """
    owners: dict[str, int] = {}  # "socket:[inode]" -> uid
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] == _TCP_TIME_WAIT or cols[9] == "0":
                continue
            try:
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
            except (IndexError, ValueError):
                continue
            if local_port == port:
                owners[f"socket:[{cols[9]}]"] = int(cols[7])
    if not owners:
        return "unknown"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link in owners:
                return f"pid {entry} ({_command(int(entry))}), uid {owners[link]}"
    uids = sorted(set(owners.values()))
    return f"unknown (a socket of uid {', '.join(map(str, uids))})"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return "?"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return text[:200] or "?"

"""A FUSE file system that never answers one name: a process that looks it up is stuck in the
kernel for good, and SIGKILL cannot end it (state D) until the test lets it go.

    with StuckFS(mountpoint) as fs:
        ...                      # a child runs os.stat(f"{mountpoint}/{STUCK}")
        fs.wait_stuck(bound)     # the lookup reached us: the child is stuck
        ...                      # stop it, SIGTERM the daemon, ...
    # leaving the block ends the mount: the lookup fails and a pending SIGKILL takes effect

Why: a FUSE request that the server has read is waited for uninterruptibly once a fatal signal
is pending (fs/fuse/dev.c, request_wait_answer), as on a dead NFS server or a wedged FUSE
daemon. That is the "child in D state on hung storage" of issue 10, and no other child can
refuse SIGKILL.

Speaks the kernel protocol on /dev/fuse directly (no libfuse, no package): INIT, GETATTR of the
root, STATFS and LOOKUP are answered (only LOOKUP of STUCK is kept unanswered), everything else
gets ENOSYS, so that a `df` or `ls` by anyone else does not hang too.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

STUCK = "stuck"

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
_OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_LOOKUP, _FORGET, _GETATTR, _STATFS, _INIT = 1, 2, 3, 17, 26
_INTERRUPT, _DESTROY, _BATCH_FORGET = 36, 38, 42
_NO_REPLY = {_FORGET, _INTERRUPT, _BATCH_FORGET}


def _attr(mode: int) -> bytes:
    # fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr (ino, size, blocks,
    # atime, mtime, ctime, their nsecs, mode, nlink, uid, gid, rdev, blksize, flags)
    now = int(time.time())
    return struct.pack("<QII", 1, 0, 0) + struct.pack(
        "<QQQQQQIIIIIIIIII", 1, 0, 0, now, now, now, 0, 0, 0, mode, 2, 0, 0, 0, 4096, 0
    )


class StuckFS:
    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.stuck = threading.Event()  # a lookup of STUCK is being kept waiting
        self._fd = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StuckFS:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other"
        if libc.mount(b"stuckfs", bytes(self.mountpoint), b"fuse", 0, opts.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mount fuse on {self.mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, daemon=True, name="stuckfs")
        self._thread.start()
        return self

    def wait_stuck(self, bound: float) -> None:
        if not self.stuck.wait(bound):
            raise AssertionError(f"no lookup of {STUCK} reached the file system in {bound:g} s")

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Closing the device aborts the connection: the kept request ends with ENOTCONN.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._fd)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def _reply(self, unique: int, error: int = 0, body: bytes = b"") -> None:
        try:
            os.write(self._fd, _OUT_HEADER.pack(16 + len(body), -error, unique) + body)
        except OSError:
            pass  # the request was interrupted meanwhile: the kernel no longer wants it

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                return  # unmounted
            _, opcode, unique, nodeid, *_ = _IN_HEADER.unpack_from(data)
            body = data[_IN_HEADER.size :]
            if opcode in _NO_REPLY:
                continue
            if opcode == _INIT:
                # fuse_init_out: major, minor, max_readahead, flags, max_background,
                # congestion_threshold, max_write, time_gran, max_pages, map_alignment,
                # flags2, max_stack_depth, request_timeout, unused[11]
                out = struct.pack(
                    "<IIIIHHIIHHIIH22x", 7, 31, 0, 0, 16, 12, 1 << 17, 1, 0, 0, 0, 0, 0
                )
                self._reply(unique, body=out)
            elif opcode == _GETATTR and nodeid == 1:
                self._reply(unique, body=_attr(stat.S_IFDIR | 0o755))
            elif opcode == _STATFS:
                self._reply(unique, body=bytes(80))
            elif opcode == _LOOKUP:
                if body.rstrip(b"\0") == STUCK.encode():
                    self.stuck.set()  # never answered
                else:
                    self._reply(unique, errno.ENOENT)
            elif opcode == _DESTROY:
                return
            else:
                self._reply(unique, errno.ENOSYS)

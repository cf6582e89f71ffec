"""The rotating log file behind `pubmon.output.OutputLog`: raw appends, rotation, self-healing.

Writes are unbuffered `os.writev` calls on an fd opened O_WRONLY|O_APPEND|O_CREAT|O_CLOEXEC, one
call per block of whole lines, so rotation (which happens only between our writes) never splits a
line across files. A failed write never raises: `write` returns the lines it lost and `error` holds
the cause until a write succeeds again. The caller decides what to log.

Retries: a write that fails on an open fd (ENOSPC, EIO) is simply tried again with the next block.
A file that is gone (deleted, directory removed) is reopened, recreating the directory, at once;
after a failed open the next attempt waits RETRY_INTERVAL, and lines are lost meanwhile.
"""

from __future__ import annotations

__all__ = ["RETRY_INTERVAL", "Buf", "LogFile"]

import errno
import os
import time
from collections.abc import Sequence
from typing import final

RETRY_INTERVAL = 1.0  # seconds between attempts to reopen a file that vanished or won't open
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o640
_DIR_MODE = 0o750

Buf = bytes | bytearray | memoryview


@final
class LogFile:
    """`path`, rotated to `path.1 .. path.<backups>` before a write would take it past `max_bytes`.

    `max_bytes` = 0 never rotates; `backups` = 0 truncates in place instead. The size is read with
    fstat before every write, so a file truncated behind our back (logrotate's copytruncate) is
    measured right, and a file that was deleted, or whose directory was removed, is noticed
    (st_nlink == 0) and recreated instead of writing into an unlinked inode where nobody would
    ever see the lines.
    """

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.error: OSError | None = None  # why the last write or open failed; None while healthy
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self._torn = False  # a failed write stopped inside a line: end it before the next one
        self._closed = False
        self.reopen()

    def write(self, bufs: Sequence[Buf], nlines: int) -> int:
        """Append `bufs` (whole lines, `nlines` of them) in one writev; return the lines lost."""
        if self._closed:
            return nlines
        if self._torn:
            bufs = [b"\n", *bufs]
        total = sum(map(len, bufs))
        done = 0
        try:
            fd = self._usable_fd()
            if fd is None:
                return nlines
            if self._size > 0 and self.max_bytes > 0 and self._size + total > self.max_bytes:
                fd = self._rotate(fd)
            done = os.writev(fd, bufs)
            if done < total:  # a short write (signal, quota): finish it byte-exactly
                rest = memoryview(b"".join(bufs))
                while done < total:
                    done += os.write(fd, rest[done:])
        except OSError as exc:
            self.error = exc
            if not done:
                return nlines
            joined = b"".join(bufs)
            self._torn = joined[done - 1] != 0x0A
            return joined.count(b"\n", done)
        self.error = None
        self._torn = False
        return 0

    def reopen(self) -> None:
        """Close and open `path` again now (logrotate moved it away, or an operator asks)."""
        self._closed = False
        self._close_fd()
        try:
            self._open(0)
        except OSError as exc:
            self.error = exc
            self._retry_at = time.monotonic() + RETRY_INTERVAL
        else:
            self._retry_at = 0.0

    def close(self) -> None:
        """Close the file; later writes count as lost (nothing is logged) until `reopen`."""
        self._closed = True
        self._close_fd()

    def _usable_fd(self) -> int | None:
        fd = self._fd
        if fd is not None:
            try:
                st = os.fstat(fd)
            except OSError:
                st = None
            if st is not None and st.st_nlink > 0:
                self._size = st.st_size
                return fd
            self._close_fd()  # deleted, or its directory removed: make a new one
        now = time.monotonic()
        if now < self._retry_at:
            if self.error is None:
                self.error = OSError(errno.ENOENT, "log file vanished; retrying", self.path)
            return None
        try:
            return self._open(0)
        except OSError:
            self._retry_at = now + RETRY_INTERVAL  # only failures wait: a success may recur at once
            raise

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(self.path, _FLAGS | flags, _FILE_MODE)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.path) or ".", mode=_DIR_MODE, exist_ok=True)
            fd = os.open(self.path, _FLAGS | flags, _FILE_MODE)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        return fd

    def _rotate(self, old: int) -> int:
        flags = os.O_TRUNC
        if self.backups > 0:
            flags = 0
            path = self.path
            for i in range(self.backups - 1, 0, -1):
                try:
                    os.rename(f"{path}.{i}", f"{path}.{i + 1}")
                except FileNotFoundError:
                    pass
            try:
                os.rename(path, f"{path}.1")
            except FileNotFoundError:
                pass  # moved away since the fstat: the new file starts empty all the same
        self._fd = None
        try:
            return self._open(flags)
        finally:
            os.close(old)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

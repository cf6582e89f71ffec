"""The rotating log file behind `output.OutputLog`, written only by its directory's thread.

Every method here runs on the log writer thread of the file's directory (`pubmon.core.logwriter`),
never on the event loop: any of these system calls can block for as long as the storage hangs.

Writes are unbuffered `os.writev` calls on an fd opened O_WRONLY|O_APPEND, one call per run of
whole-line blocks, so rotation (which happens only between our writes) never splits a line across
files. A failed write never raises: the bytes and lines it lost are added to `lost_bytes` and
`lost_lines`, and `error` holds the cause until a write succeeds again. One warning is logged
when a failure episode starts and one info line, with what it lost, when it ends.

The daemon runs as root and the log directory may be writable by others, so the file is opened
the way a root daemon must (the fix of a "root writes through a symlink" report):
- only by name relative to a directory fd of `log_dir` (`openat`), with O_NOFOLLOW (a symlink
  in its place is refused), O_NONBLOCK (a FIFO in its place cannot hang the open) and O_NOCTTY;
- a missing file is created with O_CREAT|O_EXCL, so a name that appears meanwhile is never
  adopted blindly; an existing one is opened and then checked with fstat: a regular file, owned
  by the daemon's euid, with exactly one link (a hard link to someone else's file has two);
- rotation renames relative to the directory fd; with `backups` = 0 the file is truncated through
  the checked fd (ftruncate), never by path; a deleted file is recreated through the directory fd.
Who may read them: files are created 0640 in a 0750 directory; with `[daemon] log_group` /
`log_mode` every open (creation, rotation, reopen after logrotate) gives the file that group and
mode through its fd (fchown, fchmod), and the directory the same group with the matching x bits,
so the operators the control socket lets read logs can read the files too. `clear` (`pubmon
clear`) empties the file through the checked fd and unlinks its rotated copies by name relative
to the directory fd.
A refused file counts as a failure like any other: its bytes are dropped and counted, the reason
(with the path) is logged once, and the open is tried again every RETRY_INTERVAL.

Retries: a write that fails on an open fd (ENOSPC, EIO) is simply tried again with the next run.
A file that is gone (deleted, directory removed) is reopened, recreating the directory, at once;
after a failed open the next attempt waits RETRY_INTERVAL, and lines are lost meanwhile.
"""

from __future__ import annotations

__all__ = ["RETRY_INTERVAL", "Buf", "LogDir", "LogFile", "Run", "dir_mode"]

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from typing import final

logger = logging.getLogger(__name__)

RETRY_INTERVAL = 1.0  # seconds between attempts to reopen a file that vanished or won't open
IOV_MAX = 1024  # buffers one writev may take (Linux UIO_MAXIOV)
_OPEN = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_CREATE = _OPEN | os.O_CREAT | os.O_EXCL
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_MODE = 0o640
_DIR_MODE = 0o750


def dir_mode(file_mode: int) -> int:
    """The log directory's mode for files of `file_mode`: rwx for the owner, and r-x for whoever
    may read the files (0640 -> 0750, 0644 -> 0755); never writable by anyone else."""
    mode = 0o700
    if file_mode & 0o040:
        mode |= 0o050
    if file_mode & 0o004:
        mode |= 0o005
    return mode


Buf = bytes | bytearray | memoryview
Run = tuple[Sequence[Buf], int, int]  # one block of whole lines: (buffers, bytes, lines)


@final
class LogDir:
    """A directory fd of `log_dir`, opened (and the directory made) on first use.

    The fd is refreshed when the directory it names was removed (st_nlink 0) and on `refresh`
    (SIGUSR1): after `mv log_dir log_dir.old; mkdir log_dir` new files go to the new directory.
    Whether `log_dir` and its parents can be trusted is checked once at start, elsewhere.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # [daemon] log_group / log_mode, set by the files using it (see LogFile.access): the
        # directory's group and mode follow, so the operators of log_group can list it.
        self.gid: int | None = None
        self.mode = _DIR_MODE
        self._fd: int | None = None

    def fd(self) -> int:
        fd = self._fd
        if fd is not None:
            try:
                alive = os.fstat(fd).st_nlink > 0
            except OSError:
                alive = False
            if alive:
                return fd
            self.close()
        try:
            fd = os.open(self.path, _DIR_FLAGS)
        except FileNotFoundError:
            os.makedirs(self.path, mode=self.mode, exist_ok=True)
            fd = os.open(self.path, _DIR_FLAGS)
        self._fd = fd
        self.apply(fd)
        return fd

    def apply(self, fd: int | None = None) -> None:
        """Give the directory log_group and the mode that goes with log_mode (when they are
        set; else it is left as the operator made it). Only a directory the daemon owns is
        changed."""
        fd = self._fd if fd is None else fd
        if fd is None or (self.gid is None and self.mode == _DIR_MODE):
            return
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                return
            if self.gid is not None and st.st_gid != self.gid:
                os.fchown(fd, -1, self.gid)
            if stat.S_IMODE(st.st_mode) != self.mode:
                os.fchmod(fd, self.mode)
        except OSError as exc:
            logger.warning(
                "log directory %s: cannot set group %s, mode %o (%s)",
                self.path, self.gid, self.mode, exc.strerror or exc,
            )  # fmt: skip

    def refresh(self) -> None:
        """Drop the fd if `path` now names another directory (or none); the next use reopens."""
        if self._fd is None:
            return
        try:
            now = os.stat(self.path)
            held = os.fstat(self._fd)
        except OSError:
            self.close()
            return
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        _close(fd)


def _close(fd: int | None) -> None:
    """Close `fd` if there is one; a failure to close leaves nothing to do."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _refused(path: str, why: str) -> OSError:
    return OSError(errno.EPERM, f"refused: {why}", path)


@final
class LogFile:
    """`<dir>/<name>`, rotated to `<name>.1 .. .<backups>` before a write would take it past
    `max_bytes`.

    `max_bytes` = 0 never rotates; `backups` = 0 truncates in place (through the fd) instead. The
    size is read with fstat before every write, so a file truncated behind our back (logrotate's
    copytruncate) is measured right, and a file that was deleted, or whose directory was removed,
    is noticed (st_nlink == 0) and recreated instead of writing into an unlinked inode where
    nobody would ever see the lines. `max_bytes` and `backups` may be set from the event loop
    (a reload); the thread reads them before each write.
    """

    def __init__(
        self,
        owner: str,
        directory: LogDir,
        name: str,
        max_bytes: int,
        backups: int,
        *,
        legacy: str | None = None,
        gid: int | None = None,
        mode: int | None = None,
    ):
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"log file name {name!r} is not a plain name")
        self.owner = owner  # the publisher, for log lines
        self.dir = directory
        self.name = name
        self.path = os.path.join(directory.path, name)
        self.max_bytes = max_bytes
        self.backups = backups
        # The name an older pubmon gave this file ("api:0.log"): found at the first open, it is
        # renamed to `name`, with its backups, so its lines go on in one file under one name.
        self.legacy = legacy
        # [daemon] log_group / log_mode (None: not set; files are created 0640): set from the
        # loop (a reload), applied by the thread at every open (creation, rotation, reopen).
        self.gid = gid
        self.mode = mode
        self.cleared: tuple[list[str], str] | None = None  # the last clear: (paths, error)
        self._access_warned: tuple[int | None, int | None] | None = None
        self.error: OSError | None = None  # why the last write or open failed; None while healthy
        self.lost_bytes = 0  # written by the writer thread only
        self.lost_lines = 0
        self._episode_from = (0, 0)  # lost_bytes, lost_lines when the current failure began
        self._fd: int | None = None
        self._size = 0
        self._retry_at = 0.0
        self._torn = False  # a failed write stopped inside a line: end it before the next one
        self._closed = True
        self._failing = False

    # --- what the writer thread calls ---------------------------------------------------------

    def write(self, runs: Sequence[Run]) -> None:
        """Append `runs` in order, as few writevs as rotation and IOV_MAX allow."""
        i = 0
        while i < len(runs):
            if self._closed:
                self._lose(runs[i:])
                return
            try:
                fd = self._usable_fd()
            except OSError as exc:
                self._fail(exc, runs[i:])
                return
            if fd is None:
                self._lose(runs[i:])
                return
            bufs, total, j = self._gather(runs, i)
            try:
                if self._size > 0 and self.max_bytes > 0 and self._size + total > self.max_bytes:
                    fd = self._rotate(fd)
                    bufs, total, j = self._gather(runs, i)  # the room grew: more may fit now
            except OSError as exc:
                self._fail(exc, runs[i:])
                return
            self._writev(fd, bufs, total, runs[i:j])
            i = j

    def reopen(self) -> None:
        """Close and open the file again now (logrotate moved it away, or an operator asks)."""
        self._closed = False
        self._close_fd()
        try:
            self._open()
        except OSError as exc:
            self._fail(exc, ())
            self._retry_at = time.monotonic() + RETRY_INTERVAL
        else:
            self._retry_at = 0.0

    def close(self) -> None:
        """Close the file; later runs count as lost (nothing is logged) until `reopen`."""
        self._closed = True
        self._close_fd()

    def clear(self) -> None:
        """Empty the file (through its checked fd) and remove its rotated copies `name.1`,
        `name.2`, ... (any number: backups may have shrunk). Other files (logrotate's
        `name.1.gz`) are left alone. The result goes to `cleared`: (paths, "" or the error)."""
        done: list[str] = []
        try:
            fd = None if self._closed else self._usable_fd()
            if fd is not None:
                os.ftruncate(fd, 0)
                self._size = 0
                self._torn = False
                done.append(self.path)
            dfd = self.dir.fd()
            pattern = re.compile(re.escape(self.name) + r"\.[0-9]+")
            for entry in sorted(os.listdir(dfd)):
                if pattern.fullmatch(entry):
                    try:
                        os.unlink(entry, dir_fd=dfd)
                    except FileNotFoundError:
                        continue
                    done.append(os.path.join(self.dir.path, entry))
        except OSError as exc:
            self.cleared = (done, f"{exc.filename or self.path}: {exc.strerror or exc}")
            return
        self.cleared = (done, "")

    # --- internals ----------------------------------------------------------------------------

    def _gather(self, runs: Sequence[Run], i: int) -> tuple[list[Buf], int, int]:
        """Buffers of runs[i:j] for one writev: the first run, then more while they fit."""
        cap = self.max_bytes
        limit = cap - self._size if self._size > 0 else cap  # <= 0: only the first run
        bufs: list[Buf] = [b"\n"] if self._torn else []
        total = len(bufs)
        j = i
        while j < len(runs):
            run_bufs, nbytes, _ = runs[j]
            if j > i and (len(bufs) + len(run_bufs) > IOV_MAX or (cap and total + nbytes > limit)):
                break
            bufs.extend(run_bufs)
            total += nbytes
            j += 1
        return bufs, total, j

    def _writev(self, fd: int, bufs: list[Buf], total: int, runs: Sequence[Run]) -> None:
        done = 0
        try:
            done = os.writev(fd, bufs)
            if done < total:  # a short write (signal, quota): finish it byte-exactly
                rest = memoryview(b"".join(bufs))
                while done < total:
                    done += os.write(fd, rest[done:])
        except OSError as exc:
            self._size += done
            joined = b"".join(bufs)
            skip = max(done, 1 if self._torn else 0)  # a leading b"\n" ends a torn line: no run's
            if done:
                self._torn = joined[done - 1] != 0x0A
            self._count(total - skip, joined.count(b"\n", skip))
            self._note(exc)
            return
        self._size += total
        self._torn = False
        self._note(None)

    def _fail(self, exc: OSError, runs: Sequence[Run]) -> None:
        self._lose(runs)
        self._note(exc)

    def _lose(self, runs: Sequence[Run]) -> None:
        self._count(sum(r[1] for r in runs), sum(r[2] for r in runs))

    def _count(self, nbytes: int, nlines: int) -> None:
        self.lost_bytes += nbytes
        self.lost_lines += nlines

    def _note(self, exc: OSError | None) -> None:
        """Log the edges of a failure episode: one warning when it starts, one info when it ends."""
        if exc is not None:
            self.error = exc
            if not self._failing:
                self._failing = True
                logger.warning(
                    "%s: cannot write log file %s (%s); its lines are dropped from the file until"
                    " it works again (they still reach the ring and tail)",
                    self.owner,
                    self.path,
                    exc.strerror or exc,
                )
            return
        self.error = None
        if self._failing:
            self._failing = False
            lost_bytes = self.lost_bytes - self._episode_from[0]
            lost_lines = self.lost_lines - self._episode_from[1]
            self._episode_from = (self.lost_bytes, self.lost_lines)
            logger.info(
                "%s: writing log file %s again; %d bytes (%d lines) dropped meanwhile",
                self.owner,
                self.path,
                lost_bytes,
                lost_lines,
            )
        else:
            self._episode_from = (self.lost_bytes, self.lost_lines)

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
            return self._open()
        except OSError:
            self._retry_at = now + RETRY_INTERVAL  # only failures wait: a success may recur at once
            raise

    def _open(self) -> int:
        """Open or create the file through the directory fd, and check what was opened."""
        dfd = self.dir.fd()
        if self.legacy is not None:
            self._migrate(dfd, self.legacy)
            self.legacy = None
        try:
            fd = self._openat(dfd)
        except FileNotFoundError:
            self.dir.close()  # the directory itself went away meanwhile: make it again
            fd = self._openat(self.dir.fd())
        try:
            st = os.fstat(fd)
            self._check(st)
            self._access(fd, st)
            os.set_blocking(fd, True)  # O_NONBLOCK only guarded the open
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = st.st_size
        return fd

    def _openat(self, dfd: int) -> int:
        for _ in range(3):  # a name that comes and goes between the two calls: look again
            try:
                return os.open(self.name, _OPEN, dir_fd=dfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _refused(self.path, "it is a symbolic link") from None
                if exc.errno == errno.ENXIO:
                    raise _refused(self.path, "it is a FIFO or socket") from None
                raise
            try:
                mode = _FILE_MODE if self.mode is None else self.mode
                return os.open(self.name, _CREATE, mode, dir_fd=dfd)
            except FileExistsError:
                continue
        raise OSError(errno.EAGAIN, "the log file keeps appearing and vanishing", self.path)

    def _access(self, fd: int, st: os.stat_result) -> None:
        """log_group and log_mode, on the file just opened (created, rotated, or put there by
        logrotate's `create`) and on its directory. With neither set, files are created 0640
        (less with a umask) and left as they are."""
        gid, mode = self.gid, self.mode
        if gid is None and mode is None:
            return
        try:
            # Mode first: a group the daemon may not give (EPERM when it is not root and not
            # in that group) must not keep the file at a mode it was not asked for.
            if mode is not None and stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
            if gid is not None and st.st_gid != gid:
                os.fchown(fd, -1, gid)
        except OSError as exc:  # the lines still go to the file: say so once, do not refuse it
            if (gid, mode) != self._access_warned:
                self._access_warned = (gid, mode)
                logger.warning(
                    "%s: cannot give log file %s group %s, mode %s (%s)",
                    self.owner, self.path, gid, None if mode is None else f"{mode:04o}",
                    exc.strerror or exc,
                )  # fmt: skip
        directory = self.dir
        want = dir_mode(_FILE_MODE if mode is None else mode)
        if directory.gid != gid or directory.mode != want:
            directory.gid, directory.mode = gid, want
            directory.apply()

    def _migrate(self, dfd: int, legacy: str) -> None:
        """`legacy` and its backups become `name` and its backups, if `name` does not exist."""
        try:
            os.stat(self.name, dir_fd=dfd, follow_symlinks=False)
            return  # already there: the legacy files (if any) are left for the operator
        except FileNotFoundError:
            pass
        moved = 0
        for suffix in ("", *(f".{i}" for i in range(1, max(self.backups, 0) + 1))):
            try:
                st = os.stat(legacy + suffix, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue
                os.rename(legacy + suffix, self.name + suffix, src_dir_fd=dfd, dst_dir_fd=dfd)
                moved += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning(
                    "%s: cannot rename old log file %s to %s (%s)",
                    self.owner, legacy + suffix, self.name + suffix, exc.strerror or exc,
                )  # fmt: skip
        if moved:
            logger.info(
                "%s: log file %s renamed to %s (file names no longer contain ':'), %d file(s)",
                self.owner, os.path.join(self.dir.path, legacy), self.path, moved,
            )  # fmt: skip

    def _check(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise _refused(self.path, "not a regular file")
        uid = os.geteuid()
        if st.st_uid != uid:
            raise _refused(self.path, f"owned by uid {st.st_uid}, not the daemon's uid {uid}")
        if st.st_nlink != 1:
            raise _refused(self.path, f"it has {st.st_nlink} hard links")

    def _rotate(self, old: int) -> int:
        if self.backups <= 0:
            os.ftruncate(old, 0)  # the checked inode, never a name that may have been swapped
            self._size = 0
            return old
        dfd = self.dir.fd()
        name = self.name
        for i in range(self.backups - 1, 0, -1):
            try:
                os.rename(f"{name}.{i}", f"{name}.{i + 1}", src_dir_fd=dfd, dst_dir_fd=dfd)
            except FileNotFoundError:
                pass
        try:
            os.rename(name, f"{name}.1", src_dir_fd=dfd, dst_dir_fd=dfd)
        except FileNotFoundError:
            pass  # moved away since the fstat: the new file starts empty all the same
        self._close_fd()
        return self._open()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        _close(fd)

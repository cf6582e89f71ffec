"""A loopback FUSE file system that a test can tell to hang and to recover.

    python tests/hangfs.py BACKING MOUNTPOINT

Mounts BACKING on MOUNTPOINT (foreground, one thread per request) and prints "ready" once the
kernel has mounted it. Commands on stdin, one per line:
- "hang": every operation that reaches the file system blocks (as on a dead NFS server or FUSE
  daemon: the caller waits in the kernel);
- "ok": blocked and later operations go on.
Ends when the file system is unmounted; stdin's EOF lets everything go on (so an unmount by a
test that died halfway cannot hang on us).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

import mfusepy as fuse

_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")


class HangFS(fuse.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = root
        self.gate = threading.Event()
        self.gate.set()

    def _path(self, path: str) -> str:
        self.gate.wait()
        return os.path.join(self.root, path.lstrip("/"))

    def init(self, path: str) -> None:
        print("ready", flush=True)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        try:
            st = os.fstat(fh) if fh is not None else os.lstat(self._path(path))
        except FileNotFoundError:
            raise fuse.FuseOSError(errno.ENOENT) from None
        out: dict[str, Any] = {key: getattr(st, key) for key in _STAT_KEYS}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def mkdir(self, path: str, mode: int) -> int:
        os.mkdir(self._path(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def unlink(self, path: str) -> int:
        os.unlink(self._path(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        os.symlink(source, self._path(target))
        return 0

    def rename(self, old: str, new: str) -> int:
        os.rename(self._path(old), self._path(new))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        os.utime(self._path(path), ns=times)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is not None:
            self.gate.wait()
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def open(self, path: str, flags: int) -> int:
        return os.open(self._path(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))

    def create(self, path: str, mode: int, fi: object = None) -> int:
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self.gate.wait()
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self.gate.wait()
        return os.pwrite(fh, data, offset)

    def flush(self, path: str, fh: int) -> int:
        self.gate.wait()
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.gate.wait()
        os.fsync(fh)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)  # never blocks: closing must always be possible
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {key: getattr(st, key) for key in (*keys, "f_namemax")}


def _commands(fs: HangFS) -> None:
    for line in sys.stdin:
        if line.strip() == "hang":
            fs.gate.clear()
        elif line.strip() == "ok":
            fs.gate.set()
        print("done " + line.strip(), flush=True)
    fs.gate.set()


def main() -> None:
    backing, mountpoint = sys.argv[1:3]
    fs = HangFS(os.path.realpath(backing))
    threading.Thread(target=_commands, args=(fs,), daemon=True).start()
    fuse.FUSE(fs, mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()

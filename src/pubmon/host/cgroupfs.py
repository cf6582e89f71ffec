"""Where cgroup2 is mounted here, and whether a path can be a cgroup2 directory for pubmon.

Read by the config loader (a `[daemon] cgroup` that cannot work is a config error) and by
`pubmon.core.cgroup`, which creates and drives the groups. `FileWatch` is inotify on cgroup
files: the memory check waits on memory.events instead of reading memory.current each second.
"""

from __future__ import annotations

__all__ = ["FileWatch", "cgroup2_problem", "mount_of", "mounts"]

import ctypes
import os
import struct


def mounts() -> list[str]:
    """Mount points of cgroup2 hierarchies, longest first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                out.append(fields[4])
    return sorted(out, key=len, reverse=True)


def mount_of(path: str) -> str | None:
    for mount in mounts():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return mount
    return None


def cgroup2_problem(path: str) -> str | None:
    """Why `path` cannot be a cgroup2 directory for pubmon ("an absolute path ..."), or None."""
    if not os.path.isabs(path):
        return f"an absolute path, got {path!r}"
    if mount_of(os.path.normpath(path)) is None:
        return (
            f"a directory in a cgroup2 hierarchy, got {path} (cgroup2 is mounted at "
            + (", ".join(mounts()) or "no place here")
            + ")"
        )
    if not os.path.isfile(os.path.join(path, "cgroup.procs")):
        return f"an existing cgroup2 directory, got {path} (no cgroup.procs in it)"
    return None


# inotify(7): the kernel notifies a change of a cgroup file (cgroup.events, memory.events) as
# IN_MODIFY on it, and a write to a plain file does the same (tests use a plain directory).
_IN_MODIFY = 0x2
_IN_IGNORED = 0x8000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then `len` bytes of name)


class FileWatch:
    """IN_MODIFY watches on files, one inotify fd for all of them: `add(path)` gives a watch
    descriptor, `read()` the descriptors whose file changed since the last call (the fd is
    non-blocking; hand it to the loop's add_reader)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._rm_watch = libc.inotify_rm_watch
        self._rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def add(self, path: str) -> int:
        wd = int(self._add_watch(self.fd, os.fsencode(path), _IN_MODIFY))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{os.strerror(err)}: {path}")
        return wd

    def remove(self, wd: int) -> None:
        self._rm_watch(self.fd, wd)  # EINVAL when the file went away first: nothing to do

    def read(self) -> set[int]:
        changed: set[int] = set()
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return changed
            pos = 0
            while pos < len(buf):
                wd, mask, _, size = _EVENT.unpack_from(buf, pos)
                pos += _EVENT.size + size
                if not mask & _IN_IGNORED:
                    changed.add(wd)

    def close(self) -> None:
        os.close(self.fd)

"""One daemon per config file: an flock on a file that only the daemon's uid can create.

The lock used to be an abstract unix socket named after the config's real path. Anyone can
compute that name and bind it first, and the daemon then refused to start (exit 3): any local
user could keep pubmon from starting. A lock file avoids that only if nobody else can create,
replace or hold the file, so it lives in a directory that only the daemon's uid can write:

- root: /run/pubmon/locks (0700; /run/pubmon 0755, as the unit's RuntimeDirectory makes it);
- another uid: $XDG_RUNTIME_DIR/pubmon/locks (the per-user 0700 directory logind makes), or,
  without it, /tmp/pubmon-<uid>/locks (0700). Someone who made /tmp/pubmon-<uid> first gets
  it refused by name (set XDG_RUNTIME_DIR to a private directory then).

Every directory on the way is checked as `_trust.check_path` describes (owned by root or us,
not writable by others). The file is named after sha256(real path of the config), opened
relative to the directory's fd with O_NOFOLLOW, and fstat-checked (a regular file of ours with
one link) before `flock(LOCK_EX | LOCK_NB)`. The holder writes its pid into it, so a second
daemon names the first. The kernel drops an flock when its holder dies, however it dies. A
daemon that stops removes its file while still holding it; so that a daemon which opened the
file just before could not go on with a lock on a removed file, a new holder checks that the
name still leads to the file it locked, and starts over when not. An editor that replaces the
config by a rename changes nothing: the name comes from the config's path.
"""

from __future__ import annotations

__all__ = ["DaemonLock", "acquire_lock", "lock_dir"]

import fcntl
import hashlib
import os
import stat

from pubmon.errors import StartupError
from pubmon.host.trust import make_trusted_dirs

_ROOT_DIR = "/run/pubmon/locks"


def lock_dir() -> str:
    """Where this uid's daemons keep their lock files (see the module docstring)."""
    if os.geteuid() == 0:
        return _ROOT_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "pubmon", "locks")
    return f"/tmp/pubmon-{os.geteuid()}/locks"


class DaemonLock:
    """A held lock: keep it until the daemon exits, then `close()` it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd: int | None = fd
        self.path = path

    def close(self) -> None:
        """Remove the file, then release the lock (in that order: see the module docstring)."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __repr__(self) -> str:
        return f"<DaemonLock {self.path} {'held' if self.fd is not None else 'released'}>"


def acquire_lock(config_path: str, directory: str | None = None) -> DaemonLock:
    """Take the lock for `config_path` (in `directory`, default `lock_dir()`), or raise
    StartupError: another daemon holds it (named with its pid), or the place is not safe."""
    real = os.path.realpath(config_path)
    where = lock_dir() if directory is None else directory
    parent_mode = 0o755 if os.geteuid() == 0 else 0o700
    try:
        bad = make_trusted_dirs(os.path.dirname(where), parent_mode) or make_trusted_dirs(
            where, 0o700
        )
    except OSError as exc:  # a read-only /run, say
        raise StartupError(f"cannot create the daemon lock directory {where}: {exc}") from exc
    if bad is not None:
        raise StartupError(f"cannot take the daemon lock in {where}: {bad}")
    name = hashlib.sha256(real.encode()).hexdigest()[:40] + ".lock"
    path = os.path.join(where, name)
    while True:
        fd = _open_checked(where, name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StartupError(
                    f"another pubmon daemon is already running with {config_path} "
                    f"({_holder(fd)} holds the lock {path} for {real})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n{real}\n".encode(), 0)
                return DaemonLock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed by the holder that just stopped: take the new file


def _open_checked(where: str, name: str) -> int:
    """Open (or create) `name` in `where` without following a link; check what it is."""
    path = os.path.join(where, name)
    dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        fd = os.open(name, flags, 0o600, dir_fd=dfd)
    except OSError as exc:
        raise StartupError(f"cannot open the daemon lock {path}: {exc.strerror}") from exc
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise StartupError(
            f"refusing the daemon lock {path}: expected a regular file owned by uid "
            f"{os.geteuid()} with one link, found mode {st.st_mode:o} uid {st.st_uid} "
            f"links {st.st_nlink} (remove it)"
        )
    return fd


def _holder(fd: int) -> str:
    """'pid N' from the lock file, or a phrase when the holder has not written it yet."""
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0]
    except OSError:
        first = b""
    return f"pid {int(first)}" if first.isdigit() else "a daemon whose pid is not written yet"

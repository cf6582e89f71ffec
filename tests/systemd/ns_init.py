"""PID 1 of the test namespaces until it becomes systemd: `ns_init.py STATE_DIR [SHARED...]`.

`NestedSystemd.boot()` starts this under `unshare --pid --mount --uts --ipc --cgroup --fork
--mount-proc --propagation private`, so every mount below stays inside the new mount namespace
and the host sees none of them. It then execs /lib/systemd/systemd as the namespace's init.

What the nested manager gets, and why:
- /run: a fresh tmpfs (its sockets, unit state, the volatile journal), gone with the namespace.
- /dev: a small tmpfs of its own (null, zero, full, random, urandom, tty, ptmx, pts, shm) with
  /dev/console bound to STATE/console.log; systemd and journald create /dev/log and friends,
  which must not land in the host's /dev.
- /tmp, /var/tmp and /var/log: tmpfs, so PrivateTmp= and LogsDirectory= directories stay inside
  (and a test run next door cannot see or clean up ours). The SHARED host paths under /tmp
  (STATE_DIR, the test's config, a checkout there) are bound back in at the same place.
- /proc/sys, /proc/sysrq-trigger and /sys: read-only, so no sysctl reaches the host kernel.
- /sys/fs/cgroup: a fresh cgroup2 mount; the cgroup namespace roots it at the test's cgroup,
  which the nested manager then owns (pure unified mode, whatever the host uses).
- STATE/scratch, when the harness writes it (one host path a line, e.g. /etc, /opt): each path
  gets an overlay whose upper layer is a tmpfs, so an install can write there (adduser,
  /etc/systemd/system, /opt/venv) and the host never sees it. With /etc among them,
  /etc/systemd/system starts empty and comes first in the unit path, as on a host.
- SYSTEMD_UNIT_PATH=STATE/units: only the units the harness wrote there exist; empty generator
  paths keep fstab/sysv generators from adding host units; `container=` tells systemd it is a
  container (no swapoff, no reboot(), no claim on the host's root cgroup).
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MNT_DETACH = 2

SYSTEMD = "/lib/systemd/systemd"
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9),
           "tty": (5, 0)}  # fmt: skip
LINKS = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
         "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}  # fmt: skip


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    kind = fstype.encode() if fstype else None
    if _libc.mount(source.encode(), target.encode(), kind, flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype}): {os.strerror(err)}")


def read_only(path: str) -> None:
    """Make `path` a read-only bind mount of itself (only in this mount namespace)."""
    mount(path, path, None, MS_BIND)
    mount(path, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def private_dev(state: Path) -> None:
    staging = "/run/.dev"
    os.mkdir(staging)
    mount("tmpfs", staging, "tmpfs", MS_NOSUID, "mode=755")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"{staging}/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(f"{staging}/{name}", 0o666)
    for sub in ("pts", "shm", "mqueue"):
        os.mkdir(f"{staging}/{sub}")
    for link, target in LINKS.items():
        os.symlink(target, f"{staging}/{link}")
    Path(f"{staging}/console").touch()
    mount(str(state / "console.log"), f"{staging}/console", None, MS_BIND)
    mount(staging, "/dev", None, MS_MOVE)
    os.rmdir(staging)
    mount(
        "devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"
    )
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def private_tmp(shared: list[str]) -> None:
    """A tmpfs /tmp that still shows the `shared` host paths under /tmp (none inside another)."""
    staging = "/run/.tmp"
    os.mkdir(staging)
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path in shared:
        target = os.path.join(staging, os.path.relpath(path, "/tmp"))
        if os.path.isdir(path):
            os.makedirs(target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).touch()
        mount(path, target, None, MS_BIND | MS_REC)  # bound while /tmp is still the host's
    mount(staging, "/tmp", None, MS_MOVE)
    os.rmdir(staging)


def scratch_overlays(paths: list[str]) -> None:
    """Each of `paths` writable, its changes kept in a tmpfs of this namespace only."""
    top = "/run/.scratch"
    os.mkdir(top)
    mount("tmpfs", top, "tmpfs", MS_NOSUID, "mode=700")
    for i, path in enumerate(paths):
        upper, work = f"{top}/{i}/upper", f"{top}/{i}/work"
        os.makedirs(upper)
        os.makedirs(work)
        os.chmod(upper, stat.S_IMODE(os.stat(path).st_mode))
        mount("overlay", path, "overlay", 0, f"lowerdir={path},upperdir={upper},workdir={work}")
    if "/etc" in paths:
        mount("tmpfs", "/etc/systemd/system", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")


def main(state: Path, shared: list[str]) -> None:
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    journald = Path("/run/systemd/journald.conf.d")
    journald.mkdir(parents=True)
    (journald / "pubmon-test.conf").write_text("[Journal]\nStorage=volatile\nForwardToConsole=no\n")
    Path("/run/lock").mkdir()
    private_dev(state)
    private_tmp(shared)
    mount("tmpfs", "/var/log", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    mount("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    read_only("/proc/sys")
    if os.path.exists("/proc/sysrq-trigger"):
        read_only("/proc/sysrq-trigger")
    if _libc.umount2(b"/sys/fs/cgroup", MNT_DETACH) != 0:  # the host's hierarchy, with its subtree
        err = ctypes.get_errno()
        raise OSError(err, f"umount /sys/fs/cgroup: {os.strerror(err)}")
    mount("/sys", "/sys", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    units = str(state / "units")
    scratch = state / "scratch"
    if scratch.exists():
        paths = scratch.read_text().split()
        scratch_overlays(paths)
        if "/etc" in paths:
            units = f"/etc/systemd/system:{units}"
    env = {
        "container": "pubmon-test",
        "TERM": "dumb",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "SYSTEMD_UNIT_PATH": units,
        "SYSTEMD_GENERATOR_PATH": str(state / "empty"),
        "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(state / "empty"),
    }
    os.execve(SYSTEMD, [SYSTEMD, "--system", "--unit=pubmon-test.target", "--show-status=no"], env)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

"""Where cgroup2 is mounted here, and whether a path can be a cgroup2 directory for pubmon.

Read by the config loader (a `[daemon] cgroup` that cannot work is a config error) and by
`pubmon.core.cgroup`, which creates and drives the groups.
"""

from __future__ import annotations

__all__ = ["cgroup2_problem", "mount_of", "mounts"]

import os


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

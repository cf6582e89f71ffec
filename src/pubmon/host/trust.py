"""Who can change a path: the check a root daemon owes every file it trusts and every
directory it creates files in.

A root daemon that runs a file (an executable, the interpreter of a script), obeys one (the
config, TLS keys) or creates files in a directory (logs, the control socket) hands the power of
root to whoever can change that file or directory, or any directory above it: who can write a
directory can rename the entry inside it and put their own in its place. sudo refuses such a
sudoers file, cron such a crontab, sshd (StrictModes) such an authorized_keys file and each
directory above it. `check_path` applies the same rules, for a *trusted* set of owners that is
root and the daemon's own uid:

1. Each component, from `/` down to the path itself, must be owned by a trusted uid.
2. None may be writable by group or others (mode & 0o022), with one exception below.
3. A symlink met on the way is judged like any entry (its owner; its mode means nothing), and
   then its target is walked the same way from `/`, to at most 40 links (the kernel's limit).
   So both the name given and what it resolves to are covered.
4. The exception: a directory *above* the path that has the sticky bit (like /tmp, 1777 root)
   may be writable by others. In a sticky directory only an entry's owner (or the directory's
   owner, or root) may rename or remove it, so the next component, which must itself pass
   rule 1, cannot be swapped by anyone untrusted. sshd's safe_path() has no such exception (a
   key under /tmp is refused); we need it for the legitimate `/tmp/<dir owned by root, 0700>`
   layout of private temporary directories (pytest's, mkdtemp's). The path itself never gets
   the exception: a sticky, world-writable log_dir still lets others create names in it.

Group-writable is refused even for group root (gid 0), as sshd does: the group may hold
someone other than root. A path that does not exist (yet) is judged up to its deepest existing
directory: every missing component will be created by the daemon itself, inside a directory
nobody else can write.

When the daemon runs as root, findings about files it runs or obeys as root are refused; when
it runs as another uid they are warnings (the files can only make it act as that uid, which
their owner may well be). Directories it creates files in are refused either way.
"""

from __future__ import annotations

__all__ = ["Untrusted", "check_path", "make_trusted_dirs", "script_interpreter", "trusted_uids"]

import os
import pwd
import shutil
import stat
from dataclasses import dataclass

_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS: more is a loop


@dataclass(frozen=True, slots=True)
class Untrusted:
    """Why `path` cannot be trusted, and the command that fixes it."""

    path: str
    why: str  # "owned by uid 65534 (nobody)", "writable by group and others (mode 0666)"
    fix: str  # "chown root /etc/pubmon/pubmon.toml"

    def __str__(self) -> str:
        return f"{self.path} is {self.why} (fix: {self.fix})"


def trusted_uids() -> frozenset[int]:
    """Root and the daemon's own effective uid."""
    return frozenset({0, os.geteuid()})


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _judge(path: str, st: os.stat_result, uids: frozenset[int], *, last: bool) -> Untrusted | None:
    if st.st_uid not in uids:
        owner = f"uid {st.st_uid} ({_user(st.st_uid)})"
        return Untrusted(path, f"owned by {owner}", f"chown {_user(os.geteuid())} {path}")
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's mode is always 0777 and means nothing
    writable = st.st_mode & 0o022
    if not writable:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not last:
        return None  # rule 4: a sticky directory above the path
    who = {0o020: "group", 0o002: "others", 0o022: "group and others"}[writable]
    what = {0o020: "g", 0o002: "o", 0o022: "go"}[writable]
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    return Untrusted(path, f"writable by {who} (mode {mode})", f"chmod {what}-w {path}")


def check_path(path: str, uids: frozenset[int] | None = None) -> Untrusted | None:
    """The first component of `path` (absolute or relative to the cwd) that someone other than
    `uids` (default: root and us) could change, or None. See the module docstring for the rules.

    A missing component ends the walk (None): the caller creates it or reports it missing. A
    component we may not even look at is reported as such.
    """
    path = os.path.join(os.getcwd(), path)  # not abspath: ".." after a link is the kernel's
    return _walk(path, trusted_uids() if uids is None else uids, [0])


def _walk(path: str, uids: frozenset[int], links: list[int]) -> Untrusted | None:
    # `current` is always a real path (links resolved), so ".." is its dirname, as for the
    # kernel, even right after a link.
    current = "/"
    parts = [p for p in path.split("/") if p and p != "."]
    bad = _judge(current, os.lstat(current), uids, last=not parts)
    if bad is not None:
        return bad
    for i, part in enumerate(parts):
        if part == "..":
            current = os.path.dirname(current)
            continue
        entry = os.path.join(current, part)
        last = i == len(parts) - 1
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return Untrusted(entry, f"not checkable ({exc.strerror})", f"ls -ld {entry}")
        bad = _judge(entry, st, uids, last=last)
        if bad is not None:
            return bad
        if stat.S_ISLNK(st.st_mode):
            links[0] += 1
            if links[0] > _MAX_LINKS:
                return Untrusted(entry, "a symlink loop", f"ls -l {entry}")
            target = os.path.join(current, os.readlink(entry))
            bad = _walk(target, uids, links)
            if bad is not None:
                return bad
            entry = os.path.realpath(entry)
        current = entry
    return None


def make_trusted_dirs(path: str, mode: int = 0o755) -> Untrusted | None:
    """Create directory `path` and its missing parents (each `mode`, owned by us), then check
    the whole chain. Returns the first untrusted component, or None when `path` is ready.

    The existing part is checked before anything is created: a directory made inside one that
    others can write could be replaced before it is used.
    """
    path = os.path.abspath(path)
    bad = check_path(path)
    if bad is not None:
        return bad
    missing = []
    head = path
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            pass  # made meanwhile by someone who could: the check below judges it
        else:
            os.chmod(d, mode, follow_symlinks=False)  # exact, whatever the umask
    bad = check_path(path)
    if bad is None and not os.path.isdir(path):
        return Untrusted(path, "not a directory", f"rm {path}")
    return bad


def script_interpreter(path: str) -> str | None:
    """The program the kernel (or env) runs for a `#!` script: `/usr/bin/python3` for both
    `#!/usr/bin/python3 -u` and `#!/usr/bin/env python3`; None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    interp = words[0]
    if os.path.basename(interp) == "env":
        names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        if names:
            found = shutil.which(names[0])
            return found or None
    return interp

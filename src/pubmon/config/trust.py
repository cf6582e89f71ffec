"""Which files and directories of a config the daemon must be able to trust, judged at load.

Run by the loader after a file parsed, so the daemon's start (exit 2), every reload (the old
config keeps running) and `pubmon check-config` give the same verdict. The rules for one path
are `_trust.check_path`'s (owned by root or the daemon's uid, not writable by group or others,
every directory above too, sticky ancestors such as /tmp allowed). What is checked, and what
happens:

- the config file, the TLS files of [monitor], and, for every publisher that runs as root
  (no `user`, or a user whose uid is 0): the executable of its command and of its exec probe,
  the interpreter of either when it is a `#!` script (for `#!/usr/bin/env NAME`: NAME as found
  on the daemon's PATH), and its `directory` (an interpreter such as `python -m` imports from
  there). Under a root daemon a finding is an error: whoever can change these runs code as
  root. Under another uid it is a warning: the files can only act as that uid.
- `[daemon] log_dir` and the directory of `[control] socket` (the part that exists; the daemon
  creates the rest): an error whatever the daemon's uid, because the daemon creates files
  there and someone who can rename entries could swap them.

Warnings that are not about trust, also printed by check-config and logged at daemon start:
a publisher without `user` under a root daemon (it runs as root, with the unit's
capabilities), and a `user` that does not exist on this host (the publisher would go FATAL).
"""

from __future__ import annotations

__all__ = ["trust_findings"]

import os
import pwd
import shutil

from pubmon.config.checks import Key
from pubmon.config.model import Config, PublisherSpec
from pubmon.host.trust import Untrusted, check_path, script_interpreter

Finding = tuple[Key, str]


def trust_findings(config: Config) -> tuple[list[Finding], list[Finding]]:
    """(errors, warnings) for `config` as this process (its euid) would run it. A path that
    does not exist is judged up to its deepest existing directory (missing files are the
    loader's to report)."""
    judge = _Judge()
    root = os.geteuid() == 0
    strict, relaxed = judge.errors, judge.warnings
    runs = strict if root else relaxed  # files whose content the daemon obeys or runs
    judge.path(runs, (), config.path, "the daemon obeys this file")
    mon = config.monitor
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        value = getattr(mon, name)
        if value:
            judge.path(runs, ("monitor", name), value, "the daemon trusts this TLS file")
    if config.daemon.log_dir:
        judge.path(
            strict, ("daemon", "log_dir"), config.daemon.log_dir, "the daemon creates logs there"
        )
    if config.control.socket:
        judge.path(
            strict,
            ("control", "socket"),
            os.path.dirname(config.control.socket),
            "the daemon creates its control socket there",
        )
    for spec in config.publishers:
        key: Key = ("publisher", spec.program)
        uid = _uid(spec.user)
        if spec.user is not None and uid is None:
            judge.warn(
                (*key, "user"), f"no user {spec.user!r} on this host: the publisher would be FATAL"
            )
        if uid is not None and not root and uid != os.geteuid():
            judge.warn(
                (*key, "user"),
                f"the daemon would run as uid {os.geteuid()}, which cannot switch to user "
                f"{spec.user!r}: only a root daemon can (the publisher would be FATAL)",
            )
        if spec.user is None and root:
            judge.warn(
                key,
                "no `user`: it runs as root with the daemon's capabilities; "
                'name a user (user = "...") unless it really needs root',
            )
        if spec.user is not None and uid != 0:
            continue  # runs as another user (or none): what it runs is that user's business
        as_root = root and (spec.user is None or uid == 0)
        target = runs if as_root else relaxed
        who = "root" if as_root else "the daemon's uid"
        judge.program(target, (*key, "command"), spec, spec.command, who)
        if spec.probe.kind == "exec" and spec.probe.command:
            judge.program(target, (*key, "probe", "command"), spec, spec.probe.command, who)
        if spec.directory:
            judge.path(
                target, (*key, "directory"), spec.directory, f"the publisher starts there as {who}"
            )
    return judge.errors, judge.warnings


def _uid(user: str | None) -> int | None:
    if user is None:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


class _Judge:
    """Checks each path once (1000 instances share a few executables) and files findings."""

    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []
        self._seen: dict[str, Untrusted | None] = {}
        # (argv[0], PATH) -> (executable, its #! interpreter): 1000 instances share one
        self._programs: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    def warn(self, key: Key, why: str) -> None:
        if (key, why) not in self.warnings:
            self.warnings.append((key, why))

    def path(self, into: list[Finding], key: Key, path: str, role: str) -> None:
        if path not in self._seen:
            self._seen[path] = check_path(path)
        bad = self._seen[path]
        if bad is not None:
            finding = (key, f"{bad}; {role}, and someone else could change it")
            if finding not in into:
                into.append(finding)

    def program(
        self, into: list[Finding], key: Key, spec: PublisherSpec, argv: tuple[str, ...], who: str
    ) -> None:
        search = dict(spec.environment).get("PATH") or os.environ.get("PATH", os.defpath)
        memo = (argv[0], search)
        if memo not in self._programs:
            exe = _which(argv[0], search)
            self._programs[memo] = (exe, script_interpreter(exe) if exe else None)
        exe, interp = self._programs[memo]
        if exe is None:
            return  # not found: the loader reported it
        self.path(into, key, exe, f"it runs as {who}")
        if interp is not None:
            self.path(into, key, interp, f"it is the interpreter of {exe}, run as {who}")


def _which(prog: str, search: str) -> str | None:
    if "/" in prog:
        return prog if os.path.isabs(prog) else None
    return shutil.which(prog, path=search)

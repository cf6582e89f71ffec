"""A cgroup v2 per publisher: containment, accounting, limits and freezing.

A process group is not a container: a grandchild that double-forks and calls setsid leaves it,
and a stop that signals the group misses it (it keeps the publisher's port, and a restart
meets it). A cgroup cannot be left by an unprivileged process, so with one per publisher:
- a stop ends with `cgroup.kill` (SIGKILL to every process in it, escapees included) and is
  over when `cgroup.events` says `populated 0`, not only when the leader exited;
- a spawn refuses a cgroup that is still populated: a new run never meets the old tree;
- `cpu.stat` usage_usec, `memory.current` and `cgroup.procs` are its accounting;
- `memory.max`, `memory.high`, `cpu.max`, `pids.max` are its limits, when the controller is
  enabled for the subtree;
- `cgroup.freeze` pauses and resumes the whole tree.

Which subtree (`Cgroups.setup`, from `[daemon] cgroup`):
- "auto" (the default): the daemon's own cgroup when it was delegated to it: systemd sets the
  `trusted.delegate` xattr on a unit's cgroup with Delegate=yes (systemd >= 251). The daemon
  then moves itself into a leaf of its own, `supervisor`, since cgroup2's no-internal-processes
  rule forbids enabling controllers for children of a group that holds processes; publishers
  live in the siblings `pub-<name>`.
- an absolute path: a directory in a cgroup2 hierarchy that the daemon may write (root, or a
  delegated one); the daemon moves into `<path>/supervisor` only if it sits in `<path>` itself.
- "": none. Without a subtree pubmon works as before (process groups, an orphan sweep at
  shutdown) and says so in one log line; pause and resume are refused.

Measured here (kernel 6.18, hybrid hierarchy: cgroup2 at /sys/fs/cgroup/unified, root of it
writable by root, cpu/memory/pids bound to cgroup v1 so its controllers list only hugetlb; a
child group still has cgroup.kill, cgroup.freeze, cgroup.events and cpu.stat):
- `cgroup.kill` of a tree of four (a leader, a setsid'd double-forked grandchild and its
  child) leaves it unpopulated within ~1 ms, frozen or not;
- freezing takes ~1 ms until `cgroup.events` says `frozen 1`; frozen tasks show state S and
  wchan `get_signal` in /proc; a process that joins a frozen group is frozen at once, so a
  spawn thaws the group first;
- joining before exec: the spawn wrapper's `sh` writes `0` (itself) to `cgroup.procs` before
  it execs the command (Python's subprocess cannot use CLONE_INTO_CGROUP); 200 spawns of
  `true` through setpriv + sh: 2.8-3.3 ms each with or without the write (noise is larger);
- `populated` changes are not worth an inotify watch here: after cgroup.kill the group is empty
  within a millisecond or two, so `wait_empty` polls `cgroup.events` with a growing step.
Accounting (CPU, memory, processes) is read by pubmon.core.usage, from the cgroup when there is one.
"""

from __future__ import annotations

__all__ = [
    "Cgroup",
    "Cgroups",
    "limit_problems",
    "rlimits",
]

import asyncio
import logging
import os
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

from pubmon.config.model import Limits
from pubmon.errors import StartupError
from pubmon.host.cgroupfs import cgroup2_problem, mounts

logger = logging.getLogger(__name__)

SUPERVISOR = "supervisor"  # the daemon's own leaf
PREFIX = "pub-"  # publisher groups: pub-feed, pub-feed:0
CPU_PERIOD = 100_000  # µs: cpu.max "<quota> <period>", systemd's CPUQuotaPeriodSec default
_CONTROLLERS = ("cpu", "memory", "pids")  # what limits need; enabled for publishers if offered
# (controller, file, keys) that count limit hits: Cgroup.limit_events, /metrics
LIMIT_EVENTS = (
    ("memory", "memory.events", ("high", "max", "oom_kill")),
    ("pids", "pids.events", ("max",)),
    ("cpu", "cpu.stat", ("throttled_usec",)),
)
_LIMIT_CONTROLLER = {"memory_max": "memory", "memory_high": "memory", "cpu_max": "cpu",
                     "pids_max": "pids"}  # fmt: skip


def own_cgroup() -> str | None:
    """The directory of this process's cgroup2 group, or None (no cgroup2 mounted)."""
    found = mounts()
    if not found:
        return None
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                # With several cgroup2 mounts the namespace root is the shortest one.
                return os.path.normpath(os.path.join(found[-1], rel))
    return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    # O_TRUNC as a shell's `>`: cgroupfs ignores it, a plain test directory needs it.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(text: str, key: str) -> int | None:
    """The value of `key` in a flat keyed file (cgroup.events, cpu.stat)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _delegated(path: str) -> bool:
    for attr in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, attr).strip(b"\0") == b"1":
                return True
        except OSError:
            continue
    return False


class Cgroup:
    """One publisher's group. Plain file operations: each is a few µs on cgroupfs."""

    def __init__(self, path: str, controllers: frozenset[str]) -> None:
        self.path = path
        self.procs = os.path.join(path, "cgroup.procs")  # a spawn writes the child's pid here
        self.controllers = controllers

    def __repr__(self) -> str:
        return f"<Cgroup {self.path}>"

    def create(self) -> None:
        try:
            os.mkdir(self.path)
        except FileExistsError:
            pass

    def remove(self) -> bool:
        """rmdir it; False when it still holds processes (or is gone already: True)."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            logger.warning("cannot remove cgroup %s: %s", self.path, exc.strerror)
            return False
        return True

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.procs).split()]
        except FileNotFoundError:
            return []

    def populated(self) -> bool:
        try:
            return _keyed(_read(os.path.join(self.path, "cgroup.events")), "populated") == 1
        except FileNotFoundError:
            return False

    def frozen(self) -> bool:
        try:
            return _keyed(_read(os.path.join(self.path, "cgroup.events")), "frozen") == 1
        except FileNotFoundError:
            return False

    def kill(self) -> None:
        """SIGKILL every process in it (cgroup.kill, kernel >= 5.14), frozen ones included."""
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
        except FileNotFoundError:
            pass

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until `cgroup.events` says populated 0; False if `timeout` passed first."""
        return await self._wait(lambda: not self.populated(), timeout)

    def freeze(self, frozen: bool) -> None:
        _write(os.path.join(self.path, "cgroup.freeze"), "1" if frozen else "0")

    async def wait_frozen(self, timeout: float) -> bool:
        return await self._wait(self.frozen, timeout)

    @staticmethod
    async def _wait(done: Callable[[], bool], timeout: float) -> bool:
        step = 0.001
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await asyncio.sleep(step)
                    step = min(step * 2, 0.05)
        except TimeoutError:
            return bool(done())
        return True

    def memory_current(self) -> int:
        """memory.current (the memory controller's), in bytes."""
        return int(_read(os.path.join(self.path, "memory.current")))

    def set_memory_high(self, value: int | None) -> None:
        """memory.high: `value` bytes, or "max" for None."""
        _write(os.path.join(self.path, "memory.high"), _bytes(value))

    def limit_events(self) -> dict[str, int]:
        """How often its limits were hit, over the group's life (it outlives runs), from the
        files of the controllers it has: memory.events `high` (memory.high crossed: also the
        memory_restart tripwire), `max`, `oom_kill`; pids.events `max` (forks refused);
        cpu.stat `throttled_usec`. Keys as in LIMIT_EVENTS; {} without those controllers."""
        out: dict[str, int] = {}
        for controller, file, keys in LIMIT_EVENTS:
            if controller not in self.controllers:
                continue
            try:
                text = _read(os.path.join(self.path, file))
            except OSError:
                continue
            for key in keys:
                value = _keyed(text, key)
                if value is not None:
                    out[f"{file}:{key}"] = value
        return out

    def cpu_seconds(self) -> float:
        """cpu.stat usage_usec: CPU of every process that ever ran in it, in seconds."""
        return (_keyed(_read(os.path.join(self.path, "cpu.stat")), "usage_usec") or 0) / 1e6

    def apply(self, limits: Limits) -> list[str]:
        """Write the cgroup limits whose controller is enabled (and reset those not set, so a
        value removed from the config does not linger); return one line per limit that
        could not be applied."""
        wanted = limits.cgroup_limits()
        files = {
            "memory_max": ("memory.max", _bytes(limits.memory_max)),
            "memory_high": ("memory.high", _bytes(limits.memory_high)),
            "cpu_max": ("cpu.max", _cpu(limits.cpu_max)),
            "pids_max": ("pids.max", "max" if limits.pids_max is None else str(limits.pids_max)),
        }
        problems = []
        for key, (name, text) in files.items():
            controller = _LIMIT_CONTROLLER[key]
            if controller not in self.controllers:
                if key in wanted:
                    problems.append(f"limits.{key}: no {controller} controller for {self.path}")
                continue
            try:
                _write(os.path.join(self.path, name), text)
            except OSError as exc:
                if key in wanted:
                    problems.append(f"limits.{key}: cannot write {name}: {exc.strerror}")
        return problems


def _bytes(value: int | None) -> str:
    return "max" if value is None else str(value)


def _cpu(fraction: float | None) -> str:
    if fraction is None:
        return f"max {CPU_PERIOD}"
    return f"{max(1000, round(fraction * CPU_PERIOD))} {CPU_PERIOD}"


class Cgroups:
    """The subtree pubmon manages: `root`, the controllers enabled for its children, and one
    `Cgroup` per publisher instance below it."""

    def __init__(self, root: str, controllers: frozenset[str]) -> None:
        self.root = root
        self.controllers = controllers
        self.moved = False  # the daemon moved itself into <root>/supervisor (release: back)
        self.enabled: frozenset[str] = frozenset()  # the controllers setup turned on in root

    def __repr__(self) -> str:
        return f"<Cgroups {self.root} controllers={sorted(self.controllers)}>"

    @classmethod
    def setup(cls, setting: str, *, sweep: bool = True) -> Cgroups | None:
        """Find or take the subtree `[daemon] cgroup` names (see the module docstring), move
        the daemon into its leaf when needed, enable the controllers limits use, and kill
        what earlier runs left in publisher groups (not with `sweep=False`: after `pubmon
        upgrade`, they are the publishers carried over). None (logged) when there is none.
        StartupError when an explicit path cannot be used."""
        if setting == "":
            logger.info('no cgroup ([daemon] cgroup = ""): publishers run in process groups')
            return None
        own = own_cgroup()
        if own is not None and os.path.basename(own) == SUPERVISOR:
            # Already in our leaf: `pubmon upgrade` re-executed this process. The subtree is
            # the leaf's parent, as when the first image moved itself there.
            own = os.path.dirname(own)
        if setting == "auto":
            if own is None or not _delegated(own):
                where = own or "no cgroup2 hierarchy"
                logger.info(
                    "no cgroup: pubmon's own cgroup (%s) was not delegated to it (systemd: "
                    "Delegate=yes) and [daemon] cgroup names none; publishers run in process "
                    "groups (no pause, no cgroup limits or kill)",
                    where,
                )
                return None
            root = own
        else:
            root = setting
            why = cgroup2_problem(root)
            if why:
                raise StartupError(f"[daemon] cgroup: expected {why}")
        try:
            if own == root:
                cls._move_into_leaf(root)
            before = frozenset(_read(os.path.join(root, "cgroup.subtree_control")).split())
            controllers = cls._enable_controllers(root)
        except OSError as exc:
            if setting == "auto":  # delegated, but not writable here (a read-only mount)
                logger.warning(
                    "no cgroup: pubmon's cgroup %s was delegated to it but cannot be used (%s); "
                    "publishers run in process groups (no pause, no cgroup limits or kill)",
                    root,
                    exc.strerror or exc,
                )
                return None
            raise StartupError(
                f"cgroup {root}: {exc.strerror or exc} (pubmon must be able to create groups "
                "and move processes there: root, or a delegated subtree)"
            ) from exc
        cgroups = cls(root, controllers)
        cgroups.moved = own == root
        cgroups.enabled = controllers - before
        if sweep:
            cgroups.sweep_stale()
        logger.info(
            "publishers run in cgroups below %s (controllers: %s)",
            root,
            ", ".join(sorted(controllers)) or "none",
        )
        return cgroups

    @staticmethod
    def _move_into_leaf(root: str) -> None:
        leaf = os.path.join(root, SUPERVISOR)
        try:
            os.mkdir(leaf)
        except FileExistsError:
            pass
        _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        logger.info("pubmon %d moved itself into %s", os.getpid(), leaf)

    @staticmethod
    def _enable_controllers(root: str) -> frozenset[str]:
        offered = set(_read(os.path.join(root, "cgroup.controllers")).split())
        control = os.path.join(root, "cgroup.subtree_control")
        for name in _CONTROLLERS:
            if name in offered:
                try:
                    _write(control, "+" + name)
                except OSError as exc:  # EBUSY: processes in root itself (not our leaf)
                    logger.warning("cannot enable the %s controller in %s: %s",
                                   name, root, exc.strerror)  # fmt: skip
        return frozenset(_read(control).split()) & frozenset(_CONTROLLERS)

    def release(self) -> list[str]:
        """Undo what setup did, at the end of a clean stop: remove the empty publisher groups
        left, turn off the controllers setup enabled, move the daemon back into the root and
        remove its `supervisor` leaf, so a standalone run leaves the directory as it found it
        (under systemd the unit's cgroup goes with the unit anyway). Not after `pubmon
        upgrade`: the exec never returns here. Returns what is left (logged), [] when nothing."""
        left = []
        for entry in sorted(Path(self.root).glob(PREFIX + "*")):
            if not Cgroup(str(entry), self.controllers).remove():
                left.append(str(entry))
        if not self.moved:
            return left
        control = os.path.join(self.root, "cgroup.subtree_control")
        leaf = os.path.join(self.root, SUPERVISOR)
        try:
            for name in sorted(self.enabled):
                # cgroup2's no-internal-processes rule: root may hold the daemon again only
                # once it gives no domain controller to its children.
                _write(control, "-" + name)
            _write(os.path.join(self.root, "cgroup.procs"), str(os.getpid()))
            os.rmdir(leaf)
        except OSError as exc:
            logger.warning(
                "cannot move pubmon %d back into %s and remove %s: %s",
                os.getpid(),
                self.root,
                leaf,
                exc.strerror or exc,
            )
            left.append(leaf)
        else:
            logger.info("pubmon %d moved back into %s and removed %s", os.getpid(), self.root, leaf)
        self.moved = False
        return left

    def publisher(self, name: str) -> Cgroup:
        return Cgroup(os.path.join(self.root, PREFIX + name), self.controllers)

    def sweep_stale(self) -> None:
        """Kill and remove publisher groups an earlier daemon left behind (kill -9 of the
        daemon: its publishers die of their parent-death signal, escapees do not)."""
        for entry in Path(self.root).glob(PREFIX + "*"):
            group = Cgroup(str(entry), self.controllers)
            pids = group.pids()
            if pids:
                # Gone within a millisecond or two; if not yet, the spawn into it waits.
                logger.warning("killing %d process(es) left in %s: %s", len(pids), entry, pids)
                group.kill()
            else:
                group.remove()

    def missing(self, limits: Limits) -> list[tuple[str, str]]:
        """(key, why) for each cgroup limit of `limits` that cannot be applied here."""
        return [
            (key, f"no {_LIMIT_CONTROLLER[key]} controller is enabled in {self.root}")
            for key in limits.cgroup_limits()
            if _LIMIT_CONTROLLER[key] not in self.controllers
        ]


def rlimits(limits: Limits) -> tuple[tuple[int, int], ...]:
    """The rlimits of `[publisher.X.limits]` as (RLIMIT_*, value) for SpawnRequest."""
    pairs = (
        (resource.RLIMIT_NOFILE, limits.nofile),
        (resource.RLIMIT_CORE, limits.core),
        (resource.RLIMIT_NPROC, limits.nproc),
        (resource.RLIMIT_AS, limits.address_space),
    )
    return tuple((r, resource.RLIM_INFINITY if v == -1 else v) for r, v in pairs if v is not None)


def limit_problems(
    cgroups: Cgroups | None, specs: Iterable[tuple[str, Limits]]
) -> list[tuple[str, str, bool]]:
    """(publisher program, "limits.key: why", required) for every cgroup limit that cannot be
    applied: without a cgroup at all, or without its controller."""
    out: list[tuple[str, str, bool]] = []
    seen = set()
    for program, limits in specs:
        if program in seen:
            continue
        seen.add(program)
        if cgroups is None:
            missing = [(k, "pubmon has no cgroup") for k in limits.cgroup_limits()]
        else:
            missing = cgroups.missing(limits)
        out.extend((program, f"limits.{key}: {why}", limits.require) for key, why in missing)
    return out

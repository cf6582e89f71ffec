"""Processes as the benchmark sees them: /proc readings, daemons it started, and cleanup.

The benchmark process makes itself a child subreaper, so every process a contender leaves
behind (a supervisord child after `kill -9 supervisord`, a grandchild that escaped its group)
re-parents to it: `cleanup()` then finds it among its own children, kills it and reaps it.
Daemons are started with `start_daemon()`, which remembers their Popen so that cleanup reaps
them through subprocess (never by a bare waitpid that would hide their exit from Popen).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_CHILD_SUBREAPER = 36
_daemons: dict[int, subprocess.Popen[bytes]] = {}


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _machine_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of every CPU since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return sum(fields), sum(fields) - fields[3] - fields[4]  # less idle and iowait


def machine_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy (any process) over `seconds`."""
    total0, busy0 = _machine_ticks()
    time.sleep(seconds)
    total1, busy1 = _machine_ticks()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


class ForeignCpu:
    """CPU that processes outside this benchmark used while it measured, in % of one core:
    the machine's busy time less ours (this process and every descendant it or its daemons
    reaped). Read it after the daemons were reaped. Only an indicator of a noisy machine: it
    also counts interrupts, which no process is charged with."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return _machine_ticks()[1] / TICK, ours, time.monotonic()

    def percent(self) -> float | None:
        """None for a span under a second: ticks are 10 ms, too coarse to say."""
        (busy0, ours0, t0), (busy1, ours1, t1) = self._start, self._sample()
        if t1 - t0 < 1:
            return None
        return max(0.0, 100 * ((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0))

    def seconds(self) -> float:
        return time.monotonic() - self._start[2]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [0] is the state letter."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds (10 ms resolution)."""
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)


def alive(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited: it only waits to be reaped)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def environ_value(pid: int, key: str) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = key.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode()
    return None


def children(pid: int) -> set[int]:
    """Direct children, zombies included (from every thread's children list)."""
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out.update(map(int, Path(f"/proc/{pid}/task/{tid}/children").read_bytes().split()))
        except OSError:
            continue
    return out


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def start_daemon(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a supervisor in its own session, output to `log`; returns its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _daemons[proc.pid] = proc
    return proc.pid


def exited(pid: int) -> bool:
    """Whether a daemon from start_daemon() has exited (and reap it if so)."""
    proc = _daemons.get(pid)
    return proc is None or proc.poll() is not None


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Poll every millisecond until none of `pids` is alive. False on timeout."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {p for p in pending if alive(p)}
        if pending and time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def cleanup(extra: Iterable[int] = ()) -> int:
    """SIGKILL every daemon we started, everything below them, every stray that re-parented to
    us and `extra` pids; reap them all. Returns how many processes were still alive."""
    me = os.getpid()
    victims = set(extra)
    for pid in _daemons:
        victims |= {pid} | descendants(pid)
    victims |= descendants(me)
    victims -= {me}
    killed = 0
    for pid in victims:
        if not alive(pid):
            continue
        killed += 1
        try:
            pgid = os.getpgid(pid)
            if pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, proc in list(_daemons.items()):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        del _daemons[pid]
    _reap_strays(deadline=time.monotonic() + 5)
    return killed


def _reap_strays(deadline: float) -> None:
    """Reap our children that no Popen owns (orphans re-parented to us), until none is left."""
    while True:
        strays = children(os.getpid()) - set(_daemons)
        if not strays:
            return
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, os.WNOHANG)
            except (ChildProcessError, ProcessLookupError):
                pass
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)

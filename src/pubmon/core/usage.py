"""What a publisher's processes use: CPU seconds, memory, number of processes.

With a cgroup (pubmon.core.cgroup): CPU from cpu.stat usage_usec (every process that ran in it,
escapees included), processes from cgroup.procs, memory from memory.current when the memory
controller is enabled, else the summed RSS of the processes in cgroup.procs. Without a cgroup:
the leader's tree in /proc (the children of each of its threads, then theirs), CPU as utime +
stime of each (+ cutime + cstime: children it reaped), memory the summed RSS; an escapee that
was re-parented to the daemon is not in that tree.

Read by getCounters (at most once a second per publisher) and by the memory sweep (once a
second for each publisher with memory_restart), so one `UsageReader` per run keeps its files
open and re-reads them with pread. Measured here: open + read + close of /proc/<pid>/statm
10-15 µs, pread of a held one 3 µs; cgroup.procs 9 vs 1.4 µs. At 1000 publishers, getCounters
with every figure read afresh took 120-170 ms opening files, 30-60 ms with held ones (load
average 10 on 2 cores). `memory()`, the memory check's read, is leaner still: the statm of the
processes of its last look at the tree, which it takes again every REWALK-th call: 3.9 µs a
publisher on the /proc path (8.2 µs walking each time), 2.6 µs in a cgroup (5.3 µs); 1000 idle
publishers with memory_restart cost the daemon 0.94-0.99 % of a core (1.38-1.59 % before, at
load average 10-15; bench/bench_cgroup.py). A /proc/<pid> file stays bound to its process, so
a recycled pid is never misread.
"""

from __future__ import annotations

__all__ = ["EMPTY_USAGE", "Usage", "UsageReader"]

import os
from typing import NamedTuple

from pubmon.core.cgroup import Cgroup

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")
REWALK = 5  # memory(): read cgroup.procs or walk the tree every REWALK-th call, statm between


class Usage(NamedTuple):
    """What a publisher's processes use now: CPU seconds so far, memory, processes."""

    cpu_seconds: float
    memory_bytes: int
    tasks: int
    source: str  # "cgroup", "cgroup+rss" (no memory controller) or "proc"


EMPTY_USAGE = Usage(0.0, 0, 0, "none")


class UsageReader:
    """One run's figures (see the module docstring); `close()` when the run ends."""

    def __init__(self, pid: int, cgroup: Cgroup | None) -> None:
        self.pid = pid
        self._cgroup = cgroup
        self._fds: dict[str, int] = {}  # path -> open fd
        self._statm: list[int] = []  # memory(): statm fds of the processes of its last look
        self._looks = pid % REWALK  # memory() calls: staggers the looks at 1000 trees

    def _pread(self, path: str) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        return os.pread(fd, 65536, 0)

    def _stat(self, pid: int) -> list[bytes] | None:
        """Fields of /proc/<pid>/stat after "pid (comm) ": [0] state, [11:15] utime, stime,
        cutime, cstime (ticks), [17] threads, [21] rss (pages). None when gone or a zombie."""
        try:
            raw = self._pread(f"/proc/{pid}/stat")
        except OSError:
            return None
        fields = raw[raw.rfind(b")") + 2 :].split()
        return fields if len(fields) > 21 and fields[0] != b"Z" else None

    def _rss(self, path: str) -> int | None:
        """Resident bytes from a /proc/<pid>/statm, None when that process is gone."""
        try:
            return int(self._pread(path).split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return None

    def _tree(self) -> list[tuple[int, list[bytes]]]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            fields = self._stat(pid)
            if fields is None:
                continue
            out.append((pid, fields))
            tids = [str(pid)] if fields[17] == b"1" else _tids(pid)
            for tid in tids:
                try:
                    todo.extend(
                        int(p) for p in self._pread(f"/proc/{pid}/task/{tid}/children").split()
                    )
                except OSError:
                    continue
        return out

    def memory(self) -> int:
        """Bytes in use now (0 when nothing can be read): all of what `usage()` reads with
        the memory controller (memory.current); without it, the RSS of the processes found
        by the last look at the tree (cgroup.procs, or the walk from the leader), which is
        taken again every REWALK-th call (staggered by pid) or at once when one is gone: a
        process that appeared since is counted within REWALK s."""
        cg = self._cgroup
        try:
            if cg is not None and "memory" in cg.controllers:
                return int(self._pread(os.path.join(cg.path, "memory.current")))
        except (OSError, ValueError):
            return 0
        self._looks += 1
        if self._statm and self._looks % REWALK:
            # The fast path (about 1.5 µs a process): held statm fds, no path, no dict.
            pages = 0
            try:
                for fd in self._statm:
                    pages += int(os.pread(fd, 128, 0).split()[1])
            except (OSError, IndexError, ValueError):
                pass  # one is gone: look at the tree again now
            else:
                return pages * _PAGE
        self._statm = []
        try:
            if cg is not None:
                pids = [int(p) for p in self._pread(cg.procs).split()]
            else:
                pids = [pid for pid, _ in self._tree()]
        except (OSError, ValueError):
            return 0
        self._forget(pids)
        used, statm = 0, []
        for pid in pids:
            path = f"/proc/{pid}/statm"
            rss = self._rss(path)
            if rss is not None:
                used += rss
                statm.append(self._fds[path])
        self._statm = statm
        return used

    def usage(self) -> Usage:
        cg = self._cgroup
        try:
            if cg is not None:
                # cpu.stat opens with "usage_usec N"
                usec = int(self._pread(os.path.join(cg.path, "cpu.stat")).split(None, 2)[1])
                pids = [int(p) for p in self._pread(cg.procs).split()]
                source = "cgroup" if "memory" in cg.controllers else "cgroup+rss"
                return Usage(usec / 1e6, self.memory(), len(pids), source)
            tree = self._tree()
        except (OSError, ValueError):
            return EMPTY_USAGE
        ticks = sum(int(x) for _, f in tree for x in f[11:15])
        rss = sum(int(f[21]) for _, f in tree) * _PAGE
        self._forget([pid for pid, _ in tree])
        return Usage(ticks / _TICK, rss, len(tree), "proc")

    def _forget(self, pids: list[int]) -> None:
        """Close the files of processes that are gone (a tree changes)."""
        if len(self._fds) <= 3 * len(pids) + 3:
            return
        keep = {f"/proc/{p}/" for p in pids}
        for path in [p for p in self._fds if p.startswith("/proc/")]:
            if path[: path.index("/", 6) + 1] not in keep:
                os.close(self._fds.pop(path))
                self._statm = []  # it may hold that fd number, which a later open reuses

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _tids(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []

"""CPU, memory and open files of a publisher's whole process tree, read from /proc.

A publisher is a tree: a shell that forks workers, a server with helper processes. What an
operator wants to know is what the whole tree costs, so a sample walks from the leader through
`/proc/<pid>/task/<tid>/children` (every thread's list: a child forked by a thread is listed
under that thread) and adds up, per process:
- CPU: utime + stime of the live processes, plus cutime + cstime (what their reaped children
  used), in seconds: a counter that only resets when the publisher restarts;
- resident memory: `rss` pages of /proc/<pid>/stat, summed (shared pages count once per
  process, as `ps` and supervisord's memmon add them);
- open fds: `st_size` of /proc/<pid>/fd, which Linux >= 6.2 sets to the number of open fds
  (one stat instead of a directory listing); on older kernels, which report 0, the listing.

Walking the children from the leader costs about 3 small reads per process. Scanning all of
/proc for process-group members would cost a read per process on the host instead.

Reading is blocking I/O, so `ProcStats.refresh` does it in slices, yielding to the loop between
them, and keeps the result: the metrics collector and `listPublishers` read the cache and do no
I/O themselves. A refresh is done at most once per `min_interval` however many readers ask.

`listPublishers` (a synchronous Thrift call) used to walk every tree in the call once the cache
was a second old: at 1000 `sleep` publishers, ~31 ms of a status call in every second (the
bench's status median is 13.7 ms against a 10 ms target). `refresh_soon` keeps that walk off
the call: it reads at once only the trees whose leader the cache has not seen (a start or a
restart since the last walk: usually none), and starts the sliced `refresh` in the background
when the cache is stale; the call answers from the cache, at most min_interval plus one walk
old, as /metrics always did.
"""

from __future__ import annotations

__all__ = ["ProcFigures", "ProcStats", "SelfFigures", "sample_tree"]

import asyncio
import os
import resource
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_SLICE = 64  # process trees read between two yields to the loop


class ProcFigures(NamedTuple):
    cpu_seconds: float
    rss_bytes: int
    open_fds: int
    processes: int


class _Stat(NamedTuple):
    cpu: float
    rss: int
    threads: int


def _read(path: str) -> bytes:
    # os.open/os.read: a third cheaper than open() and its buffered file object.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _read_stat(pid: int) -> _Stat | None:
    try:
        raw = _read(f"/proc/{pid}/stat")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ": split at the last one.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        # fields[0] is field 3 (state): utime=14 stime=15 cutime=16 cstime=17 threads=20 rss=24
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return _Stat(ticks / _TICKS, int(fields[21]) * _PAGE, int(fields[17]))
    except (IndexError, ValueError):
        return None


def _count_fds(pid: int) -> int:
    try:
        n = os.stat(f"/proc/{pid}/fd").st_size
        return n if n > 0 else len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _children(pid: int, threads: int) -> list[int]:
    tids: Iterable[str]
    if threads <= 1:
        tids = (str(pid),)
    else:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    out: list[int] = []
    for tid in tids:
        try:
            raw = _read(f"/proc/{pid}/task/{tid}/children")
        except OSError:
            continue
        if raw:
            out.extend(int(x) for x in raw.split())
    return out


def sample_tree(leader: int) -> ProcFigures | None:
    """The figures of `leader` and every live descendant; None if the leader is gone."""
    cpu, rss, fds, n = 0.0, 0, 0, 0
    todo, seen = [leader], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        st = _read_stat(pid)
        if st is None:
            if pid == leader:
                return None
            continue
        cpu += st.cpu
        rss += st.rss
        fds += _count_fds(pid)
        n += 1
        todo.extend(_children(pid, st.threads))
    return ProcFigures(cpu, rss, fds, n)


class SelfFigures(NamedTuple):
    """The daemon's own process, as prometheus_client's process collector names them."""

    cpu_seconds: float
    rss_bytes: int
    vsize_bytes: int
    open_fds: int
    max_fds: int
    start_time: float


def _sample_self() -> SelfFigures:
    times = os.times()
    fields = _read("/proc/self/stat").rsplit(b")", 1)[1].split()
    with open("/proc/stat", "rb") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return SelfFigures(
        cpu_seconds=times.user + times.system,
        rss_bytes=int(fields[21]) * _PAGE,
        vsize_bytes=int(fields[20]),
        open_fds=_count_fds(os.getpid()),
        max_fds=soft,
        start_time=btime + int(fields[19]) / _TICKS,
    )


class ProcStats:
    """The latest figures per publisher name, and the daemon's own; refreshed on demand."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        self.figures: dict[str, ProcFigures] = {}
        self.own: SelfFigures | None = None
        self.refreshed_at = 0.0  # time.monotonic() of the last completed refresh
        self.refreshes = 0
        self._running: asyncio.Future[None] | None = None
        self._one_at: dict[str, float] = {}  # read by one() since the last full refresh
        self._pids: dict[str, int] = {}  # the leader each entry of `figures` was read from
        self._background: asyncio.Task[None] | None = None  # started by refresh_soon

    async def refresh(self, leaders: Mapping[str, int | None]) -> None:
        """Re-read every tree of `leaders` (name -> leader pid), unless done < min_interval ago.

        Concurrent callers share one refresh: ten scrapes at once read /proc once.
        """
        if self._running is not None:
            await asyncio.shield(self._running)
            return
        if time.monotonic() - self.refreshed_at < self.min_interval:
            return
        self._running = asyncio.get_running_loop().create_future()
        try:
            await self._refresh(dict(leaders))
        finally:
            self._running.set_result(None)
            self._running = None

    def refresh_soon(self, leaders: Mapping[str, int | None]) -> None:
        """Make `figures` current enough for a synchronous reader (the Thrift status calls)
        without walking every tree in its call: trees whose leader changed since they were
        read are read now (a few processes: a start or restart), gone ones are dropped, and a
        stale cache (older than min_interval) is refreshed in the background (`refresh`,
        sliced), for the next reader."""
        figures, pids = self.figures, self._pids
        for name, pid in leaders.items():
            if pids.get(name) == pid:
                continue
            if pid is None:
                figures.pop(name, None)
                pids.pop(name, None)
                continue
            got = sample_tree(pid)
            pids[name] = pid
            if got is None:
                figures.pop(name, None)
            else:
                figures[name] = got
        if (
            self._running is None
            and self._background is None
            and time.monotonic() - self.refreshed_at >= self.min_interval
        ):
            self._background = asyncio.get_running_loop().create_task(
                self._refresh_in_background(dict(leaders)), name="procstats refresh"
            )

    async def _refresh_in_background(self, leaders: dict[str, int | None]) -> None:
        try:
            await self.refresh(leaders)
        finally:
            self._background = None

    async def _refresh(self, leaders: dict[str, int | None]) -> None:
        out: dict[str, ProcFigures] = {}
        pids: dict[str, int] = {}
        for i, (name, pid) in enumerate(leaders.items()):
            if pid is not None:
                pids[name] = pid
                figures = sample_tree(pid)
                if figures is not None:
                    out[name] = figures
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
        self._store(out, pids)

    def one(self, name: str, pid: int | None) -> ProcFigures | None:
        """One publisher's figures: cached if read within min_interval, else read now."""
        if pid is None:
            return None
        now = time.monotonic()
        if now - self._one_at.get(name, self.refreshed_at) < self.min_interval:
            return self.figures.get(name)
        figures = sample_tree(pid)
        self._one_at[name] = now
        self._pids[name] = pid
        if figures is None:
            self.figures.pop(name, None)
        else:
            self.figures[name] = figures
        return figures

    def _store(self, figures: dict[str, ProcFigures], pids: dict[str, int]) -> None:
        self._one_at.clear()
        self.own = _sample_self()
        self.figures = figures
        self._pids = pids
        self.refreshed_at = time.monotonic()
        self.refreshes += 1

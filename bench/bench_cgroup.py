"""Micro benchmark of what a cgroup per publisher costs (pubmon.core.cgroup). Needs root and a
writable cgroup2 hierarchy (a test group is made below this process's own and removed).

Prints one JSON line per figure:
  spawn  spawn + exit of `true` through pubmon.core.process, interleaved: the wrapper path with and
         without joining a cgroup, the preexec path (rlimits) with and without; ms, median,
         p10, p90
  sweep  the daemon's own CPU (utime + stime, % of one core) over `--seconds` with N idle
         `sleep` publishers, without memory_restart and with it on every one (the memory
         sweep reads each once a second): in process groups, and in cgroups (without the
         memory controller here: the RSS of cgroup.procs)
  tripwire  the memory sweep's CPU (% of one core at one sweep a second) over N publishers
         whose memory.high tripwire is armed and quiet, the memory controller's path: their
         cgroups are plain directories with the controller's files (this kernel's cgroup2
         has no memory controller), so this is pubmon's own cost, not the kernel's

    python bench/bench_cgroup.py [--spawns 300] [--publishers 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pubmon.config.model import Config, ControlConfig, DaemonConfig, MonitorConfig, PublisherSpec
from pubmon.core.cgroup import Cgroup, Cgroups, own_cgroup
from pubmon.core.memsweep import MemorySweep
from pubmon.core.process import SpawnRequest, install_child_watcher, spawn
from pubmon.core.supervisor import Supervisor
from pubmon.daemon.reaping import reaping


class _Null:
    def feed(self, data: bytes) -> None:
        pass

    def eof(self) -> None:
        pass


async def _one(procs: str | None, rlimits: tuple[tuple[int, int], ...]) -> float:
    t = time.perf_counter()
    req = SpawnRequest(name="x", argv=("true",), cgroup_procs=procs, rlimits=rlimits)
    child = await spawn(req, _Null(), _Null())
    await child.exited
    await child.drain(1)
    child.close()
    return (time.perf_counter() - t) * 1000


async def bench_spawn(n: int, group: Path) -> None:
    install_child_watcher()
    procs = str(group / "cgroup.procs")
    nofile = ((resource.RLIMIT_NOFILE, 1000),)
    cases = {
        "wrapper": (None, ()),
        "wrapper+cgroup": (procs, ()),
        "preexec": (None, nofile),
        "preexec+cgroup": (procs, nofile),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, (p, r) in cases.items():
            times[name].append(await _one(p, r))
    for name, values in times.items():
        values.sort()
        print(json.dumps({
            "figure": "spawn", "case": name, "ms_median": round(statistics.median(values), 2),
            "ms_p10": round(values[len(values) // 10], 2),
            "ms_p90": round(values[len(values) * 9 // 10], 2),
        }), flush=True)  # fmt: skip


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _idle_cpu(n: int, seconds: float, memory_restart: int | None, cg: Path | None) -> float:
    specs = tuple(
        PublisherSpec(
            name=f"p{i}", program=f"p{i}", command=("sleep", "3600"), start_timeout=0.0,
            memory_restart=memory_restart,
        )
        for i in range(n)
    )  # fmt: skip
    config = Config(
        path="/dev/null",
        daemon=DaemonConfig(shutdown_timeout=60),
        control=ControlConfig(socket=None),
        monitor=MonitorConfig(listen=""),
        publishers=specs,
    )
    groups = Cgroups.setup(str(cg)) if cg else None
    async with reaping() as reaper, Supervisor(config, cgroups=groups, reaper=reaper) as sup:
        await sup.wait_settled()
        await asyncio.sleep(2)
        c0, t0 = _cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        return (_cpu() - c0) / (time.monotonic() - t0) * 100


async def bench_sweep(n: int, seconds: float, group: Path) -> None:
    for where, cg in (("process groups", None), ("cgroups", group)):
        base = await _idle_cpu(n, seconds, None, cg)
        watched = await _idle_cpu(n, seconds, 1 << 30, cg)
        print(json.dumps({
            "figure": "sweep", "publishers": n, "in": where,
            "idle_cpu_pct": round(base, 2), "idle_cpu_pct_memory_restart": round(watched, 2),
        }), flush=True)  # fmt: skip


class _Quiet:
    """A publisher as memsweep.Watched sees it, whose memory stays below memory_restart."""

    def __init__(self, i: int, top: Path) -> None:
        self.name = f"p{i}"
        self.spec = PublisherSpec(name=self.name, program=self.name, command=("true",),
                                  memory_restart=1 << 30)  # fmt: skip
        (top / self.name).mkdir()
        for file, text in (("memory.events", "high 0\n"), ("memory.current", "1000"),
                           ("memory.high", "max")):  # fmt: skip
            (top / self.name / file).write_text(text)
        self.cgroup: Cgroup | None = Cgroup(str(top / self.name), frozenset({"memory"}))
        self.pid: int | None = 1000 + i

    def check_memory(self, now: float) -> int | None:
        return 1000


async def bench_tripwire(n: int, sweeps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pubs = [_Quiet(i, Path(tmp)) for i in range(n)]
        sweep = MemorySweep()
        await sweep.sweep(pubs)  # arms every tripwire (and reads each once)
        reads = sweep.reads
        c0 = _cpu()
        for _ in range(sweeps):
            await sweep.sweep(pubs)
        per_sweep = (_cpu() - c0) / sweeps
        sweep.close()
        print(json.dumps({
            "figure": "tripwire", "publishers": n,
            "reads_per_sweep": (sweep.reads - reads) / sweeps,
            "sweep_us": round(per_sweep * 1e6), "idle_cpu_pct": round(per_sweep * 100, 3),
        }), flush=True)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spawns", type=int, default=300)
    ap.add_argument("--publishers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    own = own_cgroup()
    if own is None or os.geteuid() != 0:
        print("needs root and a cgroup2 hierarchy", file=sys.stderr)
        return 1
    group = Path(own) / f"pubmon-bench-{os.getpid()}"
    group.mkdir()
    (group / "spawn").mkdir()
    (group / "sweep").mkdir()
    try:
        asyncio.run(bench_tripwire(args.publishers, 200))
        if args.spawns:
            asyncio.run(bench_spawn(args.spawns, group / "spawn"))
        asyncio.run(bench_sweep(args.publishers, args.seconds, group / "sweep"))
    finally:
        for sub in sorted(group.glob("**/"), key=lambda p: -len(p.parts)):
            sub.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Deaths: a child SIGKILLed (how soon is it back?) and the supervisor SIGKILLed (who is left?).

restart: 20 children of `sleep 3600`. Each kill SIGKILLs a different child (so pubmon's first,
undelayed restart is what is measured, never its backoff), then the benchmark busy-polls
/proc/<daemon>/task/*/children until a new child has exec'd `sleep`. Nobody calls the status
API meanwhile: an API call would wake a supervisor that sleeps between ticks. Afterwards the
status API must show that pid RUNNING (checked, not timed).

orphans: 5 children; SIGKILL the supervisor; 2 s later count the children still alive.
"""

from __future__ import annotations

import os
import signal
import statistics
import time

import procfs
from contenders import Contender, Program
from harness import Ctx, Recorder, say

CHILDREN = 20
ORPHAN_CHILDREN = 5
ORPHAN_WAIT = 2.0


def restart(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    c = cls(ctx.workdir(f"{cls.name}-restart"))
    program = Program("r", ("sleep", "3600"), numprocs=CHILDREN)
    try:
        c.start([program])
        _, status = c.wait_running(program.instances(), timeout=60)
        time.sleep(0.5)
        delays = []
        for k in range(min(ctx.sizes.kills, CHILDREN)):
            name = f"r:{k}"
            before = procfs.children(c.pid)
            start = time.monotonic()
            os.kill(status[name][1], signal.SIGKILL)
            pid, seen = _new_child(c.pid, before, "sleep", timeout=10)
            delays.append(1000 * (seen - start))
            _confirm(c, name, pid)
            time.sleep(0.1)
            status = c.status()
        say(f"  {c.name}: restart delays (ms) {[round(d, 1) for d in delays]}")
        rec.add("restart_p50", c.name, statistics.median(delays), "ms")
        rec.add("restart_p95", c.name, _percentile(delays, 95), "ms")
    finally:
        procfs.cleanup()


def _new_child(daemon: int, before: set[int], command: str, timeout: float) -> tuple[int, float]:
    """Busy-poll until a child of `daemon` not in `before` runs `command` (it has exec'd)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in procfs.children(daemon) - before:
            if procfs.comm(pid) == command:
                return pid, time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new {command!r} child of {daemon} within {timeout} s")


def _confirm(c: Contender, name: str, pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := c.status().get(name)) != ("RUNNING", pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"{c.name}: {name} is {got}, expected RUNNING pid {pid}")
        time.sleep(0.005)


def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def orphans(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    c = cls(ctx.workdir(f"{cls.name}-orphans"))
    program = Program("o", ("sleep", "3600"), numprocs=ORPHAN_CHILDREN)
    try:
        c.start([program])
        _, status = c.wait_running(program.instances(), timeout=60)
        pids = [pid for _, pid in status.values()]
        c.kill()
        time.sleep(ORPHAN_WAIT)
        left = sum(map(procfs.alive, pids))
        say(f"  {c.name}: {left} of {len(pids)} children alive {ORPHAN_WAIT} s after SIGKILL")
        rec.add("orphans", c.name, left, f"of {len(pids)} alive")
    finally:
        procfs.cleanup()

"""N children of `sleep 3600`: spawn, idle, rpc, cli and stop, on one daemon start per run.

Run 1 of each N measures everything in this order: spawn (start -> status says all RUNNING),
idle (CPU and RSS over a quiet window), rpc and cli (status and getStatus through the API), stop
(SIGTERM -> daemon and every child gone). Later runs only repeat spawn and stop, the figures
whose median of --runs is reported. The fb303-probed idle fleet is `idle_fb303`.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time

import procfs
from contenders import Contender, Program
from harness import Ctx, Recorder, say

STOP_TIMEOUT = 60.0
STATUS_BUDGET = 3.0  # seconds of status calls per daemon (supervisord needs ~1 s per call at 1000)


def fleet(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    for n in ctx.sizes.fleet:
        runs = min(ctx.runs, ctx.sizes.big_runs) if n >= 1000 else ctx.runs
        for run in range(runs if ctx.wants("spawn", "stop") else 1):
            c = cls(ctx.workdir(f"{cls.name}-fleet{n}"))
            try:
                _one_run(ctx, c, n, rec, first=run == 0)
            finally:
                procfs.cleanup()


def _one_run(ctx: Ctx, c: Contender, n: int, rec: Recorder, *, first: bool) -> None:
    program = Program("s", ("sleep", "3600"), numprocs=n)
    start = time.monotonic()
    c.start([program])
    ready, status = c.wait_running(program.instances(), timeout=120)
    say(f"  {c.name} n={n}: {n} RUNNING after {ready - start:.3f} s")
    if ctx.wants("spawn"):
        rec.add("spawn", c.name, ready - start, "s", n)
    if first and ctx.wants("idle"):
        time.sleep(ctx.sizes.settle)
        _idle(ctx, c, n, rec, "idle")
    if first and ctx.wants("rpc"):
        _rpc(ctx, c, n, rec)
    if first and ctx.wants("cli"):
        _cli(ctx, c, n, rec)
    if ctx.wants("stop"):
        _stop(c, n, rec, {pid for _, pid in status.values()})


def _idle(ctx: Ctx, c: Contender, n: int, rec: Recorder, prefix: str) -> None:
    cpu0, t0 = procfs.cpu_seconds(c.pid), time.monotonic()
    time.sleep(ctx.sizes.idle_window)
    cpu1, t1 = procfs.cpu_seconds(c.pid), time.monotonic()
    rec.add(f"{prefix}_cpu", c.name, 100 * (cpu1 - cpu0) / (t1 - t0), "% of one core", n)
    rec.add(f"{prefix}_rss", c.name, procfs.rss_mib(c.pid), "MiB", n)


def _stop(c: Contender, n: int, rec: Recorder, pids: set[int]) -> None:
    pids |= procfs.descendants(c.pid)
    start = time.monotonic()
    c.terminate()
    while not procfs.exited(c.pid):
        if time.monotonic() - start > STOP_TIMEOUT:
            rec.na("stop", c.name, f"daemon still there after {STOP_TIMEOUT} s", n)
            return
        time.sleep(0.001)
    if not procfs.wait_gone(pids, STOP_TIMEOUT):
        left = sum(map(procfs.alive, pids))
        rec.na("stop", c.name, f"{left} children still alive after {STOP_TIMEOUT} s", n)
        return
    rec.add("stop", c.name, time.monotonic() - start, "s", n)


def _rpc(ctx: Ctx, c: Contender, n: int, rec: Recorder) -> None:
    why = c.unavailable("rpc")
    if why:
        for figure in ("status", "calls_1conn", "calls_8conn", "cpu_per_call_1conn"):
            rec.na(figure, c.name, why, n)
        return
    conn = c.connect()
    try:
        latencies: list[float] = []
        deadline = time.monotonic() + STATUS_BUDGET
        while len(latencies) < ctx.sizes.status_calls and (
            len(latencies) < 3 or time.monotonic() < deadline
        ):
            t = time.perf_counter()
            status = conn.status()
            latencies.append(time.perf_counter() - t)
            assert len(status) == n, f"status lists {len(status)} of {n}"
    finally:
        conn.close()
    rec.add("status", c.name, 1000 * statistics.median(latencies), "ms", n)
    for k in (1, 8):
        rate, cpu_us = _throughput(c, k, ctx.sizes.rpc_window)
        rec.add(f"calls_{k}conn", c.name, rate, "calls/s", n)
        rec.add(f"cpu_per_call_{k}conn", c.name, cpu_us, "µs server CPU", n)


def _throughput(c: Contender, k: int, window: float) -> tuple[float, float]:
    """`k` threads, each with its own connection, calling ping() for `window` seconds.
    Returns (calls/s, server CPU µs per call)."""
    conns = [c.connect() for _ in range(k)]
    counts = [0] * k
    deadline = time.monotonic() + window

    def work(j: int) -> None:
        conn = conns[j]
        while time.monotonic() < deadline:
            conn.ping()
            counts[j] += 1

    cpu0, t0 = procfs.cpu_seconds(c.pid), time.monotonic()
    threads = [threading.Thread(target=work, args=(j,)) for j in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.monotonic() - t0, procfs.cpu_seconds(c.pid) - cpu0
    for conn in conns:
        conn.close()
    calls = sum(counts)
    return calls / elapsed, 1e6 * cpu / calls


def _cli(ctx: Ctx, c: Contender, n: int, rec: Recorder) -> None:
    why = c.unavailable("cli")
    if why:
        rec.na("cli", c.name, why, n)
        return
    walls = []
    for _ in range(ctx.sizes.cli_runs):
        t = time.perf_counter()
        out = subprocess.run(c.cli_argv(), capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if out.returncode != 0:
            rec.na("cli", c.name, f"exit {out.returncode}: {out.stderr.strip()[:200]}", n)
            return
    rec.add("cli", c.name, 1000 * statistics.median(walls), "ms", n)


def idle_fb303(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    """Idle with N demo publishers (fb303 servers), each probed over fb303 every 5 s."""
    n = ctx.sizes.fb303_fleet
    c = cls(ctx.workdir(f"{cls.name}-fb303"))
    why = c.unavailable("fb303")
    if why:
        rec.na("idle_fb303_cpu", c.name, why, n)
        rec.na("idle_fb303_rss", c.name, why, n)
        return
    port = free_ports(n)
    argv = (sys.executable, "-m", "pubmon.demo", "--pub_port", "{port}")
    program = Program("demo", argv, numprocs=n, port=port, fb303_interval=5.0)
    try:
        start = time.monotonic()
        c.start([program])
        ready, _ = c.wait_running(program.instances(), timeout=300)
        say(f"  {c.name}: {n} demo publishers RUNNING after {ready - start:.1f} s")
        time.sleep(max(ctx.sizes.settle, 5.0))  # past the first probe round after RUNNING
        _idle(ctx, c, n, rec, "idle_fb303")
    finally:
        procfs.cleanup()


def free_ports(count: int, first: int = 20000) -> int:
    """The first port p >= `first` such that p .. p+count-1 are all free on 127.0.0.1."""
    base = first
    while base + count < 65000:
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    base = port + 1
                    break
        else:
            return base
    raise RuntimeError(f"no {count} free ports in a row")

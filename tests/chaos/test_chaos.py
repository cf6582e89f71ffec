"""The chaos run: 200 publishers under random faults and operator actions, then the books.

PUBMON_CHAOS_SECONDS sets the length (default 60; `make soak MINUTES=30` sets it), and
PUBMON_CHAOS_SEED the seed (default: a random one, printed so a run can be replayed).
PUBMON_CHAOS_REPORT=FILE also writes the summary there as JSON.

The run: start the daemon on 200 publishers (chaos children that write numbered lines, some of
them ignoring SIGTERM, demo publishers with fb303 probes, a few that crash-loop and two that
cannot be spawned at all); drive faults, operator calls, reloads and status bursts for a
warm-up, let everything settle and measure the daemon; drive the rest of the time; settle and
measure again; stop the daemon; then check every publisher's state, counters and log files, and
look for anything left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chaos_driver import Driver, check_cli_follower
from chaos_model import (
    LINE_KINDS,
    Env,
    Pub,
    fb303_probe_available,
    render_config,
    write_config,
)
from chaos_verify import (
    Usage,
    check_demo_logs,
    check_logs,
    residual,
    tagged_processes,
    usage,
    zombies_under,
)

from daemons import run_daemon
from procs import alive, descendants
from pubmon.demo import free_ports
from pubmon.errors import RpcError

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

N_PUBLISHERS = 200
N_DEMO = 20
N_SPARE_PORTS = 20  # for demo publishers added by reloads
FD_SLACK = 4  # unexplained fds the end may have beyond the warm-up
# RSS may grow from the warm-up to the end by 10 % + 16 MiB (allocator noise), plus what the rings
# legitimately fill up with as bursts reach more publishers: 200 lines each, kept as read chunks
# of up to 256 KiB, so long lines and bursts leave ~100+ KiB in a ring for a while.
RSS_SLACK_KIB = 16 * 1024
RING_FILL_KIB = 128  # per publisher
LATE_GROWTH = 0.1  # runs of 10 minutes or more: the last half may add 10 % + 4 MiB, no more
_BAD_LOG_WORDS = ("Traceback", "Task exception", "Exception in callback", "returncode 255")


def initial_pubs(rng: random.Random, demo_ports: list[int]) -> list[Pub]:
    pubs: list[Pub] = []
    kinds = ["stubborn"] * 15 + ["doomed"] * 3 + ["fatal"] * 2 + ["demo"] * len(demo_ports)
    kinds += ["plain"] * (N_PUBLISHERS - len(kinds))
    rng.shuffle(kinds)
    seen: Counter[str] = Counter()
    ports = list(demo_ports)
    for kind in kinds:
        index = seen[kind]
        seen[kind] += 1
        pubs.append(
            Pub(
                name=f"{kind[:2]}{index:03d}",
                kind=kind,
                restart=rng.choices(["always", "on-failure", "never"], [85, 10, 5])[0]
                if kind in LINE_KINDS
                else "always",
                rate=round(rng.uniform(2, 8), 1),
                tag=index,
                stop_timeout=round(rng.uniform(0.3, 1.0), 2) if kind == "stubborn" else 1.0,
                # Stable ones start with the daemon: `pubmon tail -f` follows two of them and
                # must have seen lines (one that never ran printed nothing: a false alarm).
                autostart=kind in ("doomed", "fatal")
                or rng.random() < 0.95
                or (kind == "plain" and index < 12),
                port=ports.pop() if kind == "demo" else None,
                stable=kind == "plain" and index < 12,
            )
        )
    return pubs


@dataclass(frozen=True)
class Measure:
    """The daemon's fds and RSS at a quiet moment, with what its publishers explain of them."""

    usage: Usage
    live: int  # publishers with a process
    live_probed: int  # ... and an fb303 probe connection
    configured: int
    clients: int  # connections of ours open to the daemon, this measurement's included

    def residual(self) -> dict[str, int]:
        out = residual(self.usage, self.live, self.live_probed, self.configured)
        out["socket"] -= self.clients
        return out


async def measure(driver: Driver, pid: int, connections: int) -> Measure:
    """Measure once the daemon holds only the `connections` we keep open (+ this one): closed
    status-burst connections may take it a moment to notice."""
    async with driver.client() as c:
        try:
            async with asyncio.timeout(10):
                while await c.call("getCounter", "rpc.connections") > connections + 1:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            driver.problem(f"the daemon still holds {connections}+ connections after 10 s")
        infos = await c.call("listPublishers")
    live = [i for i in infos if i.pid]
    probed = sum(1 for i in live if i.name in driver.ever_demo)
    return Measure(usage(pid), len(live), probed, len(infos), connections + 1)


async def start_cli_follower(env: Env, name: str) -> tuple[asyncio.subprocess.Process, Path]:
    out = env.tmp / f"tail-{name}.out"
    # Started in the background by a shell (`make soak &`), we have SIGINT ignored, and so would
    # `pubmon tail -f`: Ctrl-C (our SIGINT at the end) must reach it. A handled disposition is
    # reset to the default at exec; an ignored one is not.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(out, "wb") as stdout, open(env.tmp / f"tail-{name}.err", "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pubmon", "tail", name, "-f", "-n", "5",
                "--socket", str(env.socket), stdout=stdout, stderr=stderr,
            )  # fmt: skip
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return proc, out


async def sample(
    driver: Driver, pid: int, out: list[tuple[float, int]], lags: list[int], t0: float
) -> None:
    """Every 2 s, the daemon's RSS (the trend: a leak climbs, a ring fills up and levels off)
    and its loop lag (how late its last 1 s sleep woke up)."""
    async with driver.client() as c:
        while True:
            out.append((round(time.monotonic() - t0), usage(pid).rss_kib))
            lags.append(await c.call("getCounter", "daemon.loop_lag_ms"))
            await asyncio.sleep(2)  # a sampling period, not a wait


async def follow_safely(driver: Driver, name: str) -> None:
    try:
        await driver.follow(name)
    except RpcError as exc:
        driver.problem(f"follow {name}: {exc}")


async def test_chaos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = float(os.environ.get("PUBMON_CHAOS_SECONDS") or 60)
    seed_text = os.environ.get("PUBMON_CHAOS_SEED")
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(1, 1_000_000)
    demo_ok = fb303_probe_available()
    ports = free_ports(1 + (N_DEMO + N_SPARE_PORTS if demo_ok else 0))
    env = Env(
        tmp_path,
        token=f"{os.getpid()}-{seed}-{time.time_ns()}",
        minutes=seconds / 60,
        monitor_port=ports[0],
    )
    env.prepare()
    pubs = initial_pubs(random.Random(f"{seed}/setup"), ports[1 : 1 + N_DEMO] if demo_ok else [])
    write_config(env, render_config(env, pubs))
    kinds = Counter(p.kind for p in pubs)
    with capsys.disabled():
        print(
            f"\nchaos: seed {seed} (PUBMON_CHAOS_SEED={seed} replays it), {seconds:g} s, "
            f"{len(pubs)} publishers: "
            + ", ".join(f"{n} {k}" for k, n in kinds.items())
            + ("" if demo_ok else " (no fb303 probe yet: no demo publishers)"),
            flush=True,
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))  # SIGSEGV/SIGABRT faults: no core files
    before = descendants(os.getpid())
    report: dict[str, Any] = {"seed": seed, "seconds": seconds, "publishers": dict(kinds)}
    t0 = time.monotonic()
    try:
        async with run_daemon(env.config, ready=False) as d:
            driver = Driver(env, seed, pubs, d.pid, demo_ports=ports[1 + N_DEMO :])
            await d.wait_log("ready:", timeout=60)
            report["ready_s"] = round(time.monotonic() - t0, 1)
            await driver.settle(60)
            report["setup_s"] = round(time.monotonic() - t0, 1)
            stable = [p.name for p in pubs if p.stable]
            cli = [await start_cli_follower(env, name) for name in stable[:2]]
            warm_s = min(15.0, seconds / 4)
            followers = stable[2:8]
            rss: list[tuple[float, int]] = []
            lags: list[int] = []
            async with asyncio.TaskGroup() as tg:
                for name in followers:
                    tg.create_task(follow_safely(driver, name))
                sampler = tg.create_task(sample(driver, d.pid, rss, lags, t0))
                try:
                    await driver.run_phase(warm_s)
                    report["settle_s"] = [round(await driver.settle(), 1)]
                    warm = await measure(driver, d.pid, len(followers) + len(cli) + 1)
                    t_chaos = time.monotonic()
                    await driver.run_phase(seconds - warm_s)
                    report["chaos_tail_s"] = round(time.monotonic() - t_chaos, 1)
                    report["settle_s"].append(round(await driver.settle(), 1))
                finally:
                    driver.stop_followers()
                    sampler.cancel()
            # The first sample still shows the start (200 spawns in a row): reported apart.
            startup_lag, lags = (lags[0], lags[1:]) if lags else (0, [])
            report["loop_lag_ms"] = {
                "startup": startup_lag,
                "max": max(lags, default=0),
                "p90": sorted(lags)[int(len(lags) * 0.9)] if lags else 0,
                "over_500": sum(lag > 500 for lag in lags),
                "samples": len(lags),
                "all": lags,
            }
            report["rss_trend_mib"] = [
                (t, round(kib / 1024, 1)) for t, kib in rss[:: max(1, len(rss) // 12)]
            ]
            await check_cli_followers(driver, cli, report)
            end = await measure(driver, d.pid, 0)
            check_usage(driver, warm, end, rss, report)
            async with driver.client() as c:
                check_counters(driver, await c.call("getCounters"), report)
            t1 = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.wait_exit(60)
            report["shutdown_s"] = round(time.monotonic() - t1, 1)
            if code != 0:
                driver.problem(f"the daemon exited {code} on SIGTERM")
            daemon_log = "\n".join(d.stderr) + "\n"
            (env.tmp / "daemon.log").write_text(daemon_log)
            if path := os.environ.get("PUBMON_CHAOS_REPORT"):  # pytest prunes old tmp dirs
                Path(path).with_suffix(".daemon.log").write_text(daemon_log)
            for line in d.stderr:
                if any(word in line for word in _BAD_LOG_WORDS):
                    driver.problem(f"daemon log: {line[:200]}")
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    check_leftovers(driver, env, before, report)
    t2 = time.monotonic()
    logs = check_logs(env.logs, env.state, sorted(driver.ever), env.backups)
    demo = check_demo_logs(env.logs, sorted(driver.ever_demo))
    report["log_check_s"] = round(time.monotonic() - t2, 1)
    driver.problems.extend(logs.problems + demo.problems)
    report.update(
        lines_checked=logs.lines,
        runs=logs.runs,
        log_files=logs.files,
        log_mb=round(logs.bytes / 1e6, 1),
        unrecorded_lines=logs.unrecorded,
        demo_lines_checked=demo.lines,
        demo_runs=demo.runs,
    )
    summary = summarize(driver, report)
    with capsys.disabled():
        print(summary, flush=True)
    if path := os.environ.get("PUBMON_CHAOS_REPORT"):
        Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")
    assert not driver.problems, "\n".join(driver.problems[:40])
    for folder in (env.logs, env.state):  # a soak writes GBs: keep them only for a failure
        shutil.rmtree(folder)


async def check_cli_followers(
    driver: Driver, cli: list[tuple[asyncio.subprocess.Process, Path]], report: dict[str, Any]
) -> None:
    lines = 0
    for proc, out in cli:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await proc.wait()
        if code != 130:
            driver.problem(f"pubmon tail -f exited {code} on SIGINT, not 130")
        n, problems = check_cli_follower(out.read_text(errors="replace"))
        lines += n
        driver.problems.extend(problems)
        if n == 0:
            driver.problem(f"pubmon tail -f printed no lines into {out}")
    report["cli_follower_lines"] = lines


def check_counters(driver: Driver, counters: dict[str, int], report: dict[str, Any]) -> None:
    restarts = exits = 0
    for name, pub in driver.pubs.items():
        got = (counters.get(f"publisher.{name}.restarts"), counters.get(f"publisher.{name}.exits"))
        # Under load a probed publisher can miss its start_timeout or a few probes and be
        # restarted by the daemon without the driver's doing. Such runs are counted by the
        # daemon as probe kills: accept exactly those, beyond the ones the driver caused.
        injected = sum(f in ("stop", "hang") for f in pub.faults)
        unplanned = counters.get(f"publisher.{name}.probe_kills", 0) - injected
        if unplanned > 0 and got == (pub.restarts + unplanned, pub.exits + unplanned):
            driver.stats["unplanned_probe_kills"] += unplanned
        elif got != (pub.restarts, pub.exits):
            driver.problem(
                f"{name} ({pub.kind}, faults {pub.faults}): counters say restarts/exits {got}, "
                f"the driver counted {(pub.restarts, pub.exits)}"
            )
        if dropped := counters.get(f"publisher.{name}.log_dropped"):
            driver.problem(f"{name}: {dropped} log lines dropped")
        restarts += pub.restarts
        exits += pub.exits
    for key, want in (
        ("daemon.reloads", driver.reloads),
        ("daemon.reload_failures", driver.reload_failures),
        ("rpc.errors", 0),
        ("daemon.upgrades", driver.upgrades),
        ("daemon.upgrade_failures", 0),
    ):
        if counters.get(key) != want:
            driver.problem(f"counter {key} is {counters.get(key)}, expected {want}")
    report.update(
        restarts=restarts + driver.retired["restarts"],
        exits=exits + driver.retired["exits"],
        publishers_at_end=len(driver.pubs),
    )


def check_usage(
    driver: Driver,
    warm: Measure,
    end: Measure,
    rss: list[tuple[float, int]],
    report: dict[str, Any],
) -> None:
    a, b = warm.residual(), end.residual()
    grown = {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b) if b.get(k, 0) != a.get(k, 0)}
    report["fds"] = {
        "warm": warm.usage.total,
        "end": end.usage.total,
        "unexplained_growth": grown,
        "by_kind": {"warm": dict(warm.usage.fds), "end": dict(end.usage.fds)},
        "live": [warm.live, end.live],
    }
    w, e = warm.usage.rss_kib, end.usage.rss_kib
    report["rss_mib"] = {"warm": round(w / 1024, 1), "end": round(e / 1024, 1)}
    if sum(grown.values()) > FD_SLACK:
        driver.problem(f"daemon fds grew beyond what its publishers explain: {grown}")
    bound = w * 1.1 + RSS_SLACK_KIB + RING_FILL_KIB * max(warm.configured, end.configured)
    if e > bound:
        driver.problem(f"daemon RSS grew from {w} KiB to {e} KiB (bound {bound:.0f} KiB)")
    if len(rss) >= 300:  # 10 minutes of samples: a leak climbs to the end, a ring fill levels off
        mid = rss[len(rss) // 2][1]
        late = rss[-1][1] - mid
        report["rss_mib"]["late_growth"] = round(late / 1024, 1)
        if late > LATE_GROWTH * mid + 4096:
            driver.problem(f"daemon RSS still climbing: +{late} KiB over the last half")


def check_leftovers(driver: Driver, env: Env, before: set[int], report: dict[str, Any]) -> None:
    left = {p for p in descendants(os.getpid()) - before if alive(p)}
    tagged = tagged_processes(env.token)
    zombies = zombies_under(os.getpid())
    for pid in left | set(tagged):
        driver.problem(f"process {pid} left after the daemon stopped: {tagged.get(pid, '')}")
    for pid in zombies:
        driver.problem(f"zombie {pid} left after the daemon stopped")
    report["leftover_processes"] = len(left | set(tagged))
    report["zombies"] = len(zombies)


def summarize(driver: Driver, r: dict[str, Any]) -> str:
    s = driver.stats
    faults = {k.split(".", 1)[1]: v for k, v in sorted(s.items()) if k.startswith("fault.")}
    ops = {k.split(".", 1)[1]: v for k, v in sorted(s.items()) if k.startswith("op.")}
    leaks = r["leftover_processes"] + r["zombies"]
    leaks += sum(1 for p in driver.problems if "fds grew" in p or "RSS grew" in p)
    fds, rss = r["fds"], r["rss_mib"]
    by_fault: dict[str, Counter[int]] = {}
    for (kind, code), n in driver.last_exits.items():
        by_fault.setdefault(kind, Counter())[code] += n
    statuses = ", ".join(
        f"{kind} {next(iter(codes))} x{codes.total()}"
        if len(codes) == 1
        else f"{kind} x{codes.total()} ({len(codes)} statuses)"
        for kind, codes in sorted(by_fault.items())
    )
    agree = not any("counters say" in p for p in driver.problems)
    return "\n".join(
        [
            f"chaos summary: seed {driver.seed}, {r['seconds']:g} s, publishers "
            + ", ".join(f"{n} {k}" for k, n in r["publishers"].items())
            + f" ({r['publishers_at_end']} at the end)",
            f"  setup {r['setup_s']} s (ready after {r['ready_s']} s), settling {r['settle_s']} s,"
            f" shutdown {r['shutdown_s']} s, log check {r['log_check_s']} s",
            f"  faults injected: {sum(faults.values())} "
            + ", ".join(f"{k} {v}" for k, v in faults.items())
            + f" ({s['skipped.fault']} picks skipped: target still starting)",
            f"  operator calls: {sum(v for k, v in ops.items() if k != 'cli')} "
            + ", ".join(f"{k} {v}" for k, v in ops.items())
            + f"; reloads {driver.reloads} ({s['reload.sighup']} SIGHUP, {s['reload.rpc']} RPC:"
            f" +{s['reload.added']} -{s['reload.removed']} ~{s['reload.changed']}),"
            f" {driver.reload_failures} broken config(s) refused",
            f"  restarts {r['restarts']}, exits {r['exits']} (daemon counters "
            + ("= driver's count for every publisher" if agree else "DISAGREE with the driver")
            + f"); exit statuses seen: {statuses}",
            f"  daemon loop lag (sampled every 2 s): {r['loop_lag_ms']['startup']} ms at the start,"
            f" then max {r['loop_lag_ms']['max']} ms,"
            f" p90 {r['loop_lag_ms']['p90']} ms, {r['loop_lag_ms']['over_500']} of"
            f" {r['loop_lag_ms']['samples']} samples over 500 ms",
            f"  upgrades {driver.upgrades} in place ("
            + ", ".join(
                f"{k.split('.', 1)[1]} {v}"
                for k, v in sorted(s.items())
                if k.startswith("upgrade.")
            )
            + ")",
            f"  status bursts {s['status.bursts']} on TCP ({s['status.calls']} calls, max latency"
            f" {driver.status_max_latency:.3f} s, {s['status.denied']} mutations refused);"
            f" followers: tailLog {s['follow.lines']} lines ({s['follow.missed']} missed),"
            f" pubmon tail -f {r['cli_follower_lines']} lines",
            f"  lines checked {r['lines_checked']} in {r['runs']} runs, {r['log_files']} files"
            f" ({r['log_mb']} MB); {r['unrecorded_lines']} more written but unrecorded at death;"
            f" demo publishers: {r['demo_lines_checked']} tick/spew lines in {r['demo_runs']} runs",
            f"  daemon fds {fds['warm']} -> {fds['end']} (unexplained growth"
            f" {fds['unexplained_growth'] or 0}), RSS {rss['warm']} -> {rss['end']} MiB"
            f" (trend, s: MiB: {' '.join(f'{t}:{m}' for t, m in r['rss_trend_mib'])})",
            f"  leaks found: {leaks} (processes {r['leftover_processes']}, zombies {r['zombies']})",
            f"  problems: {len(driver.problems)}",
        ]
        + [f"    {p}" for p in driver.problems[:20]]
    )

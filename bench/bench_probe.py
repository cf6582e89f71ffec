"""What one fb303 probe costs the daemon, in CPU: `.venv/bin/python bench/bench_probe.py`.

Two figures, both against `fb303_responder.py` (one small process answering getStatus on many
ports, so that the children cost nothing and the machine's noise is the daemon's own):
- `probe`: `Fb303Probe.check()` in this process, K probes with kept connections, checked
  round after round; CPU (`time.process_time`) per check. The probe's own work, no daemon.
- `daemon`: a real `pubmon daemon` with N `sleep` publishers, each probed over fb303 every
  `--interval` s at its own responder port; the daemon's CPU (utime + stime from /proc) over a
  window, per probe and as % of one core. Everything a probe round costs: the check, the
  timer, the verdict posted to the publisher's runner, the probe-time histogram.

Both run `--repeat` times, interleaved when both are selected; medians and min-max are printed.
The machine is shared: read the spread, and the load printed at the start.

    bench/bench_probe.py [--only probe,daemon] [--n 100,1000] [--interval 1] [--window 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procfs  # noqa: E402
from scenario_fleet import free_ports  # noqa: E402

PUBMON = Path(sys.executable).with_name("pubmon")


def _responder(first: int, count: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fb303_responder.py"), str(first), str(count)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError("fb303_responder did not start")
    return proc


async def _probe_checks(first: int, k: int, rounds: int) -> float:
    from pubmon.core.probe import Fb303Probe

    probes = [Fb303Probe("127.0.0.1", first + i, timeout=2.0) for i in range(k)]
    try:
        for p in probes:  # connect first: the steady state keeps its connection
            await p.check()
        cpu0 = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(p.check() for p in probes))
        cpu = time.process_time() - cpu0
        bad = [(p.status, p.last_error) for p in probes if p.status != 2]
        assert not bad, bad[:3]
        return 1e3 * cpu / (k * rounds)
    finally:
        for p in probes:
            await p.close()


def probe_cost(first: int, k: int, rounds: int) -> float:
    """ms of CPU per Fb303Probe.check() in this process."""
    responder = _responder(first, k)
    try:
        return asyncio.run(_probe_checks(first, k, rounds))
    finally:
        responder.kill()
        responder.wait()


def daemon_cost(first: int, n: int, interval: float, window: float, settle: float) -> float:
    """ms of daemon CPU per probe with n publishers probed every `interval` s."""
    with tempfile.TemporaryDirectory(prefix="pubmon-bench-probe-") as tmp:
        work = Path(tmp)
        lines = [
            "[daemon]", f'log_dir = "{work / "logs"}"',
            "[control]", f'socket = "{work / "pubmon.sock"}"',
            "[monitor]", 'listen = ""',
            "[publisher.s]", 'command = ["sleep", "3600"]', f"numprocs = {n}",
            "start_timeout = 30", "log = { max_bytes = 0 }",
            "[publisher.s.probe]", 'kind = "fb303"', f"port = {first}",
            f"interval = {interval}", f"timeout = {min(2.0, interval)}",
        ]  # fmt: skip
        (work / "logs").mkdir()
        (work / "pubmon.toml").write_text("\n".join(lines) + "\n")
        _responder(first, n)  # cleanup() below kills it with the daemon
        pid = procfs.start_daemon(
            [str(PUBMON), "daemon", "--config", str(work / "pubmon.toml")], work / "daemon.log"
        )
        try:
            _wait_running(pid, work / "pubmon.sock", n, timeout=120)
            time.sleep(settle)  # past the STARTING polls: steady rounds only
            cpu0, t0 = procfs.cpu_seconds(pid), time.monotonic()
            time.sleep(window)
            cpu1, t1 = procfs.cpu_seconds(pid), time.monotonic()
        finally:
            procfs.cleanup()
    probes = n * (t1 - t0) / interval
    return 1e3 * (cpu1 - cpu0) / probes


def _wait_running(pid: int, sock: Path, n: int, timeout: float) -> None:
    from contenders.pubmon import ThriftConn

    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if procfs.exited(pid):
            raise RuntimeError(f"the daemon exited: {(sock.parent / 'daemon.log').read_text()}")
        try:
            conn = ThriftConn(sock)
            try:
                st = conn.status()
            finally:
                conn.close()
        except Exception as exc:
            st, last = {}, repr(exc)
            continue
        last = str(sorted({s for s, _ in st.values()}))
        if len(st) == n and all(s == "RUNNING" for s, _ in st.values()):
            return
    tail = (sock.parent / "daemon.log").read_text().splitlines()[-5:]
    raise TimeoutError(f"{n} publishers not RUNNING after {timeout} s: {last}; {tail}")


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="probe,daemon")
    p.add_argument("--n", default="100,1000", help="publishers in the daemon figure")
    p.add_argument("--k", type=int, default=100, help="probes in the probe figure")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    only = set(args.only.split(","))
    sizes = [int(x) for x in args.n.split(",")]
    procfs.become_subreaper()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine)")
    first = free_ports(max([args.k, *sizes]))
    results: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeat):
            if "probe" in only:
                v = probe_cost(first, args.k, args.rounds)
                results.setdefault(f"probe: CPU per check, {args.k} probes", []).append(v)
                print(f"  probe check: {v:.3f} ms CPU", flush=True)
            if "daemon" in only:
                for n in sizes:
                    v = daemon_cost(first, n, args.interval, args.window, args.settle)
                    results.setdefault(f"daemon: CPU per probe, n={n}", []).append(v)
                    pct = v * n / args.interval / 10
                    results.setdefault(
                        f"daemon: CPU %, n={n} every {args.interval:g} s", []
                    ).append(pct)
                    print(
                        f"  daemon n={n}: {v:.3f} ms CPU per probe, {pct:.1f} % of a core",
                        flush=True,
                    )
    finally:
        procfs.cleanup()
    print()
    for name, values in results.items():
        unit = "%" if "%" in name else "ms"
        print(f"{name:45} {unit:3} {_spread(values)}  runs {[round(v, 3) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

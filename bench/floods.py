"""Loop lag and RSS of the daemon under each hostile flood of issue 19 (standalone).

    .venv/bin/python bench/floods.py [--src DIR] [--seconds 6]

Starts `pubmon daemon` (as the current user, root here) with a control socket, a monitor port
on 127.0.0.1 and one publisher with 4000 lines in its ring, with NOTIFY_SOCKET and
WATCHDOG_USEC=200000 so that it pings WATCHDOG=1 every 100 ms. Then, one after the other, runs
tests/attacker.py (as uid 65534 when we are root) with each flood and reports:

- watchdog lag: the worst gap between two WATCHDOG=1 minus the 100 ms interval, i.e. the
  longest the loop was kept from a timer; systemd kills at a gap of WatchdogSec;
- loop_lag_ms: the largest value of the daemon's own counter (1 s sleeps) read during the flood;
- status: root's `pubmon status` over the unix socket, slowest of those run during the flood;
- RSS: the daemon's peak during the flood, and 3 s after the attacker left.

`--src DIR` runs the daemon from another source tree (for a before/after comparison; its config
loader must accept the keys below, so a tree without them runs with `--plain-config`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from control import call_frame  # type: ignore[import-not-found]  # noqa: E402

TALKER = (
    "import sys, time\n"
    "for i in range(4000): print(str(i).ljust(300, 'x'))\n"
    "sys.stdout.flush(); time.sleep(3600)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _sched(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of ``pid``'s main thread."""
    on_cpu, waiting, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _status(sock: Path, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pubmon", "status", "--socket", str(sock)],
        capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    return time.monotonic() - t0


def _counter(sock: Path, env: dict[str, str], key: str) -> int:
    got = subprocess.run(
        [sys.executable, "-m", "pubmon", "counters", key, "--socket", str(sock)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    for line in got.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", default=str(ROOT / "src"))
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--plain-config", action="store_true", help="no per-IP cap key in the config")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pubmon-floods-", dir="/tmp"))
    os.chmod(base, 0o755)
    shutil.copy(ROOT / "tests" / "attacker.py", base / "attacker.py")
    os.chmod(base / "attacker.py", 0o644)
    env = {**os.environ, "PYTHONPATH": args.src}
    port, sock = _free_port(), base / "pubmon.sock"
    per_ip = "" if args.plain_config else "max_connections_per_ip = 2048\n"
    (base / "pubmon.toml").write_text(
        f'[daemon]\nshutdown_timeout = 10\n[control]\nsocket = "{sock}"\n'
        # nobody may read logs on the unix socket (TCP without a certificate may not at all)
        "allow_uids = [0, 65534]\nmax_connections = 256\nmax_connections_per_uid = 256\n"
        f'[monitor]\nlisten = "127.0.0.1:{port}"\n{per_ip}'
        f"[publisher.talk]\ncommand = {json.dumps([sys.executable, '-c', TALKER])}\n"
        "start_timeout = 0\nlog = { ring_lines = 5000 }\n"
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify.sock"))
    pings: list[float] = []  # arrival times, stamped by a thread that does nothing else

    def receive() -> None:
        while True:
            try:
                data = notify.recv(4096)
            except OSError:
                return
            if b"WATCHDOG=1" in data:
                pings.append(time.monotonic())

    threading.Thread(target=receive, daemon=True).start()
    as_nobody = []
    if os.getuid() == 0 and shutil.which("setpriv"):
        as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    python = sys.executable
    daemon = subprocess.Popen(
        [sys.executable, "-m", "pubmon", "daemon", "--config", str(base / "pubmon.toml")],
        env={**env, "NOTIFY_SOCKET": str(base / "notify.sock"), "WATCHDOG_USEC": "200000"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    getcounter = call_frame("getCounter", "daemon.uptime_s").hex()
    tail = call_frame("tailLog", "talk", 0, 10000).hex()
    s = args.seconds
    # name: (attacker arguments, seconds it lasts)
    floods: dict[str, tuple[list[object], float]] = {
        "none (baseline)": ([], s),
        "pipelined getCounter, 96 conns": (["pipeline", "127.0.0.1", port, 96, s, getcounter], s),
        # held past the 10 s partial-frame timeout: the burst of closes is measured too
        "1000 conns x 16 KiB frame - 1 B": (["hold", "127.0.0.1", port, 1000, 16 << 10, 12], 12),
        "1000 conns x 1 MiB frame - 1 B": (["hold", "127.0.0.1", port, 1000, 1 << 20, s], s),
        "150 unix conns tailLog(10000), unread": (["noread", f"unix:{sock}", 0, 150, s, tail], s),
        "1100 idle TCP conns": (["idle", "127.0.0.1", port, 1100, s], s),
    }
    rows = []
    try:
        deadline = time.monotonic() + 30
        while _counter(sock, env, "publisher.talk.log_lines") < 4000:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not come up")
            time.sleep(0.2)
        for name, (flood, seconds) in floods.items():
            before = _rss(daemon.pid)
            cpu0, wait0 = _sched(daemon.pid)
            attack = None
            if flood:
                attack = subprocess.Popen(
                    [*as_nobody, python, str(base / "attacker.py"), *map(str, flood)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/",
                )  # fmt: skip
            started = time.monotonic()
            statuses: list[float] = []
            lags: list[int] = []
            peak = before
            last_probe = 0.0
            while time.monotonic() - started < seconds + 1:
                if attack is not None and attack.poll() is not None:
                    break
                peak = max(peak, _rss(daemon.pid))
                if time.monotonic() - last_probe > 1.0:
                    statuses.append(_status(sock, env))
                    lags.append(_counter(sock, env, "daemon.loop_lag_ms"))
                    last_probe = time.monotonic()
                time.sleep(0.01)
            if attack is not None:
                attack.kill()
                attack.wait()
            time.sleep(3)
            ended = time.monotonic()
            cpu1, wait1 = _sched(daemon.pid)
            during = [t for t in pings if started <= t <= ended]
            gaps = [b - a for a, b in itertools.pairwise(during)]
            rows.append(
                {
                    "flood": name,
                    "watchdog_lag_ms": round((max(gaps, default=0) - 0.1) * 1e3),
                    "pings": len(during),
                    "daemon_cpu_s": round(cpu1 - cpu0, 2),
                    "daemon_runq_wait_s": round(wait1 - wait0, 2),
                    "loop_lag_ms": max(lags, default=-1),
                    "status_max_s": round(max(statuses, default=-1), 2),
                    "rss_before_mib": before >> 20,
                    "rss_peak_mib": peak >> 20,
                    "rss_after_mib": _rss(daemon.pid) >> 20,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        daemon.kill()
        daemon.wait()
        notify.shutdown(socket.SHUT_RDWR)
        notify.close()
        shutil.rmtree(base)
    print(
        "\n| flood | watchdog lag ms | loop_lag_ms | status max s | daemon CPU s / run-queue "
        "wait s | RSS MiB before/peak/after |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['flood']} | {r['watchdog_lag_ms']} | {r['loop_lag_ms']} | {r['status_max_s']} "
            f"| {r['daemon_cpu_s']} / {r['daemon_runq_wait_s']} "
            f"| {r['rss_before_mib']}/{r['rss_peak_mib']}/{r['rss_after_mib']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The pause of `pubmon upgrade`: how long the daemon serves no RPC and reads no pipe.

For each N: a daemon with N `sleep 3600` publishers (control socket, log files), then
`--runs` upgrades in a row over the control socket. The pause is what the new image reports
(getCounters `daemon.last_upgrade_pause_ms`): from the moment the old image stopped reading
the pipes until the new one reads them and answers RPC again (its listeners serve), on the same
CLOCK_MONOTONIC; READY=1 follows after its first round (`ready_after_ms`). Also measured from
outside: the wall time from the `upgrade` answer until a new connection gets a getCounters
answer that counts it. Checks on the way: every publisher keeps its pid, 0 restarts. Prints
one JSON line per N, with where the pause went (medians of the steps the new image logs: the
state written and the execve, the interpreter's start and imports, the publishers rebuilt, the
adoption, the listeners serving; then READY=1 after the first round).

    .venv/bin/python bench/bench_upgrade.py [--sizes 200,1000] [--runs 5]

Targets (issue 12): pause <= 300 ms with 200 publishers, <= 1 s with 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pubmon.thrift.blocking import BlockingClient

PUBMON = str(Path(sys.executable).with_name("pubmon"))


def _config(tmp: Path, n: int) -> Path:
    path = tmp / "pubmon.toml"
    text = (
        f'[daemon]\nlog_dir = "{tmp / "logs"}"\nshutdown_timeout = 60\n'
        f'[control]\nsocket = "{tmp / "pubmon.sock"}"\n[monitor]\nlisten = ""\n'
        '[publisher.s]\ncommand = ["sleep", "3600"]\nnumprocs = %d\nstart_timeout = 0\n'
        'user = "nobody"\nlog = { max_bytes = 0 }\n' % n
    )
    path.write_text(text)
    return path


def _call(sock: str, method: str, timeout: float = 60) -> Any:
    client = BlockingClient(unix_socket=sock, timeout=timeout)
    try:
        return client.call(method)
    finally:
        client.close()


def _pids(sock: str) -> dict[str, int]:
    return {i.name: i.pid for i in _call(sock, "listPublishers") if i.state == "RUNNING"}


def measure(n: int, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pubmon-upgrade-") as d:
        tmp = Path(d)
        config = _config(tmp, n)
        sock = str(tmp / "pubmon.sock")
        log = tmp / "daemon.log"
        proc = subprocess.Popen(
            [PUBMON, "daemon", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if len(_pids(sock)) == n:
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{n} publishers not RUNNING within 120 s")
                time.sleep(0.2)
            before = _pids(sock)
            pauses, outside = [], []
            for _ in range(runs):
                r = _call(sock, "upgrade")
                t = time.monotonic()
                while True:
                    try:
                        got = _call(sock, "getCounters", timeout=30)
                        if got["daemon.upgrades"] > r.upgradesBefore:
                            break
                    except Exception:
                        pass
                    time.sleep(0.005)
                outside.append((time.monotonic() - t) * 1000)
                pauses.append(got["daemon.last_upgrade_pause_ms"])
                assert got["daemon.last_upgrade_adopted"] == n, got
            after = _pids(sock)
            restarts = sum(i.restarts for i in _call(sock, "listPublishers"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        steps = _steps(log.read_text(errors="replace"))
    return {
        "publishers": n,
        "upgrades": runs,
        "pause_ms_median": statistics.median(pauses),
        "pause_ms_max": max(pauses),
        "pause_ms": pauses,
        "answer_to_counted_ms_median": round(statistics.median(outside)),
        "pids_unchanged": before == after,
        "restarts": restarts,
        "steps_ms_median": steps,
    }


def _steps(log: str) -> dict[str, float]:
    """Median ms of each step named in the new images' "paused N ms (step ms, ...)" lines."""
    seen: dict[str, list[float]] = {}
    for m in re.finditer(r"paused \d+ ms \(([^)]*)\), READY=1 (\d+) ms later", log):
        for part in m.group(1).split(", "):
            what, _, ms = part.rpartition(" ")
            seen.setdefault(what, []).append(float(ms))
        seen.setdefault("ready_after_ms", []).append(float(m.group(2)))
    return {k: statistics.median(v) for k, v in seen.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="200,1000")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (publishers run as nobody)")
    for n in map(int, a.sizes.split(",")):
        print(json.dumps(measure(n, a.runs)), flush=True)


if __name__ == "__main__":
    main()

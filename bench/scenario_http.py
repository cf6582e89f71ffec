"""The HTTP side (issues 13 and 18), pubmon only: scrape cost, loop lag under scrapes, the
dashboard's idle cost, and whether a wrong token answers as fast as a right one.

    .venv/bin/python bench/scenario_http.py [--quick]     # or: bench/run.py --only http

- scrape_cpu: daemon CPU per /metrics scrape at N publishers (`sleep`), scrapes 1.1 s apart so
  each one also walks /proc (ProcStats refreshes at most once a second), median of the runs;
  scrape_cpu_warm: back to back (the /proc figures cached), per scrape.
- lag_10hz: 10 scrapes a second for a window; the worst `pubmon_loop_lag_seconds` the daemon
  reported, and the p99/max latency of /healthz asked 20 times a second meanwhile (a blocked
  loop shows up there at once, the daemon's own 1 s timer samples it).
- dashboard_cpu: daemon CPU while headless Chromium shows / for a window, 20 publishers,
  minus the same window without the browser; and the browser's own CPU (its process tree).
- token_timing: median time of /logs/<name> with a wrong token and with the right one,
  interleaved, 2000 of each on one keep-alive connection; the difference and the spread.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procfs
from contenders import Contender
from harness import Ctx, Recorder, say

PUBMON = Path(sys.executable).with_name("pubmon")
TOKEN = "bench-token-0123456789abcdef"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Daemon:
    def __init__(self, workdir: Path, n: int) -> None:
        self.port = _free_port()
        token = workdir / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        config = workdir / "pubmon.toml"
        config.write_text(
            f'[control]\nsocket = ""\n[monitor]\nlisten = ""\n'
            f'[http]\nlisten = "127.0.0.1:{self.port}"\ntoken_file = "{token}"\n'
            f'[publisher.s]\ncommand = ["sleep", "3600"]\nnumprocs = {n}\nstart_timeout = 0\n'
        )
        self.pid = procfs.start_daemon(
            [str(PUBMON), "daemon", "--config", str(config)], workdir / "daemon.log"
        )
        deadline = time.monotonic() + 120
        while self.get("/readyz")[0] != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon did not get ready in 120 s")
            time.sleep(0.05)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return r.status, body
        except OSError:
            return 0, b""


def _metric(body: bytes, name: str) -> float:
    # A find, not a parse: the client shares the GIL with the /healthz prober.
    at = body.index(b"\n" + name.encode() + b" ") + len(name) + 2
    return float(body[at : body.index(b"\n", at)])


def scrape_cost(ctx: Ctx, rec: Recorder, n: int) -> None:
    d = Daemon(ctx.workdir(f"http-scrape{n}"), n)
    try:
        d.get("/metrics")  # the first render fills the per-publisher cache
        time.sleep(1.1)
        costs = []
        for _ in range(3 if ctx.sizes.idle_window < 10 else 8):
            cpu0 = procfs.cpu_seconds(d.pid)
            status, body = d.get("/metrics")
            costs.append(1000 * (procfs.cpu_seconds(d.pid) - cpu0))
            assert status == 200 and b"pubmon_publisher_up" in body
            time.sleep(1.1)
        say(f"  scrape of {n}: {len(body) / 1e6:.1f} MB, cpu per scrape {costs} ms")
        rec.add("http_scrape_cpu", "pubmon", statistics.median(costs), "ms", n)
        cpu0, k = procfs.cpu_seconds(d.pid), 20
        for _ in range(k):
            d.get("/metrics")
        rec.add("http_scrape_cpu_warm", "pubmon", 1000 * (procfs.cpu_seconds(d.pid) - cpu0) / k,
                "ms", n)  # fmt: skip
        _lag_under_scrapes(ctx, rec, d, n)
    finally:
        procfs.cleanup()


def _lag_under_scrapes(ctx: Ctx, rec: Recorder, d: Daemon, n: int) -> None:
    window = 5.0 if ctx.sizes.idle_window < 10 else 15.0
    stop = time.monotonic() + window
    lags: list[float] = []
    latencies: list[float] = []

    def scrape() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        tick = time.monotonic()
        while tick < stop:
            conn.request("GET", "/metrics")
            body = conn.getresponse().read()
            lags.append(_metric(body, "pubmon_loop_lag_seconds"))
            tick += 0.1
            time.sleep(max(0.0, tick - time.monotonic()))
        conn.close()

    def health() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        tick = time.monotonic()
        while tick < stop:
            t0 = time.monotonic()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            latencies.append(1000 * (time.monotonic() - t0))
            tick += 0.05
            time.sleep(max(0.0, tick - time.monotonic()))
        conn.close()

    threads = [threading.Thread(target=scrape), threading.Thread(target=health)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    say(f"  10 scrapes/s at {n}: {len(lags)} scrapes, loop lag max {max(lags) * 1000:.0f} ms, "
        f"/healthz p99 {p99:.1f} ms max {latencies[-1]:.1f} ms")  # fmt: skip
    rec.add("http_lag_10hz", "pubmon", 1000 * max(lags), "ms", n)
    rec.add("http_healthz_p99_10hz", "pubmon", p99, "ms", n)
    rec.add("http_healthz_max_10hz", "pubmon", latencies[-1], "ms", n)


def dashboard_cost(ctx: Ctx, rec: Recorder) -> None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        rec.na("http_dashboard_cpu", "pubmon", "needs chromium and chromium-driver")
        return
    from selenium import webdriver

    n = 20
    window = ctx.sizes.idle_window * 2
    d = Daemon(ctx.workdir("http-dashboard"), n)
    try:
        time.sleep(1.0)
        cpu0 = procfs.cpu_seconds(d.pid)
        time.sleep(window)
        base = 100 * (procfs.cpu_seconds(d.pid) - cpu0) / window
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--user-data-dir={ctx.workdir('chromium')}"):  # fmt: skip
            options.add_argument(arg)
        service = webdriver.ChromeService(executable_path=driver, log_output=os.devnull)
        browser = webdriver.Chrome(options=options, service=service)
        try:
            browser.get(f"http://127.0.0.1:{d.port}/")
            time.sleep(2.0)
            kids = procfs.descendants(service.process.pid) | {service.process.pid}
            b0 = sum(procfs.cpu_seconds(p) for p in kids)
            cpu0 = procfs.cpu_seconds(d.pid)
            time.sleep(window)
            watched = 100 * (procfs.cpu_seconds(d.pid) - cpu0) / window
            b1 = sum(procfs.cpu_seconds(p) for p in kids)
            rows = browser.execute_script("return document.querySelectorAll('tbody tr').length")
        finally:
            browser.quit()
        say(f"  dashboard, {n} publishers ({rows} rows): daemon {base:.2f}% idle, "
            f"{watched:.2f}% watched; browser {100 * (b1 - b0) / window:.2f}%")  # fmt: skip
        rec.add("http_dashboard_cpu", "pubmon", watched - base, "% of one core", n)
        rec.add("http_dashboard_browser_cpu", "pubmon", 100 * (b1 - b0) / window,
                "% of one core", n)  # fmt: skip
    finally:
        procfs.cleanup()


def token_timing(ctx: Ctx, rec: Recorder) -> None:
    d = Daemon(ctx.workdir("http-token"), 1)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        wrong = "x" * len(TOKEN)
        near = TOKEN[:-1] + "X"  # right but for the last character
        times: dict[str, list[float]] = {"right": [], "wrong": [], "near": []}
        k = 600 if ctx.sizes.idle_window < 10 else 2000
        for i in range(3 * k):
            which = ("right", "wrong", "near")[i % 3]
            token = {"right": TOKEN, "wrong": wrong, "near": near}[which]
            t0 = time.perf_counter()
            conn.request("GET", "/healthz?", headers={"Authorization": f"Bearer {token}"})
            conn.getresponse().read()
            times[which].append(1e6 * (time.perf_counter() - t0))
        conn.close()
        med = {w: statistics.median(v) for w, v in times.items()}
        spread = statistics.quantiles(times["right"], n=4)
        iqr = spread[2] - spread[0]
        say(f"  token check: right {med['right']:.0f} µs, wrong {med['wrong']:.0f} µs, "
            f"near {med['near']:.0f} µs (IQR of right {iqr:.0f} µs)")  # fmt: skip
        rec.add("http_token_right", "pubmon", med["right"], "µs")
        rec.add("http_token_wrong_minus_right", "pubmon", med["wrong"] - med["right"], "µs")
        rec.add("http_token_near_minus_right", "pubmon", med["near"] - med["right"], "µs")
        rec.add("http_token_iqr", "pubmon", iqr, "µs")
    finally:
        procfs.cleanup()


def http_side(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    """Runner for bench/run.py: pubmon only (supervisord has no such listener)."""
    if cls.name != "pubmon":
        rec.na("http_scrape_cpu", cls.name, "no HTTP metrics listener", 1000)
        return
    scrape_cost(ctx, rec, 1000)
    dashboard_cost(ctx, rec)
    token_timing(ctx, rec)


def main() -> int:
    from harness import Sizes

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    procfs.become_subreaper()
    sizes = Sizes.quick() if args.quick else Sizes.full()
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="pubmon-bench-http-") as root:
        ctx = Ctx(sizes, 1, frozenset({"http"}), Path(root))
        try:
            scrape_cost(ctx, rec, 1000)
            dashboard_cost(ctx, rec)
            token_timing(ctx, rec)
        finally:
            procfs.cleanup()
    rec.flush()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "http.json").write_text(json.dumps(rec.results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

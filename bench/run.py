"""pubmon side by side with supervisord and the floor: `make bench` / `make bench-quick`.

    .venv/bin/python bench/run.py [--quick] [--only SCENARIO[,...]]
                                  [--contenders pubmon,supervisord,floor] [--runs 3]

Installs supervisor into bench/.venv-supervisor when missing, then runs every scenario on each
contender in turn (never two at once: the machine has 2 cores). Prints one JSON line per result
as it is measured, then a markdown summary table with pubmon's ratios and targets. Everything
is also written to bench/results/latest.json. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import procfs
import scenario_faults
import scenario_fleet
import scenario_http
import scenario_logs
from contenders import CONTENDERS, Contender
from contenders import pubmon as pubmon_contender
from contenders import supervisord as supervisord_contender
from contenders.pubmon import thrift_available
from figures import table
from harness import SCENARIOS, Ctx, Recorder, Sizes, say

Runner = Callable[[Ctx, type[Contender], Recorder], None]

# Each runner covers some scenarios; it runs when any of them is selected.
RUNNERS: list[tuple[tuple[str, ...], Runner]] = [
    (("spawn", "idle", "rpc", "cli", "stop"), scenario_fleet.fleet),
    (("idle",), scenario_fleet.idle_fb303),
    (("restart",), scenario_faults.restart),
    (("logs",), scenario_logs.logs),
    (("orphans",), scenario_faults.orphans),
    (("http",), scenario_http.http_side),
]
RESULTS = Path(__file__).resolve().parent / "results"
NOISY = 10.0  # % of one core used by other processes during a runner: warn


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what}: {', '.join(unknown) or '(none)'}; use {known}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller N, shorter windows, 1 run")
    p.add_argument("--only", default=",".join(SCENARIOS), help="scenarios: %(default)s")
    p.add_argument(
        "--contenders",
        default="pubmon,supervisord,floor,floor+wrapper,floor+arm",
        help="%(default)s",
    )
    p.add_argument("--runs", type=int, help="starts per figure, median reported (default 3)")
    p.add_argument(
        "--src",
        type=Path,
        help="run pubmon's daemon from this source tree (PYTHONPATH), for A/B runs against a\n"
        "base: git archive main src idl | tar -x -C /tmp/base; --src /tmp/base/src",
    )
    return p.parse_args(argv)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: nothing is left running


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = _names(args.only, SCENARIOS, "scenario")
    contenders = _names(args.contenders, tuple(CONTENDERS), "contender")
    sizes = Sizes.quick() if args.quick else Sizes.full()
    runs = args.runs or (1 if args.quick else 3)
    if args.src is not None:
        pubmon_contender.Pubmon.src = args.src.resolve()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with it ignored
    procfs.become_subreaper()
    meta: dict[str, object] = {
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
        "python": platform.python_version(),
        "pubmon_status_via": "thrift" if thrift_available() else "/proc",
        "runs": runs,
        "pubmon_src": str(args.src) if args.src else "installed",
        "sizes": dataclasses.asdict(sizes),
    }
    if "supervisord" in contenders:
        supervisord_contender.ensure_installed()
        meta["supervisord"] = supervisord_contender.version()
    busy = procfs.machine_busy()
    meta["cpu_busy_before_pct"] = round(busy, 1)
    if busy > 10:
        say(f"bench: warning: the machine is already {busy:.0f}% busy; numbers will be noisy")
    say(f"bench: {', '.join(scenarios)} on {', '.join(contenders)}; {runs} run(s)")
    rec = Recorder()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pubmon-bench-") as root:
        ctx = Ctx(sizes, runs, frozenset(scenarios), Path(root))
        try:
            for covers, runner in RUNNERS:
                if ctx.wants(*covers):
                    _run_all(ctx, runner, contenders, rec)
        finally:
            procfs.cleanup()
    meta["seconds"] = round(time.monotonic() - started, 1)
    text, notes = table(rec, sizes, contenders)
    print()
    print(text)
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    noise = [r for r in rec.results if str(r["figure"]).endswith("_foreign_cpu")]
    if noise:
        cells = [f"{str(r['figure'])[:-12]} {r['contender']} {r['value']:.0f}" for r in noise]
        print("CPU of other processes meanwhile, % of one core: " + ", ".join(cells))
    for r in rec.results:
        if str(r["figure"]).endswith("_error"):
            print(f"error: {r['contender']} {r['figure']}: {r.get('note')}")
    RESULTS.mkdir(exist_ok=True)
    summary = {**meta, "table": text, "notes": notes, "results": rec.results}
    (RESULTS / "latest.json").write_text(json.dumps(summary, indent=1) + "\n")
    say(f"bench: done in {meta['seconds']} s; summary in {RESULTS / 'latest.json'}")
    return 0


def _run_all(ctx: Ctx, runner: Runner, contenders: list[str], rec: Recorder) -> None:
    for name in contenders:
        say(f"{runner.__name__}: {name}")
        foreign = procfs.ForeignCpu()
        try:
            runner(ctx, CONTENDERS[name], rec)
        except Exception as exc:
            traceback.print_exc()
            rec.na(f"{runner.__name__}_error", name, f"{type(exc).__name__}: {exc}")
        finally:
            procfs.cleanup()
        say(f"  ({foreign.seconds():.0f} s)")
        noise = foreign.percent()
        if noise is not None:
            rec.add(f"{runner.__name__}_foreign_cpu", name, noise, "% of one core used by others")
            if noise > NOISY:
                say(f"  warning: other processes used {noise:.0f}% of a core meanwhile")
        rec.flush()


if __name__ == "__main__":
    sys.exit(main())

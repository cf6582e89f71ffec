"""The summary: one row per figure with each contender's median, pubmon's ratios and target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness import Recorder, Sizes

Values = dict[str, float | None]
Check = Callable[[Values], bool | None]


def at_most(limit: float) -> Check:
    return lambda v: None if v["pubmon"] is None else v["pubmon"] <= limit


def at_most_times(other: str, factor: float) -> Check:
    def check(v: Values) -> bool | None:
        p, o = v["pubmon"], v.get(other)
        return None if p is None or o is None else p <= factor * o

    return check


def at_least_as_much(other: str) -> Check:
    def check(v: Values) -> bool | None:
        p, o = v["pubmon"], v.get(other)
        return None if p is None or o is None else p >= o

    return check


@dataclass(frozen=True, slots=True)
class Figure:
    key: str
    n: int | None
    label: str
    unit: str
    target: str = "-"
    check: Check | None = None


def figures(sizes: Sizes) -> list[Figure]:
    small, big = sizes.fleet[0], sizes.fleet[-1]
    fb = sizes.fb303_fleet
    out = [
        Figure("spawn", small, f"spawn {small} -> all RUNNING", "s", "<= 1.2 x floor+wrapper",
               at_most_times("floor+wrapper", 1.2)),
        Figure("spawn", 1000, "spawn 1000 -> all RUNNING", "s", "<= 2.5 s", at_most(2.5)),
        Figure("idle_cpu", small, f"idle CPU, {small} children", "%", "<= 0.05 %",
               at_most(0.05)),
        Figure("idle_cpu", 1000, "idle CPU, 1000 children", "%", "<= 0.1 %", at_most(0.1)),
        Figure("idle_rss", small, f"idle RSS, {small} children", "MiB", "<= 35 MiB",
               at_most(35)),
        Figure("idle_rss", 1000, "idle RSS, 1000 children", "MiB", "<= 64 MiB", at_most(64)),
        Figure("idle_fb303_cpu", fb, f"idle CPU, {fb} fb303-probed demo publishers", "%"),
        Figure("idle_fb303_rss", fb, f"idle RSS, {fb} fb303-probed demo publishers", "MiB"),
        Figure("status", small, f"status of {small} via API, one call", "ms", "<= 3 ms",
               at_most(3)),
        Figure("status", 1000, "status of 1000 via API, one call", "ms", "<= 10 ms",
               at_most(10)),
        Figure("calls_1conn", big, f"getStatus calls/s, 1 connection (n={big})", "/s"),
        Figure("calls_8conn", big, f"getStatus calls/s, 8 connections (n={big})", "/s"),
        Figure("cpu_per_call_1conn", big, "server CPU per call, 1 connection", "µs"),
        Figure("cpu_per_call_8conn", big, "server CPU per call, 8 connections", "µs"),
        Figure("cli", small, f"status via CLI, start to exit (n={small})", "ms", "<= 100 ms",
               at_most(100)),
        Figure("cli", 1000, "status via CLI, start to exit (n=1000)", "ms"),
        Figure("restart_p50", None, "restart after SIGKILL, p50, nobody polling", "ms",
               "<= 10 ms", at_most(10)),
        Figure("restart_p95", None, "restart after SIGKILL, p95", "ms"),
        Figure("logs_1_e2e", None, "logs, one child, end to end", "MB/s", ">= supervisord",
               at_least_as_much("supervisord")),
        Figure("logs_1_write", None, "logs, one child, its write rate", "MB/s"),
        Figure("logs_1_lost", None, "logs, one child, lines lost", "lines", "0", at_most(0)),
        Figure("logs_20_e2e", None, "logs, 20 children at once, end to end", "MB/s",
               ">= supervisord", at_least_as_much("supervisord")),
        Figure("logs_20_write", None, "logs, 20 children, their write rate", "MB/s"),
        Figure("logs_20_lost", None, "logs, 20 children, lines lost", "lines", "0", at_most(0)),
        Figure("logs_kb_1_e2e", None, "logs, KB lines, one child, end to end", "MB/s",
               ">= supervisord", at_least_as_much("supervisord")),
        Figure("logs_kb_1_write", None, "logs, KB lines, one child, its write rate", "MB/s"),
        Figure("logs_kb_1_lost", None, "logs, KB lines, one child, lines lost", "lines", "0",
               at_most(0)),
        Figure("logs_kb_20_e2e", None, "logs, KB lines, 20 children at once, end to end",
               "MB/s", ">= supervisord", at_least_as_much("supervisord")),
        Figure("logs_kb_20_write", None, "logs, KB lines, 20 children, their write rate",
               "MB/s"),
        Figure("logs_kb_20_lost", None, "logs, KB lines, 20 children, lines lost", "lines", "0",
               at_most(0)),
        Figure("stop", small, f"stop: SIGTERM -> daemon + {small} children gone", "s",
               "<= 0.1 s", at_most(0.1)),
        Figure("stop", 1000, "stop: SIGTERM -> daemon + 1000 children gone", "s", "<= 0.5 s",
               at_most(0.5)),
        Figure("orphans", None, "children alive 2 s after SIGKILL of the supervisor", "of 5",
               "0", at_most(0)),
        Figure("http_scrape_cpu", 1000, "/metrics scrape of 1000, daemon CPU (/proc walk)", "ms",
               "<= 50 ms", at_most(50)),
        Figure("http_scrape_cpu_warm", 1000, "/metrics scrape of 1000, back to back", "ms"),
        Figure("http_lag_10hz", 1000, "loop lag, 10 scrapes/s of 1000 (daemon's own)", "ms",
               "<= 10 ms", at_most(10)),
        Figure("http_healthz_p99_10hz", 1000, "/healthz p99 meanwhile", "ms"),
        Figure("http_dashboard_cpu", 20, "dashboard open in a browser, daemon CPU", "%",
               "< 1 %", at_most(1)),
        Figure("http_token_wrong_minus_right", None, "wrong token - right token, median", "µs",
               "within noise"),
        Figure("http_token_iqr", None, "  noise: IQR of the right token's time", "µs"),
    ]  # fmt: skip
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if float(v).is_integer() and abs(v) < 100:
        return str(int(v))
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


_RATIOS = ("floor", "floor+wrapper", "supervisord")


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def table(rec: Recorder, sizes: Sizes, contenders: list[str]) -> tuple[str, list[str]]:
    """A markdown table of every figure that has a value or a note, and the footnotes."""
    head = ["figure", "unit", *contenders]
    head += [f"pubmon/{c}" for c in _RATIOS if c in contenders]
    head += ["pubmon target", "met"]
    rows, notes, seen = [head], [], set()
    for f in figures(sizes):
        if (f.key, f.n) in seen:
            continue
        seen.add((f.key, f.n))
        values: Values = {c: rec.value(f.key, f.n, c) for c in contenders}
        if all(v is None and rec.note(f.key, f.n, c) is None for c, v in values.items()):
            continue
        cells = [f.label, f.unit]
        for c in contenders:
            cell = _fmt(values[c])
            if values[c] is None and (why := rec.note(f.key, f.n, c)):
                notes.append(f"{f.label}, {c}: {why}")
                cell += f" [{len(notes)}]"
            cells.append(cell)
        cells += [_ratio(values.get("pubmon"), values[c]) for c in _RATIOS if c in contenders]
        verdict = f.check(values) if f.check and "pubmon" in values else None
        cells += [f.target, "-" if verdict is None else "yes" if verdict else "NO"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines), notes

"""/metrics: the daemon's in-memory state as Prometheus text or OpenMetrics.

Rendering awaits nothing and does almost no I/O: it reads counters the daemon keeps anyway, the
probe histograms (`_stats.Histogram`), the /proc figures `ProcStats` cached before the scrape,
and for a publisher in a cgroup its `usage()` (a few preads of held files, at most once a
second per publisher: with 1000 that is the same cost getCounters pays).

Why not prometheus_client's Collector and `generate_latest`: at 1000 publishers the exposition
is ~42,000 samples, and building the metric families took 57 ms and encoding them 160 ms of
CPU here (0.1 s of a blocked loop per scrape, target 50 ms). The writer below renders each
publisher's lines with plain string formatting and keeps them until that publisher's values
change, so an idle fleet costs a dictionary lookup per publisher and family group.
prometheus_client still picks the format from the Accept header (`choose_encoder`), and the
tests check this output with its parsers for both formats (and with a real Prometheus).

Names follow the Prometheus conventions: base units (seconds, bytes), `_total` on counters, no
pid, exit status or start time in labels (each would make a new series per restart). Labels
are small closed sets: `publisher` (the instance name) everywhere, `program` only on
`pubmon_publisher_up` (join on it), `state`/`health`/`reason` from fixed lists.

Per publisher:
- pubmon_publisher_up{publisher,program}  1 while RUNNING
- pubmon_publisher_state{publisher,state}  a state set: 1 for the current state, 0 for others
- pubmon_publisher_health{publisher,health}  likewise, UNKNOWN/HEALTHY/DEGRADED/UNHEALTHY
- pubmon_publisher_restarts_total, pubmon_publisher_exits_total{reason} (exit, signal,
  unhealthy, operator, memory: a memory_restart or an OOM kill),
  pubmon_publisher_probe_failures_total
- pubmon_publisher_probe_duration_seconds  histogram of probe round trips
- pubmon_publisher_start_time_seconds  unix time the current process started (absent if none)
- pubmon_publisher_log_lines_total, _log_bytes_total, _log_dropped_lines_total,
  _log_dropped_bytes_total
- pubmon_publisher_cpu_seconds_total, _resident_memory_bytes, _open_fds, _processes: while it
  runs; from its cgroup when it has one (escapees included; memory.current, or the RSS of its
  processes without the memory controller), else its process tree (see core/procstats);
  open fds always from the tree
- pubmon_publisher_memory_high_events_total, _memory_max_events_total, _oom_kills_total,
  _pids_max_events_total, _cpu_throttled_seconds_total: its cgroup's limit hits
  (memory.events, pids.events, cpu.stat), where the controller is enabled; they count over
  the cgroup's life, which spans restarts
- pubmon_child_counter{publisher,counter}  its own fb303 getCounters() (probe.export_counters)
Daemon: pubmon_reloads_total, pubmon_reload_failures_total, pubmon_loop_lag_seconds,
pubmon_ready, pubmon_rpc_{calls,errors,connections,rejected_frames}_total,
pubmon_access_denied_total{listener,level}, pubmon_build_info{version,python}, and
process_{cpu_seconds_total,resident_memory_bytes,virtual_memory_bytes,open_fds,max_fds,
start_time_seconds} for pubmon itself (the names prometheus_client's process collector uses).
"""

from __future__ import annotations

__all__ = ["DaemonValues", "MetricsSource", "MetricsWriter", "negotiate"]

import asyncio
import math
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from prometheus_client.exposition import choose_encoder

from pubmon._version import __version__
from pubmon.core.cgroup import LIMIT_EVENTS
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.procstats import ProcFigures, ProcStats
from pubmon.core.stats import EXIT_REASONS

if TYPE_CHECKING:
    from pubmon.core.publisher import Publisher

Format = Literal["text", "openmetrics"]
_SLICE = 400  # work units between two yields: 1 per publisher, 4 more per re-rendered group
_STATES = tuple(str(s) for s in PublisherState)
_HEALTHS = tuple(str(h) for h in Health)


class MetricsSource(Protocol):
    """What the writer reads (http.py adapts the Daemon to it)."""

    def publishers(self) -> Mapping[str, Publisher]: ...

    def daemon_values(self) -> DaemonValues: ...

    def denied(self) -> Mapping[tuple[str, str], int]: ...

    def child_counters(self) -> Mapping[str, Mapping[str, float]]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonValues:
    reloads: int
    reload_failures: int
    loop_lag_ms: int
    ready: bool
    rpc: Mapping[str, int]  # calls, errors, connections, rejected_frames


def negotiate(accept: str) -> tuple[Format, str]:
    """The format and Content-Type for an Accept header, as prometheus_client decides them."""
    _, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        return "openmetrics", content_type
    return "text", content_type


def _figures(pub: Publisher, fig: ProcFigures | None) -> tuple[float, int, int | None, int] | None:
    """(CPU seconds, memory bytes, open fds, processes) of a running publisher:
    `Publisher.figures()` (its cgroup's when it has one, escapees included, read at most once
    a second; else the walk's, `ProcStats`), as getPublisher and the dashboard give them; open
    fds are the walk's, None without it."""
    f = pub.figures(fig)
    if f is None:
        return None
    return (f.cpu_seconds, f.rss_bytes, None if fig is None else f.open_fds, f.processes)


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def _go_float(value: float) -> str:
    """A bucket bound as Prometheus clients write it ("0.005", "1.0", "+Inf"): Prometheus
    matches buckets across scrapes by the text of `le`. (repr agrees with Go's formatting for
    bounds below 1e6, which probe times are.)"""
    return "+Inf" if math.isinf(value) else repr(float(value))


def _esc(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# (name, type, help) in output order; the per-publisher groups render them.
_GROUP_STATE = (
    ("pubmon_publisher_up", "gauge", "1 while the publisher is RUNNING"),
    ("pubmon_publisher_state", "gauge", "Lifecycle state (a state set)"),
    ("pubmon_publisher_health", "gauge", "Probe verdict (a state set)"),
    ("pubmon_publisher_restarts", "counter", "Automatic restarts by the daemon"),
    (
        "pubmon_publisher_exits",
        "counter",
        "Ends of a run by reason: exit signal unhealthy operator memory (memory_restart, OOM kill)",
    ),
    ("pubmon_publisher_probe_failures", "counter", "Failed health probes"),
    ("pubmon_publisher_start_time_seconds", "gauge", "Unix time the current process started"),
)
_GROUP_PROBE = (
    ("pubmon_publisher_probe_duration_seconds", "histogram", "Health probe round trips"),
)
_GROUP_LOG = (
    ("pubmon_publisher_log_lines", "counter", "Output lines read"),
    ("pubmon_publisher_log_bytes", "counter", "Output bytes read"),
    ("pubmon_publisher_log_dropped_lines", "counter", "Output lines the log file could not take"),
    ("pubmon_publisher_log_dropped_bytes", "counter", "Output bytes the log file could not take"),
)
_GROUP_PROC = (
    (
        "pubmon_publisher_cpu_seconds",
        "counter",
        "CPU time of its cgroup or tree (reset at restart)",
    ),
    ("pubmon_publisher_resident_memory_bytes", "gauge", "Memory of its cgroup or process tree"),
    ("pubmon_publisher_open_fds", "gauge", "Open file descriptors of its process tree"),
    ("pubmon_publisher_processes", "gauge", "Processes in its cgroup or tree (with the leader)"),
)
# Limit hits of a publisher's cgroup, where its controller is enabled (Cgroup.limit_events):
# (family, type, help, limit_events key, scale).
_LIMIT_FAMILIES = (
    ("pubmon_publisher_memory_high_events", "counter",
     "Times its cgroup went over memory.high (limits.memory_high or the memory_restart "
     "tripwire)", "memory.events:high", 1),
    ("pubmon_publisher_memory_max_events", "counter",
     "Times its cgroup reached limits.memory_max", "memory.events:max", 1),
    ("pubmon_publisher_oom_kills", "counter",
     "Processes of its cgroup the OOM killer ended", "memory.events:oom_kill", 1),
    ("pubmon_publisher_pids_max_events", "counter",
     "Forks its cgroup refused at limits.pids_max", "pids.events:max", 1),
    ("pubmon_publisher_cpu_throttled_seconds", "counter",
     "Time its cgroup was throttled by limits.cpu_max", "cpu.stat:throttled_usec", 1e-6),
)  # fmt: skip
_GROUP_LIMITS = tuple((name, kind, help_) for name, kind, help_, _, _ in _LIMIT_FAMILIES)
_LIMIT_CONTROLLERS = frozenset(c for c, _, _ in LIMIT_EVENTS)
LIMITS_TTL = 1.0  # limit hits are read at most once a second per publisher
_GROUPS = (_GROUP_STATE, _GROUP_PROBE, _GROUP_LOG, _GROUP_PROC, _GROUP_LIMITS)


def _header(out: list[str], fmt: Format, name: str, kind: str, help_: str) -> None:
    if fmt == "openmetrics":
        out.append(f"# TYPE {name} {kind}\n# HELP {name} {help_}\n")
    else:
        shown = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {shown} {help_}\n# TYPE {shown} {kind}\n")


class _Cached:
    """One publisher's rendered lines per group, with the values they were rendered from."""

    __slots__ = ("chunks", "keys")

    def __init__(self) -> None:
        self.keys: list[object] = [None] * len(_GROUPS)
        self.chunks: list[tuple[str, ...]] = [()] * len(_GROUPS)


class MetricsWriter:
    """Renders /metrics. One per HTTP server; keeps per-publisher lines between scrapes."""

    def __init__(self, source: MetricsSource, procstats: ProcStats) -> None:
        self._src = source
        self._proc = procstats
        self._cache: dict[str, _Cached] = {}
        self._limits: dict[str, tuple[float, dict[str, int]]] = {}  # name -> (read at, hits)
        self._les: dict[tuple[float, ...], tuple[str, ...]] = {}

    async def render(self, fmt: Format = "text") -> bytes:
        """The exposition. Yields to the loop every `_SLICE` publishers and after each family,
        so that scrapes of 1000 publishers never block the loop for more than ~2 ms."""
        pubs = self._src.publishers()
        figures = self._proc.figures
        cache, fresh = self._cache, {}
        rows: list[_Cached] = []
        work = 0
        for name, pub in pubs.items():
            c = cache.get(name) or _Cached()
            work += 1 + 4 * self._update(c, name, pub, figures.get(name))
            fresh[name] = c
            rows.append(c)
            if work >= _SLICE:
                work = 0
                await asyncio.sleep(0)
        self._cache = fresh
        for gone in self._limits.keys() - fresh.keys():
            del self._limits[gone]
        parts: list[bytes] = []
        for g, group in enumerate(_GROUPS):
            for f, (name, kind, help_) in enumerate(group):
                out: list[str] = []
                _header(out, fmt, name, kind, help_)
                out.extend(row.chunks[g][f] for row in rows)
                parts.append("".join(out).encode())
                await asyncio.sleep(0)
        out = []
        self._children(out, fmt)
        self._daemon(out, fmt)
        if fmt == "openmetrics":
            out.append("# EOF\n")
        parts.append("".join(out).encode())
        return b"".join(parts)

    def _update(self, c: _Cached, name: str, pub: Publisher, fig: ProcFigures | None) -> int:
        """Re-render the groups of `c` whose values changed; returns how many did."""
        redone = 0
        pid = pub.pid
        state, health = str(pub.state), str(pub.health)
        exits = tuple(pub.exit_reasons.get(r, 0) for r in EXIT_REASONS)
        started = pub.started_wall if pid is not None else None
        key0 = (pub.spec.program, state, health, pub.restarts, exits, pub.probe_failures, started)
        if c.keys[0] != key0:
            redone += 1
            c.keys[0] = key0
            lab = f'{{publisher="{name}"}}'
            c.chunks[0] = (
                f'pubmon_publisher_up{{publisher="{name}",program="{pub.spec.program}"}} '
                f"{int(state == 'RUNNING')}\n",
                "".join(
                    f'pubmon_publisher_state{{publisher="{name}",state="{s}"}} {int(s == state)}\n'
                    for s in _STATES
                ),
                "".join(
                    f'pubmon_publisher_health{{publisher="{name}",health="{h}"}} '
                    f"{int(h == health)}\n"
                    for h in _HEALTHS
                ),
                f"pubmon_publisher_restarts_total{lab} {pub.restarts}\n",
                "".join(
                    f'pubmon_publisher_exits_total{{publisher="{name}",reason="{r}"}} {n}\n'
                    for r, n in zip(EXIT_REASONS, exits, strict=True)
                ),
                f"pubmon_publisher_probe_failures_total{lab} {pub.probe_failures}\n",
                ""
                if started is None
                else f"pubmon_publisher_start_time_seconds{lab} {_num(started)}\n",
            )
        hist = pub.probe_seconds
        key1 = (hist.count, hist.sum)
        if c.keys[1] != key1:
            redone += 1
            c.keys[1] = key1
            les = self._le(hist.bounds)
            m = "pubmon_publisher_probe_duration_seconds"
            buckets = "".join(
                f'{m}_bucket{{publisher="{name}",le="{le}"}} {n}\n'
                for le, (_, n) in zip(les, hist.cumulative(), strict=True)
            )
            c.chunks[1] = (
                f'{buckets}{m}_count{{publisher="{name}"}} {hist.count}\n'
                f'{m}_sum{{publisher="{name}"}} {_num(hist.sum)}\n',
            )
        out = pub.output
        key2 = (out.lines, out.bytes, out.dropped, out.dropped_bytes)
        if c.keys[2] != key2:
            redone += 1
            c.keys[2] = key2
            lab = f'{{publisher="{name}"}}'
            c.chunks[2] = (
                f"pubmon_publisher_log_lines_total{lab} {out.lines}\n",
                f"pubmon_publisher_log_bytes_total{lab} {out.bytes}\n",
                f"pubmon_publisher_log_dropped_lines_total{lab} {out.dropped}\n",
                f"pubmon_publisher_log_dropped_bytes_total{lab} {out.dropped_bytes}\n",
            )
        key3 = _figures(pub, fig) if pid is not None else None
        if c.keys[3] != key3 or not c.chunks[3]:
            redone += 1
            c.keys[3] = key3
            if key3 is None:
                c.chunks[3] = ("", "", "", "")
            else:
                lab = f'{{publisher="{name}"}}'
                c.chunks[3] = (
                    f"pubmon_publisher_cpu_seconds_total{lab} {_num(key3[0])}\n",
                    f"pubmon_publisher_resident_memory_bytes{lab} {key3[1]}\n",
                    "" if key3[2] is None else f"pubmon_publisher_open_fds{lab} {key3[2]}\n",
                    f"pubmon_publisher_processes{lab} {key3[3]}\n",
                )
        key4 = self._limit_events(name, pub)
        if c.keys[4] != key4 or not c.chunks[4]:
            redone += 1
            c.keys[4] = key4
            lab = f'{{publisher="{name}"}}'
            c.chunks[4] = tuple(
                f"{family}_total{lab} {_num(key4[key] * scale)}\n" if key in key4 else ""
                for family, _, _, key, scale in _LIMIT_FAMILIES
            )
        return redone

    def _limit_events(self, name: str, pub: Publisher) -> dict[str, int]:
        """Its cgroup's limit hits ({} without a cgroup or its controllers), read at most
        once per LIMITS_TTL: three small files a publisher, and only where the kernel has
        the controllers (not this machine's cgroup2)."""
        cg = pub.cgroup
        if cg is None or not cg.controllers & _LIMIT_CONTROLLERS:
            return {}
        now = time.monotonic()
        hit = self._limits.get(name)
        if hit is None or now - hit[0] >= LIMITS_TTL:
            hit = self._limits[name] = (now, cg.limit_events())
        return hit[1]

    def _le(self, bounds: tuple[float, ...]) -> tuple[str, ...]:
        les = self._les.get(bounds)
        if les is None:
            # Prometheus matches buckets by the text of `le`: use Go's float formatting.
            les = self._les[bounds] = tuple(_go_float(b) for b in (*bounds, math.inf))
        return les

    def _children(self, out: list[str], fmt: Format) -> None:
        children = self._src.child_counters()
        if not children:
            return
        _header(out, fmt, "pubmon_child_counter", "gauge", "A publisher's own fb303 counters")
        for name, counters in children.items():
            for key, value in counters.items():
                out.append(
                    f'pubmon_child_counter{{publisher="{name}",counter="{_esc(key)}"}} '
                    f"{_num(value)}\n"
                )

    def _daemon(self, out: list[str], fmt: Format) -> None:
        d = self._src.daemon_values()

        def one(name: str, kind: str, help_: str, value: float) -> None:
            _header(out, fmt, name, kind, help_)
            suffix = "_total" if kind == "counter" else ""
            out.append(f"{name}{suffix} {_num(value)}\n")

        one("pubmon_reloads", "counter", "Config reloads applied", d.reloads)
        one("pubmon_reload_failures", "counter", "Config reloads refused", d.reload_failures)
        one(
            "pubmon_loop_lag_seconds",
            "gauge",
            "How late the event loop ran its 1 s timer, last measured",
            d.loop_lag_ms / 1000,
        )
        one("pubmon_ready", "gauge", "1 once the first autostart round settled", int(d.ready))
        for what in ("calls", "errors", "connections", "rejected_frames"):
            one(f"pubmon_rpc_{what}", "counter", f"Thrift listeners: {what}", d.rpc.get(what, 0))
        _header(out, fmt, "pubmon_access_denied", "counter", "Requests refused, by access level")
        for (listener, level), n in sorted(self._src.denied().items()):
            out.append(f'pubmon_access_denied_total{{listener="{listener}",level="{level}"}} {n}\n')
        _header(out, fmt, "pubmon_build_info", "gauge", "pubmon's version")
        out.append(
            f'pubmon_build_info{{version="{_esc(__version__)}",'
            f'python="{platform.python_version()}"}} 1\n'
        )
        own = self._proc.own
        if own is not None:
            one("process_cpu_seconds", "counter", "CPU time of pubmon", own.cpu_seconds)
            one("process_resident_memory_bytes", "gauge", "pubmon's resident memory", own.rss_bytes)
            one("process_virtual_memory_bytes", "gauge", "pubmon's virtual memory", own.vsize_bytes)
            one("process_open_fds", "gauge", "pubmon's open file descriptors", own.open_fds)
            one("process_max_fds", "gauge", "pubmon's file descriptor limit", own.max_fds)
            one("process_start_time_seconds", "gauge", "pubmon's start (unix time)", own.start_time)

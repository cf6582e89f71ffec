"""The config model: frozen dataclasses, the contract the rest of pubmon reads.

`pubmon.config.load` fills them in from a TOML file and reports every problem of a file at once
as a ConfigError(file, [ConfigProblem(key, why), ...]); `pubmon.config.diff` compares two.
"""

from __future__ import annotations

__all__ = [
    "Backoff",
    "Config",
    "ControlConfig",
    "CrashLoop",
    "DaemonConfig",
    "HttpConfig",
    "Limits",
    "LogSpec",
    "MonitorConfig",
    "ProbeSpec",
    "PublisherSpec",
]

import signal
from dataclasses import dataclass, field
from typing import Literal

from pubmon.config.access import AccessList, Principal
from pubmon.config.checks import parse_listen

RestartMode = Literal["always", "on-failure", "never"]
ProbeKind = Literal["none", "fb303", "tcp", "exec"]
ThriftTransport = Literal["framed", "buffered"]
# How stderr lines reach the log file: "together" in <name>.log as they are, "marked" there
# with "stderr| " before each line, "separate" in <name>.err.log of their own.
StderrMode = Literal["together", "marked", "separate"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    initial: float = 0.5
    max: float = 60.0
    factor: float = 2.0
    jitter: float = 0.1
    reset_after: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashLoop:
    max_restarts: int = 10
    window: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LogSpec:
    max_bytes: int = 50_000_000  # rotate the file past this size; 0 = never rotate
    backups: int = 5  # rotated files kept: name.log.1 .. name.log.N
    ring_lines: int = 2000  # lines kept in memory for tailLog (fewer past 1 MiB: ring.BYTE_CAP)
    max_line: int = 65536  # longer lines are cut into fragments flagged partial
    echo: bool = False  # also copy every line to the daemon's stderr ("name| line")
    timestamps: bool = False  # each line in the file starts with the time it was read
    stderr: StderrMode = "together"
    # From [daemon] log_group / log_mode (not keys of the publisher's log table): the group and
    # mode of its files (the directory follows); None = not set (files 0640, group left alone).
    group: int | None = None
    mode: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSpec:
    kind: ProbeKind = "none"
    interval: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    transport: ThriftTransport = "framed"  # fb303 only
    host: str = "127.0.0.1"  # fb303 / tcp
    # fb303 / tcp. In an instance: the port this instance probes, already shifted (the file's
    # probe.port + index, else the instance's own port); None when neither is set.
    port: int | None = None
    command: tuple[str, ...] = ()  # exec: exit 0 = healthy
    export_counters: bool = False  # fb303 only: the child's getCounters() go to /metrics


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """`[publisher.X.limits]`: cgroup limits (need the controller, see pubmon.core.cgroup) and
    rlimits set for the child at spawn (work everywhere). None = not set (inherited)."""

    memory_max: int | None = None  # bytes: memory.max (the kernel's OOM killer inside it)
    memory_high: int | None = None  # bytes: memory.high (reclaim and throttling above it)
    cpu_max: float | None = None  # fraction of one core: cpu.max (0.5 = 50 ms per 100 ms)
    pids_max: int | None = None  # pids.max
    # rlimits, soft = hard = the value; RLIM_INFINITY (-1) = "unlimited"
    nofile: int | None = None
    core: int | None = None  # bytes
    nproc: int | None = None
    address_space: int | None = None  # bytes; the file's key is `as`
    require: bool = False  # a cgroup limit that cannot be applied is an error, not a warning

    def cgroup_limits(self) -> dict[str, int | float]:
        """The cgroup limits that are set, by config key."""
        out: dict[str, int | float] = {}
        for key in ("memory_max", "memory_high", "cpu_max", "pids_max"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherSpec:
    """One instance. `[publisher.feed] numprocs = 3` gives feed:0, feed:1, feed:2."""

    name: str  # instance name: "feed" (numprocs = 1) or "feed:0"
    program: str  # the [publisher.<program>] section it came from
    index: int = 0
    # {port} {name} {index} already expanded; a relative argv[0] with a "/" is made absolute
    command: tuple[str, ...]
    port: int | None = None  # port + index
    numprocs: int = 1
    directory: str | None = None  # absolute
    # sorted by name: the names inherited from the daemon's environment, with their values at
    # load, overlaid with the [publisher.X.environment] table
    environment: tuple[tuple[str, str], ...] = ()
    inherit_environment: bool | tuple[str, ...] = False  # true = all of the daemon's, or names
    user: str | None = None
    autostart: bool = True
    depends_on: tuple[str, ...] = ()  # program names; every instance of each must be RUNNING
    restart: RestartMode = "always"
    success_exit_codes: frozenset[int] = frozenset({0})
    start_timeout: float = 10.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    backoff: Backoff = field(default_factory=Backoff)
    crash_loop: CrashLoop = field(default_factory=CrashLoop)
    data_source: str | None = None
    log: LogSpec = field(default_factory=LogSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    limits: Limits = field(default_factory=Limits)
    # Restart it (gracefully) when its memory (cgroup memory.current, else the RSS of its
    # processes) stays above memory_restart bytes for memory_restart_after seconds.
    memory_restart: int | None = None
    memory_restart_after: float = 5.0
    # When it ends for good (EXITED, or FATAL), the daemon stops everything and exits with its
    # status: its exit code, or 128 + the signal that killed it (1 if it never ran).
    critical: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    log_dir: str | None = None
    log_group: int | None = None  # gid given to the log files and log_dir (a name in the file)
    log_mode: int | None = None  # mode of the log files (0o640); log_dir gets the x bits too
    # The cgroup2 directory pubmon manages (a cgroup per publisher below it): "auto" = its own
    # cgroup when delegated to it (systemd's Delegate=yes), "" = none, or an absolute path.
    cgroup: str = "auto"
    # Every publisher line also to pubmon's stdout ("name | line", stderr "name ! line");
    # None = on when pubmon is PID 1 (a container's entrypoint) and log_dir is not set.
    log_stdout: bool | None = None
    inherit_environment: bool | tuple[str, ...] = False  # the publishers' default
    shutdown_timeout: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    socket: str | None = "/run/pubmon/pubmon.sock"  # "" in the file = no control socket
    allow_uids: tuple[int, ...] = (0,)  # uids (or user names, in the file): the control level
    # Who gets which level (config.access); its control list includes allow_uids. The daemon's
    # own uid always has control.
    allow: AccessList = field(
        default_factory=lambda: AccessList(control=(Principal("0", "uid:0"),))
    )
    # The unix socket's own pool (TCP cannot use it up); the daemon's uid is never refused.
    max_connections: int = 128
    max_connections_per_uid: int = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorConfig:
    listen: str = ""  # "" = no TCP listener (the default); "host:port", port 0 = any free port
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Who gets which level, by certificate subject or SAN; logs and control need tls_client_ca.
    allow: AccessList = field(default_factory=lambda: AccessList(status=(Principal("*", "*"),)))
    max_frame: int = 1 << 20
    idle_timeout: float = 300.0
    max_connections: int = 1024
    max_connections_per_ip: int = 64

    def address(self) -> tuple[str, int] | None:
        """`listen` as (host, port) for asyncio.start_server (IPv6 without brackets); None if ""."""
        return parse_listen(self.listen) if self.listen else None


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    """[http]: /metrics, /healthz, /readyz and the dashboard (http.py). Off unless `listen`."""

    listen: str = ""  # "host:port"; "" = no HTTP listener
    tls: bool = True  # serve TLS with [monitor]'s tls_cert/tls_key (and client CA) when set
    token_file: str | None = None  # the bearer token that grants the logs level
    hosts: tuple[str, ...] = ()  # Host header names accepted besides the defaults
    ready_ignores_fatal: bool = False  # /readyz: a FATAL wanted publisher does not fail it
    child_counters_max: int = 200  # per publisher, for probe.export_counters

    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: str  # the file it was read from (absolute)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    publishers: tuple[PublisherSpec, ...] = ()  # instances, in file order
    # "key: why" lines to show (check-config) or log (daemon start), never fatal (_config_trust)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def publisher(self, name: str) -> PublisherSpec | None:
        for spec in self.publishers:
            if spec.name == name:
                return spec
        return None

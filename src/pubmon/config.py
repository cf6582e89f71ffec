"""TOML config -> frozen dataclasses, validated once at load; diffs between two configs.

The shapes below are the contract the rest of pubmon reads. `load_config` fills them in and
reports every problem of a file at once as a ConfigError(file, [ConfigProblem(key, why), ...]).
"""

from __future__ import annotations

__all__ = [
    "FIELD_EFFECTS",
    "Backoff",
    "Config",
    "ConfigDiff",
    "ControlConfig",
    "CrashLoop",
    "DaemonConfig",
    "HttpConfig",
    "Limits",
    "LogSpec",
    "MonitorConfig",
    "ProbeSpec",
    "PublisherChange",
    "PublisherSpec",
    "check_config_main",
    "diff_configs",
    "load_config",
    "parse_config",
]

import errno
import os
import signal
import sys
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal

from pubmon._config_checks import parse_listen
from pubmon.access import AccessList, Principal
from pubmon.errors import ConfigError, ConfigProblem

RestartMode = Literal["always", "on-failure", "never"]
ProbeKind = Literal["none", "fb303", "tcp", "exec"]
ThriftTransport = Literal["framed", "buffered"]


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
    ring_lines: int = 2000  # lines kept in memory for tailLog
    max_line: int = 65536  # longer lines are cut into fragments flagged partial
    echo: bool = False  # also copy every line to the daemon's stderr ("name| line")


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
    """`[publisher.X.limits]`: cgroup limits (need the controller, see pubmon.cgroup) and
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
    # Who gets which level (pubmon.access); its control list includes allow_uids. The daemon's
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


# What a reload does when a publisher's field changes. Every field of PublisherSpec is listed
# (a test checks it, and diff_configs refuses an unlisted one), so a new field cannot be
# silently ignored by a reload:
# - restart: the process was started with it; the publisher restarts with the new value;
# - probe: the health watch is rebuilt at once, in the phase the run is in (no restart);
# - live: read where it is used (the next stop, backoff, exit decision, log write...).
FieldEffect = Literal["restart", "probe", "live"]
FIELD_EFFECTS: dict[str, FieldEffect] = {
    "name": "restart",
    "program": "restart",
    "index": "restart",
    "command": "restart",
    "directory": "restart",
    "environment": "restart",
    "inherit_environment": "restart",
    "user": "restart",
    "port": "live",  # what it changes ({port} in the command, the probe's port) says itself
    "numprocs": "live",
    "autostart": "live",  # the next daemon start; a reload starts only what it adds
    "depends_on": "live",
    "restart": "live",
    "success_exit_codes": "live",
    "start_timeout": "live",
    "stop_signal": "live",
    "stop_timeout": "live",
    "backoff": "live",
    "crash_loop": "live",
    "data_source": "probe",  # handed over by the new probe once the child is healthy
    "log": "live",
    "probe": "probe",
    # Written to the cgroup and set as rlimits when the process starts: a new value needs a
    # new process (systemd applies cgroup limits live; pubmon restarts, which is simpler and
    # says what happens).
    "limits": "restart",
    "memory_restart": "live",  # read by the memory sweep each second
    "memory_restart_after": "live",
    "critical": "live",  # read when it ends for good
}

ChangeKind = Literal["added", "removed", "restarted", "updated", "unchanged"]


@dataclass(frozen=True, slots=True)
class PublisherChange:
    """What a reload does to one instance, and the settings (dotted keys) that differ."""

    name: str
    change: ChangeKind
    fields: tuple[str, ...] = ()
    top: frozenset[str] = frozenset()  # the differing top-level fields of PublisherSpec


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """Every instance of the old and the new config, new ones in file order, removed last."""

    changes: tuple[PublisherChange, ...] = ()

    def _names(self, kind: ChangeKind) -> tuple[str, ...]:
        return tuple(sorted(c.name for c in self.changes if c.change == kind))

    @property
    def added(self) -> tuple[str, ...]:
        return self._names("added")

    @property
    def removed(self) -> tuple[str, ...]:
        return self._names("removed")

    @property
    def changed(self) -> tuple[str, ...]:
        """Restarted: spawn settings differ."""
        return self._names("restarted")

    @property
    def policy_only(self) -> tuple[str, ...]:
        """Updated: applied to the running publisher, no restart."""
        return self._names("updated")

    @property
    def unchanged(self) -> tuple[str, ...]:
        return self._names("unchanged")


def _differences(a: object, b: object, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two dataclasses of one type."""
    out = []
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x == y:
            continue
        if is_dataclass(x) and type(x) is type(y):
            out.extend(_differences(x, y, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file. Raises ConfigError listing every problem in it.

    An unreadable file is one problem with key "" naming the OS error; so is invalid TOML
    (tomllib's message, with line and column). ConfigError.file is the absolute path.
    """
    file = os.path.abspath(path)
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        raise ConfigError(
            file, [ConfigProblem("", f"cannot read: {e.strerror} ({code})")]
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(file, [ConfigProblem("", f"not UTF-8 text: {e}")]) from None
    return parse_config(text, file)


def parse_config(text: str, path: str | Path) -> Config:
    """Validate TOML text as if read from `path` (relative paths resolve against its folder).

    Checks the filesystem (directories, executables, TLS files, and who may change what the
    daemon runs, obeys or writes in: `_config_trust`). A missing user is only a warning
    (`Config.warnings`): it is a runtime failure of that publisher. Every problem of the text is
    reported at once, in file order, in one ConfigError.
    """
    file = os.path.abspath(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, [ConfigProblem("", f"invalid TOML: {e}")]) from None
    from ._config_load import Loader  # it builds the dataclasses above: imported once they exist

    return Loader(file, doc).load()


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs instance by instance (by instance name): see FIELD_EFFECTS."""
    before = {spec.name: spec for spec in old.publishers}
    changes = []
    for spec in new.publishers:
        was = before.get(spec.name)
        if was is None:
            changes.append(PublisherChange(spec.name, "added"))
            continue
        dotted = _differences(was, spec)
        top = frozenset(key.split(".", 1)[0] for key in dotted)
        unlisted = top - FIELD_EFFECTS.keys()
        assert not unlisted, f"FIELD_EFFECTS does not say what a reload does with {unlisted}"
        if not top:
            kind: ChangeKind = "unchanged"
        elif any(FIELD_EFFECTS[f] == "restart" for f in top):
            kind = "restarted"
        else:
            kind = "updated"
        changes.append(PublisherChange(spec.name, kind, tuple(dotted), top))
    after = {spec.name for spec in new.publishers}
    changes.extend(
        PublisherChange(spec.name, "removed") for spec in old.publishers if spec.name not in after
    )
    return ConfigDiff(tuple(changes))


def check_config_main(path: str) -> int:
    """`pubmon check-config FILE`: print "ok: N publishers (M instances)" and return 0, or print
    the ConfigError to stderr and return 2 (the CLI's config-error exit code). Warnings (a
    publisher running as root, an unknown user, ...) go to stderr first, one per line, and do
    not change the exit code. The verdict is the one the daemon would reach running as this
    process's uid: run it as the daemon's user (root) to judge a root daemon's file."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    for warning in config.warnings:
        print(f"warning: {config.path}: {warning}", file=sys.stderr)
    programs = {spec.program for spec in config.publishers}
    print(f"ok: {len(programs)} publishers ({len(config.publishers)} instances)")
    return 0

"""TOML config -> frozen dataclasses, validated once at load; diffs between two configs.

The shapes below are the contract the rest of pubmon reads. `load_config` fills them in and
reports every problem of a file at once as a ConfigError(file, [ConfigProblem(key, why), ...]).
"""

from __future__ import annotations

__all__ = [
    "Backoff",
    "Config",
    "ConfigDiff",
    "ControlConfig",
    "CrashLoop",
    "DaemonConfig",
    "LogSpec",
    "MonitorConfig",
    "ProbeSpec",
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
from dataclasses import dataclass, field
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
    environment: tuple[tuple[str, str], ...] = ()  # sorted by name
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

    def spawn_key(self) -> tuple[object, ...]:
        """What a running process was started with: a change here needs a restart."""
        return (self.command, self.directory, self.environment, self.user)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonConfig:
    log_dir: str | None = None
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


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorConfig:
    listen: str = "127.0.0.1:9090"  # "" = no TCP listener; "host:port", port 0 = any free port
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Who gets which level, by certificate subject or SAN; logs and control need tls_client_ca.
    allow: AccessList = field(default_factory=lambda: AccessList(status=(Principal("*", "*"),)))
    max_frame: int = 1 << 20
    idle_timeout: float = 300.0
    max_connections: int = 1024

    def address(self) -> tuple[str, int] | None:
        """`listen` as (host, port) for asyncio.start_server (IPv6 without brackets); None if ""."""
        return parse_listen(self.listen) if self.listen else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: str  # the file it was read from (absolute)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    publishers: tuple[PublisherSpec, ...] = ()  # instances, in file order

    def publisher(self, name: str) -> PublisherSpec | None:
        for spec in self.publishers:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigDiff:
    """Instance names, each sorted: what a reload must do."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # spawn settings differ: restart
    policy_only: tuple[str, ...] = ()  # only policy differs: apply live, keep the process
    unchanged: tuple[str, ...] = ()


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

    Checks the filesystem (directories, executables, TLS files) but not users: a missing user is
    a runtime failure of that publisher. Every problem of the text is reported at once, in file
    order, in one ConfigError.
    """
    file = os.path.abspath(path)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, [ConfigProblem("", f"invalid TOML: {e}")]) from None
    from ._config_load import Loader  # it builds the dataclasses above: imported once they exist

    return Loader(file, doc).load()


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs instance by instance (by instance name).

    `changed` = spawn_key() differs (the process must be restarted); `policy_only` = same
    spawn_key but some other field differs (apply live); `unchanged` = equal specs.
    """
    before = {spec.name: spec for spec in old.publishers}
    after = {spec.name: spec for spec in new.publishers}
    changed, policy_only, unchanged = [], [], []
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a == b:
            unchanged.append(name)
        elif a.spawn_key() != b.spawn_key():
            changed.append(name)
        else:
            policy_only.append(name)
    return ConfigDiff(
        added=tuple(sorted(after.keys() - before.keys())),
        removed=tuple(sorted(before.keys() - after.keys())),
        changed=tuple(sorted(changed)),
        policy_only=tuple(sorted(policy_only)),
        unchanged=tuple(sorted(unchanged)),
    )


def check_config_main(path: str) -> int:
    """`pubmon check-config FILE`: print "ok: N publishers (M instances)" and return 0, or print
    the ConfigError to stderr and return 2 (the CLI's config-error exit code)."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    programs = {spec.program for spec in config.publishers}
    print(f"ok: {len(programs)} publishers ({len(config.publishers)} instances)")
    return 0

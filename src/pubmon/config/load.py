"""Loading and checking a config: a TOML file -> `Config`, every problem with its dotted key.

Every section is read through a `Checker`, which records problems and hands back defaults, so
a file with problems is still walked to the end and every problem is reported at once.
"""

from __future__ import annotations

__all__ = ["Loader", "check_config_main", "load_config", "parse_config"]

import errno
import os
import re
import sys
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

from pubmon.config.access import LEVELS, AccessList, Principal, cert_principal, unix_principal
from pubmon.config.checks import (
    Checker,
    Key,
    Table,
    check_depends,
    describe,
    dotted,
    expand_environment,
    find_program,
    is_local,
    parse_listen,
    parse_signal,
)
from pubmon.config.model import (
    Backoff,
    Config,
    ControlConfig,
    CrashLoop,
    DaemonConfig,
    HttpConfig,
    Limits,
    LogSpec,
    MonitorConfig,
    ProbeKind,
    ProbeSpec,
    PublisherSpec,
    RestartMode,
    StderrMode,
    ThriftTransport,
)
from pubmon.config.trust import trust_findings
from pubmon.errors import ConfigError, ConfigProblem
from pubmon.host.cgroupfs import cgroup2_problem

# A section name becomes part of instance names ("feed:0"), counters and log file names.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MIB = 1 << 20
_MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
_PORT_PROBES = ("fb303", "tcp")


# The keys each table accepts. Listed rather than derived from the dataclass fields, so a field
# added to a dataclass is not silently accepted in files before a reader for it exists.
_SECTIONS = ("daemon", "control", "monitor", "http", "publisher")
_DAEMON_KEYS = ("log_dir", "shutdown_timeout", "inherit_environment", "cgroup",
                "log_stdout", "log_group", "log_mode")  # fmt: skip
_CONTROL_KEYS = ("socket", "allow_uids", "allow", "max_connections", "max_connections_per_uid")
_MONITOR_KEYS = ("listen", "tls_cert", "tls_key", "tls_client_ca", "allow", "allow_control",
                 "max_frame", "idle_timeout", "max_connections",
                 "max_connections_per_ip")  # fmt: skip
_ALLOW_KEYS = tuple(str(level) for level in LEVELS)
_HTTP_KEYS = ("listen", "tls", "token_file", "hosts", "ready_ignores_fatal", "child_counters_max")
_PUBLISHER_KEYS = ("command", "port", "numprocs", "directory", "environment", "user",
                   "inherit_environment", "autostart", "depends_on", "restart",
                   "success_exit_codes", "start_timeout", "stop_signal", "stop_timeout",
                   "backoff", "crash_loop", "data_source", "log", "probe", "limits",
                   "memory_restart", "memory_restart_after", "critical")  # fmt: skip
_LIMITS_KEYS = ("memory_max", "memory_high", "cpu_max", "pids_max", "nofile", "core", "nproc",
                "as", "require")  # fmt: skip
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)", re.I)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BACKOFF_KEYS = ("initial", "max", "factor", "jitter", "reset_after")
_CRASH_LOOP_KEYS = ("max_restarts", "window")
_LOG_KEYS = ("max_bytes", "backups", "ring_lines", "max_line", "echo", "timestamps", "stderr")
_STDERR_MODES = ("together", "marked", "separate")
_MODE = re.compile(r"0?o?([0-7]{3})")
_PROBE_KEYS = ("kind", "interval", "timeout", "failure_threshold", "transport", "host", "port",
               "command", "export_counters")  # fmt: skip


def _uid(p: Principal) -> int:
    return int(p.key.removeprefix("uid:"))


def _uid_principals(uids: tuple[int, ...]) -> tuple[Principal, ...]:
    return tuple(Principal(str(u), f"uid:{u}") for u in uids)


class Loader:
    """One parsed document -> Config: each section, then the checks that span sections.

    Builders read through `self.chk`, which records problems and hands back defaults, so a
    file with problems is still walked to the end and every problem is reported.
    """

    def __init__(self, file: str, doc: Table) -> None:
        self.file = file
        self.folder = os.path.dirname(file)
        self.doc = doc
        self.chk = Checker()
        self.sections: set[str] = set()  # every [publisher.X] name, even invalid ones
        # (argv[0], cwd, PATH) -> argv[0] to store, for programs found: numprocs = 1000 looks
        # one up once (a PATH search per instance was half a second of loading).
        self._found: dict[tuple[str, str | None, str | None], str] = {}
        self._inherit_default: bool | tuple[str, ...] = False  # [daemon] inherit_environment
        self._log_access: tuple[int | None, int | None] = (None, None)  # log_group, log_mode
        # program key -> names set by its environment table: their values take {port}, {name},
        # {index} like the command (inherited values are passed on as they are).
        self._env_table: dict[Key, frozenset[str]] = {}

    def load(self) -> Config:
        # ${VAR} and ${VAR:-default} in string values, from the daemon's environment at load.
        self.doc = expand_environment(self.doc, self.chk, os.environ)
        self.chk.known_keys(self.doc, (), _SECTIONS)
        daemon, control, monitor = self._daemon(), self._control(), self._monitor()
        http = self._http()
        programs = self._programs()
        check_depends(self.chk, {p.program: p.depends_on for p in programs}, self.sections)
        instances = [spec for program in programs for spec in self._instances(program)]
        self._check_file_names(instances)
        # An invalid listen address was replaced by the default: do not judge ports against it.
        listen_ok = not self.chk.failed(("monitor", "listen"))
        self._check_ports(instances, monitor.address() if listen_ok else None)
        if http.listen and not self.chk.failed(("http", "listen")):
            self._check_http_port(http, instances, monitor if listen_ok else None)
        if self.chk.problems:
            raise ConfigError(self.file, self.chk.in_file_order(self.doc))
        config = Config(
            path=self.file,
            daemon=daemon,
            control=control,
            monitor=monitor,
            http=http,
            publishers=tuple(instances),
        )
        # Who can change what the daemon runs, obeys or writes in (_config_trust): judged on the
        # finished config, whose paths are all absolute and whose commands are resolved.
        errors, warnings = trust_findings(config)
        for key, why in errors:
            self.chk.problem(key, why)
        if self.chk.problems:
            raise ConfigError(self.file, self.chk.in_file_order(self.doc))
        return replace(
            config, warnings=tuple(str(ConfigProblem(dotted(k), w)) for k, w in warnings)
        )

    def _path(self, value: str) -> str:
        """A path from the file, made absolute against the file's folder."""
        return os.path.normpath(os.path.join(self.folder, value))

    def _section(self, parent: Table, name: str, key: Key, allowed: tuple[str, ...]) -> Table:
        table = self.chk.table(parent, name, key)
        if table is None:
            return {}
        self.chk.known_keys(table, key, allowed)
        return table

    # --- [daemon] [control] [monitor] -------------------------------------------------------

    def _daemon(self) -> DaemonConfig:
        chk, key, d = self.chk, ("daemon",), DaemonConfig()
        t = self._section(self.doc, "daemon", key, _DAEMON_KEYS)
        log_dir = chk.string(t, "log_dir", key)  # "" = none, as for control.socket
        self._inherit_default = self._inherit(t, key, d.inherit_environment)
        self._log_access = (self._log_group(t, key), self._log_mode(t, key))
        group, mode = self._log_access
        if group is not None and mode is not None and not mode & 0o040:
            chk.problem(
                (*key, "log_mode"),
                f'log_group is set but log_mode {mode:04o} does not let the group read: use "0640"',
            )
        return DaemonConfig(
            cgroup=self._cgroup(t, key, d.cgroup),
            log_dir=self._path(log_dir) if log_dir else None,
            log_group=self._log_access[0],
            log_mode=self._log_access[1],
            inherit_environment=self._inherit_default,
            shutdown_timeout=chk.number(t, "shutdown_timeout", key, d.shutdown_timeout, gt=0),
            log_stdout=chk.boolean(t, "log_stdout", key, False) if "log_stdout" in t else None,
        )

    def _log_group(self, t: Table, key: Key) -> int | None:
        """`log_group`: a group name or gid that gets the log files and log_dir."""
        if "log_group" not in t:
            return None
        import grp

        value = t["log_group"]
        try:
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_UID:
                grp.getgrgid(value)
                return value
            if isinstance(value, str) and value:
                return grp.getgrnam(value).gr_gid
        except KeyError:
            self.chk.problem((*key, "log_group"), f"no group {value!r} on this host")
            return None
        self.chk.problem(
            (*key, "log_group"), f"expected a group name or gid, got {describe(value)}"
        )
        return None

    def _log_mode(self, t: Table, key: Key) -> int | None:
        """`log_mode`: the log files' mode, "0640" (or 0o640): read and write for the daemon,
        read at most for the group and others; log_dir gets the matching x bits."""
        if "log_mode" not in t:
            return None
        value = t["log_mode"]
        mode = None
        if isinstance(value, int) and not isinstance(value, bool):
            mode = value
        elif isinstance(value, str) and (found := _MODE.fullmatch(value)):
            mode = int(found.group(1), 8)
        if mode is None or mode & ~0o644 or mode & 0o600 != 0o600:
            self.chk.problem(
                (*key, "log_mode"),
                'expected a file mode such as "0640": rw for the owner (6), at most read (4)'
                f" for the group and others, got {describe(value)}",
            )
            return None
        return mode

    def _cgroup(self, t: Table, key: Key, default: str) -> str:
        """`cgroup`: "auto", "" (none) or an absolute path to a directory in a cgroup2
        hierarchy (whether pubmon may write there is found at start: pubmon.core.cgroup)."""
        value = self.chk.string(t, "cgroup", key)
        if value is None or value in ("", "auto"):
            return default if value is None else value
        why = cgroup2_problem(value)
        if why:
            self.chk.problem((*key, "cgroup"), f'expected "auto", "" or {why}')
            return ""
        return os.path.normpath(value)

    def _control(self) -> ControlConfig:
        chk, key, d = self.chk, ("control",), ControlConfig()
        t = self._section(self.doc, "control", key, _CONTROL_KEYS)
        socket = chk.string(t, "socket", key)
        uids = self._allow_uids(t, key)
        allow = self._allow(t, key, unix_principal, d.allow)
        # allow_uids is the control list it always was: merged into allow.control.
        merged = {p.key: p for p in (*(uids or _uid_principals(d.allow_uids)), *allow.control)}
        return ControlConfig(
            socket=d.socket if socket is None else self._path(socket) if socket else None,
            allow_uids=d.allow_uids if uids is None else tuple(_uid(p) for p in uids),
            allow=replace(allow, control=tuple(merged.values())),
            max_connections=chk.integer(t, "max_connections", key, d.max_connections, lo=1),
            max_connections_per_uid=chk.integer(
                t, "max_connections_per_uid", key, d.max_connections_per_uid, lo=1
            ),
        )

    def _allow_uids(self, t: Table, key: Key) -> tuple[Principal, ...] | None:
        """`allow_uids = [0, "alice"]`: uids or user names (not groups: that is `allow`)."""
        items = self.chk.array(t, "allow_uids", key, "uids or user names")
        if items is None:
            return None
        out = []
        for i, item in enumerate(items):
            where = f"item {i + 1}: "
            if isinstance(item, str) and (item.startswith("@") or item == "*"):
                self.chk.problem(
                    (*key, "allow_uids"),
                    f"{where}expected a uid or a user name, got {item!r} "
                    '(groups and "*" go in [control] allow)',
                )
                continue
            try:
                out.append(unix_principal(item))
            except ValueError as e:
                got = "" if isinstance(item, int | str) else f", got {describe(item)}"
                self.chk.problem((*key, "allow_uids"), f"{where}{e}{got}")
        return tuple(out) if len(out) == len(items) else None

    def _allow(
        self, t: Table, key: Key, parse: Callable[[object], Principal], default: AccessList
    ) -> AccessList:
        """`allow = { control = [...], logs = [...], status = [...] }`; a level not given keeps
        its default."""
        key = (*key, "allow")
        table = self._section(t, "allow", key, _ALLOW_KEYS)
        got: dict[str, tuple[Principal, ...]] = {}
        for level in _ALLOW_KEYS:
            items = self.chk.array(table, level, key, "principals")
            if items is None:
                continue
            entries = []
            for i, item in enumerate(items):
                try:
                    entries.append(parse(item))
                except ValueError as e:
                    shown = "" if isinstance(item, int | str) else f", got {describe(item)}"
                    self.chk.problem((*key, level), f"item {i + 1}: {e}{shown}")
            got[level] = tuple({p.key: p for p in entries}.values())
        return replace(default, **got)

    def _monitor(self) -> MonitorConfig:
        chk, key, d = self.chk, ("monitor",), MonitorConfig()
        t = self._section(self.doc, "monitor", key, _MONITOR_KEYS)
        listen = self._listen(t, key)
        cert, tls_key, ca = (
            self._file(t, n, key) for n in ("tls_cert", "tls_key", "tls_client_ca")
        )
        allow = self._allow(t, key, cert_principal, d.allow)
        if chk.boolean(t, "allow_control", key, False):
            chk.problem(
                (*key, "allow_control"),
                "true is no longer accepted: it gave control to every certificate the CA ever "
                'signed; name them instead: allow = { control = ["CN=...,O=..."] }',
            )
        # A pairing is judged only when both sides parsed: a bad value is already reported.
        tls_failed = chk.failed(*((*key, n) for n in ("tls_cert", "tls_key", "tls_client_ca")))
        if (cert is None) != (tls_key is None) and not tls_failed:
            missing, given = ("tls_key", "tls_cert") if cert else ("tls_cert", "tls_key")
            chk.problem((*key, missing), f"required with {given} (they come as a pair)")
        if ca is not None and cert is None and not tls_failed:
            chk.problem((*key, "tls_client_ca"), "needs tls_cert and tls_key (mutual TLS is TLS)")
        for level in ("logs", "control"):
            if getattr(allow, level) and ca is None and not tls_failed:
                chk.problem(
                    (*key, "allow", level),
                    "needs tls_client_ca: without client certificates the monitor listener "
                    "cannot tell who calls, so it serves the status level only",
                )
        return MonitorConfig(
            listen=d.listen if listen is None else listen,
            tls_cert=cert,
            tls_key=tls_key,
            tls_client_ca=ca,
            allow=allow,
            max_frame=chk.integer(t, "max_frame", key, d.max_frame, lo=1024, hi=256 * _MIB),
            idle_timeout=chk.number(t, "idle_timeout", key, d.idle_timeout, gt=0),
            max_connections=chk.integer(t, "max_connections", key, d.max_connections, lo=1),
            max_connections_per_ip=chk.integer(
                t, "max_connections_per_ip", key, d.max_connections_per_ip, lo=1
            ),
        )

    def _listen(self, t: Table, key: Key) -> str | None:
        """`listen` as given ("" too), or None (absent, or a problem reported)."""
        listen = self.chk.string(t, "listen", key)
        if listen:
            try:
                parse_listen(listen)
            except ValueError as e:
                self.chk.problem((*key, "listen"), str(e))
                listen = None
        return listen

    def _http(self) -> HttpConfig:
        chk, key, d = self.chk, ("http",), HttpConfig()
        t = self._section(self.doc, "http", key, _HTTP_KEYS)
        listen = self._listen(t, key)
        token_file = self._file(t, "token_file", key)
        if token_file is not None and os.path.isfile(token_file):
            try:
                with open(token_file, "rb") as f:
                    token = f.read().strip()
                    mode = os.fstat(f.fileno()).st_mode & 0o777
            except OSError as e:
                chk.problem((*key, "token_file"), f"cannot read {token_file}: {e.strerror}")
            else:
                if mode & 0o007:  # a secret every local user could read (or replace)
                    chk.problem(
                        (*key, "token_file"),
                        f"{token_file} is open to every user (mode {mode:04o}): "
                        f"chmod o-rwx {token_file}",
                    )
                if len(token) < 16:
                    chk.problem(
                        (*key, "token_file"),
                        f"expected a token of at least 16 characters in {token_file}, "
                        f"got {len(token)}",
                    )
        hosts = chk.str_list(t, "hosts", key) or ()
        for i, host in enumerate(hosts):
            if not host or any(c in host for c in "/ @\\?#"):
                chk.problem((*key, "hosts"), f"item {i + 1}: expected a host name, got {host!r}")
        return HttpConfig(
            listen=listen or d.listen,
            tls=chk.boolean(t, "tls", key, d.tls),
            token_file=token_file,
            hosts=tuple(h.lower() for h in hosts),
            ready_ignores_fatal=chk.boolean(t, "ready_ignores_fatal", key, d.ready_ignores_fatal),
            child_counters_max=chk.integer(
                t, "child_counters_max", key, d.child_counters_max, lo=0, hi=10000
            ),
        )

    def _check_http_port(
        self, http: HttpConfig, instances: list[PublisherSpec], monitor: MonitorConfig | None
    ) -> None:
        address = http.address()
        assert address is not None
        port = address[1]
        if port == 0:
            return
        key: Key = ("http", "listen")
        mon = monitor.address() if monitor is not None else None
        if mon is not None and mon[1] == port:
            self.chk.problem(key, f"port {port} is also the monitor.listen port")
        for spec in instances:
            if spec.port == port:
                self.chk.problem(key, f"port {port} is also the port of publisher {spec.name}")
                break

    def _file(self, t: Table, name: str, key: Key) -> str | None:
        value = self.chk.string(t, name, key, nonempty=True)
        if value is None:
            return None
        path = self._path(value)
        if not os.path.isfile(path):
            self.chk.problem((*key, name), f"expected an existing file, got {path}")
        return path

    # --- [publisher.NAME] -------------------------------------------------------------------

    def _programs(self) -> list[PublisherSpec]:
        """One template per valid [publisher.NAME] section: name = program, placeholders kept."""
        programs = []
        for name, raw in (self.chk.table(self.doc, "publisher", ("publisher",)) or {}).items():
            key: Key = ("publisher", name)
            self.sections.add(name)
            if not _NAME.fullmatch(name):
                self.chk.problem(
                    key,
                    "invalid publisher name: use letters, digits, '_', '.' "
                    "and '-' (':' is kept for instance names such as feed:0)",
                )
            if not isinstance(raw, dict):
                self.chk.problem(key, f"expected a table [publisher.{dotted((name,))}]")
            else:
                template = self._program(name, raw, key)
                if _NAME.fullmatch(name):
                    programs.append(template)
        return programs

    def _program(self, name: str, t: Table, key: Key) -> PublisherSpec:
        chk, d = self.chk, PublisherSpec(name="", program="", command=())
        chk.known_keys(t, key, _PUBLISHER_KEYS)
        if "command" not in t:
            chk.problem((*key, "command"), "required: the program and its arguments")
        port = chk.integer(t, "port", key, None, lo=1, hi=65535)
        numprocs = chk.integer(t, "numprocs", key, d.numprocs, lo=1, hi=1000)
        if port is not None and port + numprocs - 1 > 65535:
            chk.problem((*key, "port"), f"port {port} + numprocs {numprocs} - 1 exceeds 65535")
        inherit = self._inherit(t, key, self._inherit_default)
        directory = chk.string(t, "directory", key, nonempty=True)
        if directory is not None:
            directory = self._path(directory)
            if not os.path.isdir(directory):
                chk.problem((*key, "directory"), f"expected an existing directory, got {directory}")
        stop_signal = d.stop_signal
        if "stop_signal" in t:
            try:
                stop_signal = parse_signal(t["stop_signal"])
            except ValueError as e:
                chk.problem((*key, "stop_signal"), str(e))
        restart = chk.choice(t, "restart", key, ("always", "on-failure", "never"))
        exit_codes = chk.int_list(t, "success_exit_codes", key, lo=0, hi=255)
        data_source = chk.string(t, "data_source", key, nonempty=True)
        probe = self._probe(t, (*key, "probe"), numprocs)
        kind_failed = chk.failed((*key, "probe", "kind"))
        if data_source is not None and probe.kind != "fb303" and not kind_failed:
            chk.problem(
                (*key, "data_source"),
                f"needs probe kind 'fb303', not {probe.kind!r} "
                "(the source is handed over with an fb303-side call)",
            )
        if (
            probe.kind in _PORT_PROBES
            and probe.port is None
            and port is None
            and not chk.failed((*key, "port"), (*key, "probe", "port"))
        ):
            chk.problem(
                (*key, "probe", "port"),
                f"probe kind {probe.kind!r} needs a port: set probe.port or the publisher's port",
            )
        return PublisherSpec(
            name=name,
            program=name,
            command=chk.command(t, "command", key) or (),
            port=port,
            numprocs=numprocs,
            directory=directory,
            environment=self._environment(t, key, inherit),
            inherit_environment=inherit,
            user=chk.string(t, "user", key, nonempty=True),
            autostart=chk.boolean(t, "autostart", key, d.autostart),
            depends_on=tuple(dict.fromkeys(chk.str_list(t, "depends_on", key) or ())),
            restart=cast(RestartMode, restart or d.restart),
            success_exit_codes=d.success_exit_codes
            if exit_codes is None
            else frozenset(exit_codes),
            start_timeout=chk.number(t, "start_timeout", key, d.start_timeout, ge=0),
            stop_signal=stop_signal,
            stop_timeout=chk.number(t, "stop_timeout", key, d.stop_timeout, ge=0),
            backoff=self._backoff(t, (*key, "backoff")),
            crash_loop=self._crash_loop(t, (*key, "crash_loop")),
            data_source=data_source,
            log=self._log(t, (*key, "log")),
            probe=probe,
            limits=self._limits(t, (*key, "limits")),
            memory_restart=self._size(t, "memory_restart", key, lo=1 << 20),
            memory_restart_after=chk.number(
                t, "memory_restart_after", key, d.memory_restart_after, ge=0
            ),
            critical=chk.boolean(t, "critical", key, d.critical),
        )

    def _inherit(
        self, t: Table, key: Key, default: bool | tuple[str, ...]
    ) -> bool | tuple[str, ...]:
        """`inherit_environment`: true, false, or an array of variable names."""
        if "inherit_environment" not in t:
            return default
        value = t["inherit_environment"]
        if isinstance(value, bool):
            return value
        names = self.chk.str_list(t, "inherit_environment", key)
        if names is None:
            return default
        for name in names:
            if not name or "=" in name:
                self.chk.problem(
                    (*key, "inherit_environment"),
                    f"invalid variable name {name!r} (empty, or has '=')",
                )
        return tuple(dict.fromkeys(names))

    def _environment(
        self, t: Table, key: Key, inherit: bool | tuple[str, ...]
    ) -> tuple[tuple[str, str], ...]:
        """What the daemon's environment passes on (`inherit`: all of it, or the names present
        in it), overlaid with the environment table. Sorted by name, so reordering the table in
        the file is not a spawn change; a changed inherited value (a new daemon) is one."""
        key = (*key, "environment")
        env: dict[str, str] = {}
        if inherit is True:
            env.update(os.environ)
        elif inherit:
            env.update((n, os.environ[n]) for n in inherit if n in os.environ)
        for name, value in (self.chk.table(t, "environment", key) or {}).items():
            if not name or "=" in name or "\0" in name:
                self.chk.problem((*key, name), "invalid variable name (empty, or has '=' or NUL)")
            text = self.chk.str_value(value, (*key, name))
            if text is not None:
                env[name] = text
        self._env_table[key[:-1]] = frozenset(self.chk.table(t, "environment", key) or {})
        return tuple(sorted(env.items()))

    def _backoff(self, t: Table, key: Key) -> Backoff:
        chk, d = self.chk, Backoff()
        b = self._section(t, "backoff", key, _BACKOFF_KEYS)
        initial = chk.number(b, "initial", key, d.initial, gt=0)
        longest = chk.number(b, "max", key, d.max, gt=0)
        if longest < initial and not chk.failed((*key, "initial"), (*key, "max")):
            default = "" if "max" in b else " (the default)"
            chk.problem(
                (*key, "max"), f"expected a number >= initial {initial:g}, got {longest:g}{default}"
            )
        return Backoff(
            initial=initial,
            max=longest,
            factor=chk.number(b, "factor", key, d.factor, ge=1),
            jitter=chk.number(b, "jitter", key, d.jitter, ge=0, le=1),
            reset_after=chk.number(b, "reset_after", key, d.reset_after, ge=0),
        )

    def _crash_loop(self, t: Table, key: Key) -> CrashLoop:
        chk, d = self.chk, CrashLoop()
        c = self._section(t, "crash_loop", key, _CRASH_LOOP_KEYS)
        return CrashLoop(
            max_restarts=chk.integer(c, "max_restarts", key, d.max_restarts, lo=0),
            window=chk.number(c, "window", key, d.window, gt=0),
        )

    def _log(self, t: Table, key: Key) -> LogSpec:
        chk, d = self.chk, LogSpec()
        g = self._section(t, "log", key, _LOG_KEYS)
        return LogSpec(
            max_bytes=chk.integer(g, "max_bytes", key, d.max_bytes, lo=0),
            backups=chk.integer(g, "backups", key, d.backups, lo=0),
            ring_lines=chk.integer(g, "ring_lines", key, d.ring_lines, lo=1),
            max_line=chk.integer(g, "max_line", key, d.max_line, lo=64, hi=16 * _MIB),
            echo=chk.boolean(g, "echo", key, d.echo),
            timestamps=chk.boolean(g, "timestamps", key, d.timestamps),
            stderr=cast(StderrMode, chk.choice(g, "stderr", key, _STDERR_MODES) or d.stderr),
            group=self._log_access[0],
            mode=self._log_access[1],
        )

    def _size(
        self, t: Table, name: str, key: Key, *, lo: int = 0, unlimited: bool = False
    ) -> int | None:
        """Bytes: an integer or a string with a K, M, G or T suffix (powers of 1024), as
        systemd takes them ("512M"); with `unlimited`, also "unlimited" (RLIM_INFINITY)."""
        if name not in t:
            return None
        value = t[name]
        if unlimited and value == "unlimited":
            return -1
        found = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool):
            size: int | None = value
        elif found:
            size = int(found.group(1)) * _SIZE_UNITS[found.group(2).upper()]
        else:
            size = None
        if size is None or size < lo:
            also = ' or "unlimited"' if unlimited else ""
            self.chk.problem(
                (*key, name),
                f'expected a size of at least {lo} bytes: an integer or "512M" (K, M, G, T)'
                f"{also}, got {describe(value)}",
            )
            return None
        return size

    def _limits(self, t: Table, key: Key) -> Limits:
        chk = self.chk
        g = self._section(t, "limits", key, _LIMITS_KEYS)
        cpu = chk.number(g, "cpu_max", key, 0.0, gt=0, le=float(os.cpu_count() or 1) * 64)
        count: dict[str, int | None] = {}
        for name in ("pids_max", "nofile", "nproc"):
            if g.get(name) == "unlimited" and name != "pids_max":
                count[name] = -1
            else:
                count[name] = chk.integer(g, name, key, None, lo=1)
        return Limits(
            memory_max=self._size(g, "memory_max", key, lo=4096),
            memory_high=self._size(g, "memory_high", key, lo=4096),
            cpu_max=cpu if "cpu_max" in g and cpu > 0 else None,
            pids_max=count["pids_max"],
            nofile=count["nofile"],
            core=self._size(g, "core", key, unlimited=True),
            nproc=count["nproc"],
            address_space=self._size(g, "as", key, lo=1 << 20, unlimited=True),
            require=chk.boolean(g, "require", key, False),
        )

    def _probe(self, t: Table, key: Key, numprocs: int) -> ProbeSpec:
        chk, d = self.chk, ProbeSpec()
        p = self._section(t, "probe", key, _PROBE_KEYS)
        kind = chk.choice(p, "kind", key, ("none", "fb303", "tcp", "exec")) or d.kind
        interval = chk.number(p, "interval", key, d.interval, gt=0)
        timeout = chk.number(p, "timeout", key, d.timeout, gt=0)
        if timeout > interval and not chk.failed((*key, "interval"), (*key, "timeout")):
            chk.problem(
                (*key, "timeout"), f"expected a number <= interval {interval:g}, got {timeout:g}"
            )
        if kind == "exec" and "command" not in p:
            chk.problem((*key, "command"), "required when kind = 'exec'")
        if kind != "exec" and "command" in p and not chk.failed((*key, "kind")):
            chk.problem((*key, "command"), f"only allowed with kind = 'exec', not {kind!r}")
        port = chk.integer(p, "port", key, None, lo=1, hi=65535)
        if port is not None and port + numprocs - 1 > 65535:
            chk.problem((*key, "port"), f"port {port} + numprocs {numprocs} - 1 exceeds 65535")
        transport = chk.choice(p, "transport", key, ("framed", "buffered")) or d.transport
        export_counters = chk.boolean(p, "export_counters", key, d.export_counters)
        if export_counters and kind != "fb303" and not chk.failed((*key, "kind")):
            chk.problem(
                (*key, "export_counters"),
                f"needs kind = 'fb303' (the counters come from its getCounters), not {kind!r}",
            )
        return ProbeSpec(
            kind=cast(ProbeKind, kind),
            interval=interval,
            timeout=timeout,
            failure_threshold=chk.integer(p, "failure_threshold", key, d.failure_threshold, lo=1),
            transport=cast(ThriftTransport, transport),
            host=chk.string(p, "host", key, nonempty=True) or d.host,
            port=port,
            command=chk.command(p, "command", key) or (),
            export_counters=export_counters,
        )

    # --- instances, and checks across them ---------------------------------------------------

    def _instances(self, program: PublisherSpec) -> list[PublisherSpec]:
        """feed -> [feed] or [feed:0 .. feed:N-1]: ports shifted by index, placeholders expanded.

        The probe port shifts like the port: instance i probes probe.port + i, or port + i when
        the probe has no port of its own; that effective port is what ProbeSpec.port holds.
        Instance names cannot collide: TOML forbids duplicate sections and section names
        cannot contain ":".
        """
        key: Key = ("publisher", program.program)
        n, probe = program.numprocs, program.probe
        names = [program.program] if n == 1 else [f"{program.program}:{i}" for i in range(n)]
        # A port that failed its own check is not also reported as "{port} with no port set".
        port_failed = self.chk.failed((*key, "port"))
        # argv[0] is looked up relative to `directory` (None: it is missing, already reported).
        cwd = None if self.chk.failed((*key, "directory")) else program.directory or self.folder
        env_path = dict(program.environment).get("PATH")
        out = []
        for i, name in enumerate(names):
            port = None if program.port is None else program.port + i
            values: dict[str, object] = {"name": name, "index": i}
            if port is not None or port_failed:
                values["port"] = port or 0
            argv = self._argv(program.command, values, cwd, env_path, (*key, "command"))
            probe_argv = self._argv(
                probe.command, values, cwd, env_path, (*key, "probe", "command")
            )
            probe_port = port if probe.port is None else probe.port + i
            environment = self._instance_env(program.environment, values, key)
            out.append(
                replace(
                    program,
                    name=name,
                    index=i,
                    environment=environment,
                    command=argv,
                    port=port,
                    probe=replace(probe, port=probe_port, command=probe_argv),
                )
            )
        return out

    def _instance_env(
        self, env: tuple[tuple[str, str], ...], values: dict[str, object], key: Key
    ) -> tuple[tuple[str, str], ...]:
        """The environment table's values with {port}, {name}, {index} expanded."""
        table = self._env_table.get(key, frozenset())
        if not table:
            return env
        out = []
        for name, value in env:
            if name in table and ("{" in value or "}" in value):
                got = self.chk.expand((value,), values, (*key, "environment", name))
                value = got[0] if got else value
            out.append((name, value))
        return tuple(out)

    def _argv(
        self,
        argv: tuple[str, ...],
        values: dict[str, object],
        cwd: str | None,
        env_path: str | None,
        key: Key,
    ) -> tuple[str, ...]:
        expanded = self.chk.expand(argv, values, key) if argv else None
        if not expanded:
            return argv
        memo = (expanded[0], cwd, env_path)
        found = self._found.get(memo)
        if found is not None:
            return (found, *expanded[1:])
        problems = len(self.chk.problems)
        out = find_program(self.chk, expanded, cwd, env_path, key)
        if len(self.chk.problems) == problems:
            self._found[memo] = out[0]
        return out

    def _check_file_names(self, instances: list[PublisherSpec]) -> None:
        """Log files are named without ':' ("api:0" -> api-0.log): a program "api-0" would
        share the file of instance api:0."""
        seen: dict[str, str] = {}
        for spec in instances:
            fname = spec.name.replace(":", "-")
            other = seen.setdefault(fname, spec.name)
            if other != spec.name:
                self.chk.problem(
                    ("publisher", spec.program),
                    f"instance {spec.name} would share the log file {fname}.log with {other}:"
                    " rename one of the programs",
                )

    def _check_ports(self, instances: list[PublisherSpec], monitor: tuple[str, int] | None) -> None:
        """No two instances on one port, none on the monitor's port (publishers run on this
        host, whatever address they bind), no probe aimed at another instance's port here."""
        owners: dict[int, PublisherSpec] = {}
        for spec in instances:
            if spec.port is None:
                continue
            key: Key = ("publisher", spec.program, "port")
            owner = owners.setdefault(spec.port, spec)
            if owner is not spec:
                self.chk.problem(
                    key, f"port {spec.port} of {spec.name} is already used by {owner.name}"
                )
            if monitor is not None and monitor[1] == spec.port:
                self.chk.problem(
                    key, f"port {spec.port} of {spec.name} is also the monitor.listen port"
                )
        for spec in instances:
            probe = spec.probe
            if probe.kind not in _PORT_PROBES or probe.port is None or not is_local(probe.host):
                continue
            owner = owners.get(probe.port, spec)
            if owner.name != spec.name:
                self.chk.problem(
                    ("publisher", spec.program, "probe", "port"),
                    f"the probe of {spec.name} would connect to port {probe.port}, "
                    f"which is the port of {owner.name}",
                )


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
    return Loader(file, doc).load()


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

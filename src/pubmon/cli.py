"""pubmon: an asyncio process supervisor for publishers.

Usage:
  pubmon daemon [options]
  pubmon demo [options]
  pubmon check-config [FILE]
  pubmon status [NAME...] [options]
  pubmon start NAME... [options]
  pubmon stop NAME... [options]
  pubmon restart NAME... [options]
  pubmon pause NAME... [options]
  pubmon resume NAME... [options]
  pubmon signal NAME SIG [options]
  pubmon pid [NAME...] [options]
  pubmon reload [options]
  pubmon tail NAME... [options]
  pubmon clear NAME... [options]
  pubmon log [options]
  pubmon counters [PREFIX] [options]
  pubmon upgrade [options]
  pubmon upgrade-check --state-version N --config FILE
  pubmon completion SHELL
  pubmon -h | --help
  pubmon --version

Options:
  --config FILE    The daemon's TOML config; client commands read its [control] socket.
  --init           daemon: act as an init although not PID 1: at the end, stop every
                   remaining descendant, not only the publishers (PID 1 always does).
  --check          status: print nothing and exit 0 only if those publishers (or all) are
                   RUNNING and HEALTHY (or RUNNING with no probe); else name them, exit 1.
  --debug          asyncio debug mode and DEBUG logging (also PYTHONASYNCIODEBUG=1).
  --socket PATH    The daemon's control socket (else $PUBMON_SOCKET, else the [control] socket
                   of --config or $PUBMON_CONFIG, else /run/pubmon/pubmon.sock).
  --host H         Talk to the TCP monitor listener on this host instead (status only,
                   unless mutual TLS grants more).
  --port P         With --host: the TCP monitor listener's port [default: 9090].
  --tls-ca FILE    With --host: speak TLS and trust this CA for the daemon's certificate,
                   whose name must match H (without it: the system's CAs).
  --tls-cert FILE  With --host: speak TLS and present this client certificate (mutual TLS).
  --tls-key FILE   The client certificate's private key (default: in the --tls-cert file).
  --timeout S      Stop waiting after S seconds (the daemon goes on with the request).
  --no-wait        start/stop/restart/reload: return once the daemon accepted the request.
  --json           Machine-readable output (status, pid, counters, reload).
  --group          status: one line per program.
  --state STATES   status: only these states (comma-separated: running,fatal).
  --dry-run        reload: show what would change; apply nothing.
  --timestamps     tail, log: show each line's time.
  -n N             tail, log: how many lines of history to show first [default: 10].
  -f               tail, log: keep printing new lines (across restarts) until Ctrl-C.
  --state-version N  upgrade-check: the state format the running daemon hands over.
  -h --help        Show this text.
  --version        Show the version.

pause freezes a publisher's whole process tree (its cgroup) until resume. clear empties a
publisher's log: its ring (for new readers) and its log files, rotated copies removed.
NAME: an instance (feed:0), a program (feed: all its instances), a shell-style glob
(feed:1*, 'f*') or all. SHELL: bash or zsh (eval "$(pubmon completion bash)").
Exit codes: 0 ok, 1 error, 2 bad config, 3 daemon cannot start, 4 daemon not reachable,
5 permission denied, 6 unknown publisher, 7 invalid state for the request, 8 --timeout
reached (the operation goes on), 9 the daemon upgraded in place while the request was
waiting (it was accepted and goes on: see pubmon status), 64 usage error. A request the
daemon refuses because it is upgrading is retried until --timeout.
"""

from __future__ import annotations

__all__ = ["main"]

# Client commands (status, start, tail, ...) must start and exit within ~100 ms: they talk to the
# daemon through the thriftpy2-free `thrift.blocking`, and import neither asyncio nor logging
# nor the daemon's modules. Those are imported inside the functions of `daemon`, `demo` and
# `check-config`.
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from docopt import docopt

from pubmon._version import __version__
from pubmon.errors import ConfigError, RpcError, StartupError
from pubmon.thrift.blocking import BlockingClient, DeclaredException

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_NOT_RUNNING = 4
EXIT_DENIED = 5
EXIT_UNKNOWN = 6
EXIT_INVALID_STATE = 7
EXIT_TIMEOUT = 8
EXIT_UPGRADING = 9
EXIT_USAGE = 64  # EX_USAGE of sysexits.h

DEFAULT_SOCKET = "/run/pubmon/pubmon.sock"


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Args(NamedTuple):
    """The parsed command line. (A NamedTuple: `dataclasses` costs the CLI 12 ms to import.)"""

    command: str
    names: tuple[str, ...]
    socket: str
    host: str | None
    port: int
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    timeout: float | None  # None: wait as long as the daemon takes (it bounds every request)
    json: bool
    lines: int
    follow: bool
    prefix: str
    no_wait: bool = False
    group: bool = False
    states: tuple[str, ...] = ()
    dry_run: bool = False
    timestamps: bool = False
    signal: str = ""
    check: bool = False

    @property
    def call_timeout(self) -> float:
        """The socket timeout of one call: --timeout, else long enough for any request."""
        return self.timeout if self.timeout is not None else CALL_TIMEOUT


CALL_TIMEOUT = 300.0


def setup_logging(debug: bool) -> None:
    import logging
    import time

    # Under systemd the journal stamps every line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt

    class Formatter(logging.Formatter):
        """asctime made once a second: strftime per line was a third of stopping 1000."""

        second, text = -1, ""

        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            second = int(record.created)
            if second != self.second:
                self.second = second
                self.text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            return f"{self.text},{int(record.msecs):03d}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(fmt))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True
    )


def _config_from_env() -> str:
    path = os.environ.get("PUBMON_CONFIG")
    if not path:
        raise CliError(EXIT_USAGE, "pubmon check-config needs FILE (or $PUBMON_CONFIG)")
    return path


def run_daemon(
    config_path: str,
    debug: bool,
    *,
    cleanup: Callable[[], None] | None = None,
    init: bool = False,
) -> int:
    import asyncio
    import logging

    from pubmon.config.load import load_config
    from pubmon.daemon.daemon import Daemon

    debug = debug or bool(os.environ.get("PYTHONASYNCIODEBUG"))
    setup_logging(debug)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:  # what check-config prints: root publishers, unknown users
        logging.getLogger("pubmon").warning("%s: %s", config.path, warning)
    # What is alive now (modules, classes, the config) lives as long as the daemon: out of the
    # collector's sight, a full collection no longer walks it. Measured for issue 16 (400
    # `sleep` publishers started and stopped, gc.callbacks): the one full collection of the
    # start took 10.5-11.5 ms, and none ran with the freeze.
    import gc

    gc.freeze()
    try:
        code = asyncio.run(Daemon(config, init=init).run(), debug=debug)
    except StartupError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except BaseExceptionGroup as group:
        # A listener that cannot bind raises inside the daemon's TaskGroup, which wraps it.
        rest = group.subgroup(lambda e: not isinstance(e, StartupError | BaseExceptionGroup))
        if rest is not None:
            raise
        startup = group.subgroup(StartupError)
        assert startup is not None
        for err in _leaves(startup):
            print(f"pubmon: {err}", file=sys.stderr)
        return EXIT_STARTUP
    # Every publisher is stopped and every file closed: skip the interpreter's teardown (module
    # and object cleanup, tens of ms at 1000 publishers), since our exit is what systemd and
    # scripts wait for.
    from pubmon.core.output import (
        finish_writing,  # logio: queued log lines, a bounded wait for them
    )

    finish_writing()
    logging.shutdown()
    if cleanup is not None:
        cleanup()  # what a `with` around us would have done: os._exit skips it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run_demo(debug: bool) -> int:
    """The daemon on a built-in config: three demo publishers on free ports, in a temp dir."""
    import shutil
    import tempfile
    from pathlib import Path

    from pubmon.demo import DEMO_NAMES, demo_config, free_ports

    quotes, trades, news = DEMO_NAMES
    with tempfile.TemporaryDirectory(prefix="pubmon-demo-") as tmp:
        config = Path(tmp) / "pubmon.toml"
        ports = free_ports(5)
        token = Path(tmp) / "http-token"
        token.write_text(os.urandom(18).hex() + "\n")
        token.chmod(0o600)
        config.write_text(demo_config(Path(tmp), ports, token))
        sock = Path(tmp) / "pubmon.sock"
        bin_ = Path(sys.executable).parent / "pubmon"
        pubmon = str(bin_) if bin_.exists() else "pubmon"
        print(
            f"pubmon demo (pid {os.getpid()}): three demo publishers, config {config}\n"
            "Try, in another terminal:\n"
            f"  export PUBMON_SOCKET={sock}\n"
            f"  {pubmon} status\n"
            f"  {pubmon} tail {quotes} -f\n"
            f"  {pubmon} restart {trades}\n"
            f"  {pubmon} counters publisher.{news}\n"
            f"  {pubmon} status --host 127.0.0.1 --port {ports[3]}    # TCP: status only\n"
            f"  {sys.executable} -m pubmon.demo --pub_port {ports[1]} --set status=WARNING\n"
            f"  {sys.executable} -m pubmon.demo --pub_port {ports[0]} --set hang=1"
            "    # the probe finds it and restarts it\n"
            f"  kill -HUP {os.getpid()}    # reload {config}\n"
            f"Dashboard: http://127.0.0.1:{ports[4]}/ (log in with the token in {token}),"
            f" metrics: http://127.0.0.1:{ports[4]}/metrics\n"
            "Ctrl-C stops the daemon and every publisher.\n",
            flush=True,
        )
        return run_daemon(str(config), debug, cleanup=lambda: shutil.rmtree(tmp, True))


# --- talking to a running daemon ------------------------------------------------------------


# How the daemon answers a call an in-place upgrade refused (nothing done) or cut short
# (pubmon.daemon.upgrade.UPGRADING; not imported: the CLI must not load the daemon's modules).
_UPGRADING = "pubmon is upgrading"
_UPGRADING_RETRY = f"{_UPGRADING}: retry"

# What the daemon's declared IDL exceptions mean to an operator: (exit code, message prefix).
_DECLARED = {
    "UnknownPublisher": (EXIT_UNKNOWN, ""),
    "InvalidState": (EXIT_INVALID_STATE, ""),
    "PermissionDenied": (EXIT_DENIED, "permission denied: "),
    "ConfigError": (EXIT_CONFIG, ""),
}


class Remote:
    """A connection to the daemon that turns every failure into a CliError with an exit code."""

    def __init__(self, args: Args) -> None:
        self.args = args
        self.where = f"{args.host}:{args.port}" if args.host else args.socket
        self._client: BlockingClient | None = None
        self._tls = bool(args.host and (args.tls_ca or args.tls_cert or args.tls_key))
        self.calls = 0  # answered

    def __enter__(self) -> Remote:
        a = self.args
        try:
            if a.host:
                ctx = _tls_context(a)
                self._client = BlockingClient(
                    host=a.host, port=a.port, timeout=a.call_timeout, ssl_context=ctx
                )
            else:
                self._client = BlockingClient(unix_socket=a.socket, timeout=a.call_timeout)
        except RpcError as exc:
            cause = exc.__cause__
            if isinstance(cause, PermissionError):
                raise CliError(EXIT_DENIED, f"permission denied: {_denied(self.where)}") from None
            why = _why(exc)
            if not a.host and os.path.isdir(a.socket):
                why = "a directory, not the daemon's socket (the file is often pubmon.sock in it)"
            elif not a.host and isinstance(cause, ConnectionRefusedError):
                why = "nothing listens there (the daemon is not running; the file is stale)"
            raise CliError(
                EXIT_NOT_RUNNING, f"cannot reach the daemon at {self.where}: {why}"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()

    def set_timeout(self, seconds: float) -> None:
        """How long each later call may wait for its answer."""
        assert self._client is not None
        self._client.timeout = seconds

    def call(self, method: str, *args: object) -> Any:
        """`method`'s answer. Refused because the daemon is upgrading ("pubmon is upgrading:
        retry"; nothing was done): asked again on a new connection, which the new image
        answers, until --timeout."""
        deadline = time.monotonic() + self.args.call_timeout
        while True:
            try:
                return self._call(method, *args)
            except CliError as exc:
                if not str(exc).endswith(_UPGRADING_RETRY) or time.monotonic() >= deadline:
                    raise
            self.__exit__()
            time.sleep(0.05)
            self.__enter__()

    def _call(self, method: str, *args: object) -> Any:
        assert self._client is not None, "call() outside `with Remote(...)`"
        try:
            got = self._client.call(method, *args)
            self.calls += 1
            return got
        except DeclaredException as exc:
            code, prefix = _DECLARED.get(exc.name, (EXIT_ERROR, f"{exc.name}: "))
            if exc.message.startswith(_UPGRADING) and not exc.message.endswith(_UPGRADING_RETRY):
                code = EXIT_UPGRADING  # accepted, then cut short by the upgrade
            raise CliError(code, prefix + exc.message) from None
        except RpcError as exc:
            text = str(exc)
            if text.endswith(_UPGRADING_RETRY):
                raise CliError(EXIT_INVALID_STATE, text) from None
            if self._tls and self.calls == 0 and "closed" in text:
                # Under TLS 1.3 the daemon judges our certificate after our side of the
                # handshake is done, and asyncio drops a refused one without an alert: all we
                # see is the connection closing before the first reply.
                raise CliError(
                    EXIT_NOT_RUNNING,
                    f"the daemon at {self.where} closed the TLS connection before answering: "
                    "it refuses a client without a certificate, or with one its tls_client_ca "
                    "did not sign or whose extended key usage lacks clientAuth",
                ) from None
            if "no reply within" in text:
                raise CliError(
                    EXIT_TIMEOUT,
                    f"{method}: no answer within {self.args.call_timeout:g} s; stopped waiting "
                    "(the daemon goes on with the request: see pubmon status)",
                ) from None
            if "PermissionDenied" in text:
                raise CliError(EXIT_DENIED, f"permission denied: {text}") from None
            if "closed" in text or "connection" in text.lower():
                hint = (
                    ""
                    if self.args.host
                    else f" (does [control] allow give uid {os.getuid()} a level?)"
                )
                raise CliError(
                    EXIT_NOT_RUNNING,
                    f"the daemon at {self.where} closed the connection{hint}",
                ) from None
            raise CliError(EXIT_ERROR, text) from None


def _tls_context(a: Args) -> Any:
    """The client's TLS context for --host, or None when no --tls option was given. ssl is
    imported only then: it costs plain `pubmon status` ~10 ms."""
    if not (a.tls_ca or a.tls_cert or a.tls_key):
        return None
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=a.tls_ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if a.tls_cert:
            ctx.load_cert_chain(a.tls_cert, a.tls_key)
        elif a.tls_key:
            raise CliError(EXIT_ERROR, "--tls-key needs --tls-cert")
    except (OSError, ssl.SSLError) as exc:
        raise CliError(EXIT_ERROR, f"cannot load the TLS files: {exc}") from None
    return ctx


def _denied(path: str) -> str:
    """Why the socket file refused us, and what opens it."""
    try:
        st = os.stat(path)
    except OSError:
        return path
    return (
        f"{path} (mode {st.st_mode & 0o777:04o}, owner uid {st.st_uid}; you are uid "
        f"{os.getuid()}): the daemon opens it to the users and groups named in its "
        '[control] allow, e.g. allow = { status = ["@ops"] }, then reload'
    )


def _why(exc: RpcError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc)


# --- names -------------------------------------------------------------------------------------


def _did_you_mean(word: str, candidates: Any) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def _match(infos: list[Any], names: tuple[str, ...]) -> tuple[list[Any], list[str]]:
    """The publishers `names` stand for, in config order, each once; and the unknown names.

    A name is an instance (feed:0), a program (feed: all its instances), a shell-style glob on
    instance and program names (feed:1*), or `all`; an instance name wins over the others."""
    by_name = {i.name: i for i in infos}
    wanted: set[str] = set()
    unknown: list[str] = []
    for name in names:
        if name in by_name:
            hits = [name]
        elif name == "all":
            hits = list(by_name)
        elif any(c in name for c in "*?["):
            from fnmatch import fnmatchcase

            hits = [
                i.name for i in infos if fnmatchcase(i.name, name) or fnmatchcase(i.program, name)
            ]
        else:
            hits = [i.name for i in infos if i.program == name]
        if not hits:
            unknown.append(name)
        wanted.update(hits)
    return [i for i in infos if i.name in wanted], unknown


def _report_unknown(infos: list[Any], unknown: list[str]) -> int:
    if not unknown:
        return EXIT_OK
    known = {i.name for i in infos} | {i.program for i in infos}
    for name in unknown:
        what = "publisher matches" if any(c in name for c in "*?[") else "publisher named"
        print(f"pubmon: no {what} {name!r}{_did_you_mean(name, known)}", file=sys.stderr)
    return EXIT_UNKNOWN


def _resolve(remote: Remote, names: tuple[str, ...]) -> tuple[list[Any], int]:
    """(PublisherInfo of every publisher `names` stand for; EXIT_UNKNOWN if some stand for
    none, reported on stderr, else EXIT_OK). Nothing at all: CliError."""
    infos = remote.call("listPublishers")
    hits, unknown = _match(infos, names)
    code = _report_unknown(infos, unknown)
    if not hits:  # each unknown name was reported already
        raise CliError(EXIT_UNKNOWN, "" if unknown else "the daemon has no publishers")
    return hits, code


# --- status ------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """H:MM:SS, or `3d 04:05:06` past a day (supervisorctl's format)."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    text = f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text:0>8}" if days else text


_IDLE_STATES = ("STOPPED", "EXITED", "FATAL", "BACKOFF")
STATES = ("STOPPED", "STARTING", "RUNNING", "PAUSED", "BACKOFF", "STOPPING", "EXITED", "FATAL")


def _when(i: Any, now: float) -> str:
    """The UPTIME column: how long it runs, or since when it is stopped."""
    if i.state in ("RUNNING", "STARTING", "STOPPING", "PAUSED") and i.uptime > 0:
        return _duration(i.uptime)
    since = getattr(i, "stateSince", None)
    if i.state in _IDLE_STATES and since:
        stamp = time.localtime(since)
        fmt = "%H:%M:%S" if now - since < 86400 else "%b %d %H:%M"
        return "since " + time.strftime(fmt, stamp)
    return "-"


def _details(i: Any, now: float) -> str:
    text: str = i.statusDetails or ""
    until = getattr(i, "backoffUntil", None)
    if i.state == "BACKOFF" and until:
        import re

        left = f"restart in {max(0.0, until - now):.1f} s"
        text, n = re.subn(r"restart in [0-9.]+ ?s", left, text)
        if not n:
            text = f"{left}: {text}" if text else left
    return text


def _exit(i: Any) -> tuple[int | None, str | None]:
    """(exit code, exit signal name) of the last exit, apart."""
    code = i.lastExit
    if code is None:
        return None, None
    if code < 0:
        import signal

        try:
            return None, signal.Signals(-code).name
        except ValueError:
            return None, f"SIG{-code}"
    return code, None


def _cpu(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    return _duration(seconds)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n}B"
    size = float(n)
    for unit in ("K", "M", "G"):
        size /= 1024
        if size < 1024 or unit == "G":
            break
    return f"{size:.1f}{unit}"


def _info_dict(i: Any, usage: tuple[float | None, int | None, int | None]) -> dict[str, object]:
    code, sig = _exit(i)
    probe = getattr(i, "probe", None)
    return {
        "name": i.name,
        "program": i.program,
        "state": i.state,
        "state_since": getattr(i, "stateSince", None),
        "pid": i.pid or None,
        "health": "NONE" if probe == "none" else i.health,
        "probe": probe,
        "restarts": i.restarts,
        "exit_code": code,
        "exit_signal": sig,
        "last_exit_reason": i.lastExitReason or None,
        "started_at": getattr(i, "startedAt", None),
        "uptime": i.uptime,
        "backoff_until": getattr(i, "backoffUntil", None),
        "port": i.port or None,
        "details": i.statusDetails,
        "cpu_seconds": usage[0],
        "memory_bytes": usage[1],
        "tasks": usage[2],
        "open_fds": i.openFds,
    }


JSON_FORMAT = 1  # `status --json`: bump on an incompatible change (README: stable)


def _summary(infos: list[Any]) -> str:
    counts: dict[str, int] = {}
    for i in infos:
        counts[i.state] = counts.get(i.state, 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=_state_order))
    return f"{len(infos)} publisher{'s' if len(infos) != 1 else ''}: {parts or 'none'}"


def _state_order(item: tuple[str, int]) -> int:
    return STATES.index(item[0]) if item[0] in STATES else len(STATES)


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    n = len(rows[0]) - 1
    widths = [max(len(r[c]) for r in rows) for c in range(n)]
    for r in rows:
        print(("  ".join(r[c].ljust(widths[c]) for c in range(n)) + "  " + r[n]).rstrip())


def _usage(counters: dict[str, int], i: Any) -> tuple[float | None, int | None, int | None]:
    """(CPU seconds, memory bytes, processes) of a running publisher: its counters (its cgroup
    when it has one, escapees included; else its process tree), else PublisherInfo's."""
    p = f"publisher.{i.name}."
    if not i.pid:
        return None, None, None
    if p + "tasks" not in counters:  # a daemon without them
        return i.cpuSeconds, i.memoryBytes, None
    return counters[p + "cpu_ms"] / 1000, counters[p + "memory_bytes"], counters[p + "tasks"]


def cmd_status(remote: Remote, a: Args) -> int:
    code = EXIT_OK
    if a.names:
        infos, code = _resolve(remote, a.names)
    else:
        infos = remote.call("listPublishers")
    if a.states:
        infos = [i for i in infos if i.state in a.states]
    if a.check:  # an exec probe (issue 14): silent when all is well
        bad = [i for i in infos if i.state != "RUNNING" or i.health not in ("HEALTHY", "UNKNOWN")]
        for i in bad:
            print(f"{i.name}: {i.state} {i.health} {i.statusDetails}".rstrip(), file=sys.stderr)
        return code or (EXIT_ERROR if bad or not infos else EXIT_OK)
    now = time.time()
    counters = remote.call("getCounters")
    if a.json:
        import json

        d = remote.call("getDaemonInfo")
        daemon = {
            "pid": d.pid,
            "version": d.version,
            "started_at": d.startedAt,
            "uptime": round(now - d.startedAt, 3),
            "config": d.configPath,
            "reloads": d.reloads,
            "last_reload_error": d.lastReloadError or None,
        }
        out = {
            "format": JSON_FORMAT,
            "daemon": daemon,
            "publishers": [_info_dict(i, _usage(counters, i)) for i in infos],
        }
        print(json.dumps(out, indent=1))
        return code
    if a.group:
        programs: dict[str, list[Any]] = {}
        for i in infos:
            programs.setdefault(i.program, []).append(i)
        grows = [("PROGRAM", "INSTANCES", "STATES")]
        for program, members in programs.items():
            grows.append((program, str(len(members)), _summary(members).split(": ", 1)[1]))
        _table(grows)
    else:
        # CPU, MEM, TASKS: the publisher's cgroup when it has one (pubmon.core.cgroup), else its
        # process tree in /proc.
        rows = [
            ("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "TASKS", "HEALTH",
             "DETAILS")
        ]  # fmt: skip
        for i in infos:
            health = "-" if getattr(i, "probe", None) == "none" else i.health
            cpu, mem, tasks = _usage(counters, i)
            rows.append(
                (
                    i.name,
                    i.state,
                    str(i.pid or "-"),
                    _when(i, now),
                    str(i.restarts),
                    _cpu(cpu),
                    _bytes(mem),
                    "-" if tasks is None else str(tasks),
                    health,
                    _details(i, now),
                )
            )
        _table(rows)
    print(_summary(infos))
    return code


def cmd_pid(remote: Remote, a: Args) -> int:
    if not a.names:  # the daemon's own, as supervisorctl pid
        pid = remote.call("getDaemonInfo").pid
        print(f'{{"pubmon": {pid}}}' if a.json else pid)
        return EXIT_OK
    infos, code = _resolve(remote, a.names)
    if a.json:
        import json

        print(json.dumps({i.name: i.pid or None for i in infos}))
        return code
    for i in infos:
        print(i.pid if len(infos) == 1 else f"{i.name} {i.pid}")
    return code


# --- start, stop, restart, signal: many at once -----------------------------------------------

CONCURRENCY = 16  # connections at once: the daemon works on every request concurrently
_GOAL = {
    "start": "RUNNING", "restart": "RUNNING", "stop": "STOPPED", "pause": "PAUSED",
    "resume": "RUNNING",
}  # fmt: skip
_METHOD = {
    "start": "startPublisher", "stop": "stopPublisher", "restart": "restartPublisher",
    "pause": "pausePublisher", "resume": "resumePublisher",
}  # fmt: skip
_NO_WAIT = ("start", "stop", "restart")  # the requests that take noWait


class _Outcome(NamedTuple):
    name: str
    ok: bool
    line: str
    code: int


def _one(remote: Remote, a: Args, name: str) -> _Outcome:
    """Make one request; what it means to an operator."""
    import re

    try:
        if a.command == "signal":
            i = remote.call("signalPublisher", name, a.signal)
            return _Outcome(name, True, f"{name}: {a.signal} sent to pid {i.pid}", EXIT_OK)
        if a.command == "clear":
            r = remote.call("clearLog", name)
            files = f", {len(r.files)} file(s)" if r.files else ""
            if r.error:
                return _Outcome(name, False, f"{name}: log not cleared: {r.error}", EXIT_ERROR)
            return _Outcome(name, True, f"{name}: log cleared ({r.lines} lines{files})", EXIT_OK)
        extra_arg = (a.no_wait or None,) if a.command in _NO_WAIT else ()
        i = remote.call(_METHOD[a.command], name, *extra_arg)
    except CliError as exc:
        already = re.search(r"is already (\w+)", str(exc))
        if exc.code == EXIT_INVALID_STATE and already and a.command in ("start", "stop"):
            return _Outcome(name, True, f"{name}: already {already.group(1)}", EXIT_OK)
        where = "" if name in str(exc) else f"{name}: "
        return _Outcome(name, False, f"{where}{exc}", exc.code)
    pid = f" pid {i.pid}" if i.pid else ""
    goal = _GOAL[a.command]
    ok = i.state == goal or a.no_wait  # not refused: accepted
    extra = f" ({i.statusDetails})" if i.state != goal and i.statusDetails else ""
    line = f"{name}: {i.state}{pid}{extra}"
    if a.no_wait and i.state != goal:
        line += " (request accepted; not waiting)"
    return _Outcome(name, ok, line, EXIT_OK if ok else EXIT_ERROR)


def _run_many(remote: Remote, a: Args, names: list[str]) -> int:
    """Every request at once (up to CONCURRENCY connections), results as they come: one line
    each, or on a terminal a live progress line with failures named as they happen."""
    if len(names) == 1:
        out = _one(remote, a, names[0])
        print(out.line, file=sys.stdout if out.ok else sys.stderr)
        return out.code
    import queue
    import threading

    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in names:
        todo.put(name)
    done: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()

    # The workers' calls wait as long as the daemon takes: --timeout is the whole command's
    # deadline, kept below, which names what is still pending in one line.
    patient = a._replace(timeout=None)

    def work(conn: Remote) -> None:
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                return
            done.put(_one(conn, patient, name))

    def worker() -> None:
        try:
            with Remote(patient) as mine:
                work(mine)
        except CliError:
            # Refused (the daemon's per-uid connection limit, say): the connection we already
            # have, and any others, carry on with the rest.
            pass

    remote.set_timeout(patient.call_timeout)
    threading.Thread(target=work, args=(remote,), daemon=True).start()
    for _ in range(min(CONCURRENCY, len(names)) - 1):
        threading.Thread(target=worker, daemon=True).start()
    tty = sys.stdout.isatty()
    progress = _Progress(a, len(names)) if tty else None
    deadline = None if a.timeout is None else time.monotonic() + a.timeout
    pending, code = set(names), EXIT_OK
    while pending:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out = done.get(timeout=wait)
        except queue.Empty:
            if progress:
                progress.clear()
            left = [n for n in names if n in pending]
            shown = ", ".join(left[:10]) + (", ..." if len(left) > 10 else "")
            print(
                f"pubmon: stopped waiting after {a.timeout:g} s for {len(left)} publisher(s) "
                f"({shown}); the daemon goes on with the request: see pubmon status",
                file=sys.stderr,
            )
            sys.stdout.flush()
            os._exit(EXIT_TIMEOUT)  # the waiting threads hold sockets: do not join them
        pending.discard(out.name)
        if not out.ok:
            code = code or out.code
        if progress:
            progress.add(out)
        else:
            print(out.line, file=sys.stdout if out.ok else sys.stderr, flush=True)
    if progress:
        progress.finish()
    return code


class _Progress:
    """`start: 12/60 RUNNING, 1 failed` rewritten in place; failures printed above it."""

    def __init__(self, a: Args, total: int) -> None:
        self.verb, self.total = a.command, total
        self.goal = _GOAL.get(a.command) or {"signal": "signalled", "clear": "cleared"}[a.command]
        self.ok = self.failed = 0
        self.draw()

    def line(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.verb}: {self.ok}/{self.total} {self.goal}{failed}"

    def draw(self) -> None:
        sys.stdout.write("\r\x1b[K" + self.line())
        sys.stdout.flush()

    def clear(self) -> None:
        sys.stdout.write("\r\x1b[K")
        sys.stdout.flush()

    def add(self, out: _Outcome) -> None:
        if out.ok:
            self.ok += 1
        else:
            self.failed += 1
            self.clear()
            print(out.line, flush=True)
        self.draw()

    def finish(self) -> None:
        self.clear()
        print(self.line(), flush=True)


def cmd_action(remote: Remote, a: Args) -> int:
    infos, code = _resolve(remote, a.names)
    return _run_many(remote, a, [i.name for i in infos]) or code


# --- reload ------------------------------------------------------------------------------------


def cmd_reload(remote: Remote, a: Args) -> int:
    call = ("diffConfig",) if a.dry_run else ("reloadConfig", a.no_wait or None)
    r = remote.call(*call)
    if a.json:
        import json

        print(
            json.dumps(
                {
                    "dry_run": a.dry_run,
                    "publishers": [
                        {"name": c.name, "change": c.change, "fields": c.fields}
                        for c in r.publishers or ()
                    ],
                    "daemon": r.daemon or [],
                },
                indent=1,
            )
        )
        return EXIT_OK
    would = "would be " if a.dry_run else ""
    unchanged = []
    for c in r.publishers or ():
        if c.change == "unchanged":
            unchanged.append(c.name)
        else:
            fields = f" ({', '.join(c.fields)})" if c.fields else ""
            print(f"{c.name}: {would}{c.change}{fields}")
    if unchanged:
        print(f"unchanged: {', '.join(unchanged)}")
    for line in r.daemon or ():
        print(line)
    if not r.publishers and not r.daemon:
        print("nothing to do: no publishers")
    if a.dry_run:
        print("(dry run: nothing applied; `pubmon reload` applies it)")
    return EXIT_OK


# --- tail, log ---------------------------------------------------------------------------------


def _fmt(line: Any, a: Args, mark: str) -> str:
    stamp = ""
    if a.timestamps:
        ms = int(line.time * 1000) % 1000
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line.time)) + f".{ms:03d} "
    stream = "stderr| " if line.stream == "stderr" else ""
    return f"{stamp}{mark}{stream}{line.text}" + ("" if line.partial else "\n")


def _follow(a: Args, name: str, cursor: int, emit: Callable[[list[Any], str], None]) -> None:
    """Follow one publisher's log (or the daemon's, name ""), across daemon restarts."""
    remote: Remote | None = None
    gone = False
    while True:
        try:
            if remote is None:
                remote = Remote(a).__enter__()
                if gone:
                    emit([], f"--- the daemon at {remote.where} is back; following again ---")
                gone = False
            if name:
                chunk = remote.call("tailLog", name, cursor, 1000)
            else:
                chunk = remote.call("tailDaemonLog", cursor, 1000)
                if not chunk.lines:
                    time.sleep(0.5)  # no long poll for the daemon's ring
        except CliError as exc:
            if exc.code not in (EXIT_NOT_RUNNING, EXIT_TIMEOUT):
                raise
            if not gone:
                where = remote.where if remote else Remote(a).where
                emit([], f"--- lost the daemon at {where}; waiting for it to come back ---")
                gone = True
            if remote is not None:
                remote.__exit__()
                remote = None
            time.sleep(0.5)  # a reconnect attempt twice a second, as `tail -F` retries
            continue
        if chunk.nextSeq < cursor:
            emit([], "--- the daemon restarted: its log starts again here ---")
        elif chunk.missed:
            emit([], f"--- {chunk.missed} line(s) missed ---")
        emit(chunk.lines, "")
        cursor = chunk.nextSeq


def _history(remote: Remote, name: str, n: int) -> tuple[list[Any], int]:
    """The last `n` lines of `name` and the cursor to follow from. afterSeq < 0 asks for the
    last -afterSeq lines; -n 0 asks for one only to learn the cursor (0 would mean "from the
    start of the ring"). Replies are capped in size: the newest lines come first, the older
    ones they left out (from nextSeq - want + missed up to the first line sent) are fetched
    page by page."""
    want = min(max(n, 0), 10000)
    chunk = remote.call("tailLog", name, -max(want, 1), 10000)
    cursor = chunk.nextSeq
    if want == 0:
        return [], cursor
    first = chunk.lines[0].seq if chunk.lines else cursor + 1
    older = max(0, cursor - want + chunk.missed)
    out: list[Any] = []
    while older < first - 1:
        page = remote.call("tailLog", name, older, first - 1 - older)
        if not page.lines or page.nextSeq <= older:
            break
        out += [x for x in page.lines if x.seq < first]
        older = page.nextSeq
    return out + list(chunk.lines), cursor


def cmd_tail(remote: Remote, a: Args) -> int:
    infos, code = _resolve(remote, a.names)
    names = [i.name for i in infos]
    many = len(names) > 1
    width = max(len(n) for n in names)
    out = sys.stdout

    def mark(name: str) -> str:
        return f"{name.ljust(width)} | " if many else ""

    history: list[tuple[float, str]] = []
    cursors = {}
    for name in names:
        lines, cursors[name] = _history(remote, name, a.lines)
        history += [(x.time, _fmt(x, a, mark(name))) for x in lines]
    history.sort(key=lambda t: t[0])  # interleaved by the time each line was read
    keep = history[-a.lines :] if many and a.lines > 0 else history
    out.write("".join(text for _, text in keep))
    out.flush()
    if not a.follow:
        return code
    remote.__exit__()
    import threading

    lock = threading.Lock()

    def emitter(name: str) -> Callable[[list[Any], str], None]:
        def emit(lines: list[Any], notice: str) -> None:
            with lock:
                if notice:
                    print(f"{mark(name)}{notice}", file=sys.stderr, flush=True)
                out.write("".join(_fmt(x, a, mark(name)) for x in lines))
                out.flush()

        return emit

    if not many:
        _follow(a, names[0], cursors[names[0]], emitter(names[0]))  # until Ctrl-C
    for name in names:
        args = (a, name, cursors[name], emitter(name))
        threading.Thread(target=_follow, args=args, daemon=True).start()
    while True:
        time.sleep(3600)  # until Ctrl-C: the followers print


def cmd_log(remote: Remote, a: Args) -> int:
    chunk = remote.call("tailDaemonLog", -max(a.lines, 1), 10000)
    out = sys.stdout
    if a.lines > 0:
        out.write("".join(_fmt_daemon(x, a) for x in chunk.lines))
        out.flush()
    if a.follow:
        remote.__exit__()

        def emit(lines: list[Any], notice: str) -> None:
            if notice:
                print(notice, file=sys.stderr, flush=True)
            out.write("".join(_fmt_daemon(x, a) for x in lines))
            out.flush()

        _follow(a, "", chunk.nextSeq, emit)
    return EXIT_OK


def _fmt_daemon(line: Any, a: Args) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(line.time))
    return f"{stamp}{line.stream} {line.text}\n"


def cmd_counters(remote: Remote, a: Args) -> int:
    counters = remote.call("getCounters")
    picked = {k: counters[k] for k in sorted(counters) if k.startswith(a.prefix)}
    if a.json:
        import json

        print(json.dumps(picked, indent=1))
        return EXIT_OK
    for key, value in picked.items():
        print(f"{key} {value}")
    return EXIT_OK


def cmd_upgrade(remote: Remote, a: Args) -> int:
    """Ask for the upgrade, then wait for the new image to count it (the exec closes the
    connection) and print what getCounters says of it."""
    r = remote.call("upgrade")
    print(f"upgrading pubmon {r.oldVersion} -> {r.newVersion}: {r.publishers} publishers")
    deadline = time.monotonic() + (a.timeout if a.timeout is not None else 60.0)
    while True:
        try:
            with Remote(a) as again:
                counters = again.call("getCounters")
        except CliError:
            counters = {}
        if counters.get("daemon.upgrades", 0) > r.upgradesBefore:
            break
        if time.monotonic() >= deadline:
            raise CliError(EXIT_TIMEOUT, "the new image did not report the upgrade in time")
        time.sleep(0.05)
    pause = counters.get("daemon.last_upgrade_pause_ms", 0)
    adopted = counters.get("daemon.last_upgrade_adopted", 0)
    lost = counters.get("daemon.last_upgrade_lost", 0)
    print(f"upgraded in place: paused {pause} ms, {adopted} publishers carried over")
    if lost:
        print(f"pubmon: {lost} publisher(s) could not be carried over (see the daemon's log)")
        return EXIT_ERROR
    return EXIT_OK


COMMANDS: dict[str, Callable[[Remote, Args], int]] = {
    "status": cmd_status,
    "start": cmd_action,
    "stop": cmd_action,
    "restart": cmd_action,
    "pause": cmd_action,
    "resume": cmd_action,
    "signal": cmd_action,
    "clear": cmd_action,
    "pid": cmd_pid,
    "reload": cmd_reload,
    "tail": cmd_tail,
    "log": cmd_log,
    "counters": cmd_counters,
    "upgrade": cmd_upgrade,
}
ALL_COMMANDS = ("daemon", "demo", "check-config", *COMMANDS, "completion", "upgrade-check")


def _remote_main(a: Args) -> int:
    with Remote(a) as remote:
        return COMMANDS[a.command](remote, a)


# --- the command line --------------------------------------------------------------------------


def _socket_of_config(path: str, source: str) -> str:
    """The [control] socket of the config file `path` (named by `source`), as the daemon
    resolves it (relative to the file's folder); CliError when it has none."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise CliError(EXIT_CONFIG, f"{source} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(EXIT_CONFIG, f"{source} {path}: {exc}") from None
    control = data.get("control", {})
    sock = control.get("socket", DEFAULT_SOCKET) if isinstance(control, dict) else DEFAULT_SOCKET
    if not isinstance(sock, str):
        raise CliError(EXIT_CONFIG, f"{source} {path}: control.socket: expected a string")
    if not sock:
        raise CliError(
            EXIT_NOT_RUNNING, f'{source} {path} has no control socket (control.socket = "")'
        )
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), sock))


def find_socket(raw: dict[str, Any]) -> str:
    """--socket > $PUBMON_SOCKET > --config FILE's [control] socket > $PUBMON_CONFIG's > the
    default."""
    if raw["--socket"]:
        return str(raw["--socket"])
    if os.environ.get("PUBMON_SOCKET"):
        return os.environ["PUBMON_SOCKET"]
    if raw["--config"]:
        return _socket_of_config(raw["--config"], "--config")
    if os.environ.get("PUBMON_CONFIG"):
        return _socket_of_config(os.environ["PUBMON_CONFIG"], "$PUBMON_CONFIG")
    return DEFAULT_SOCKET


def _number(raw: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = raw[key]
    try:
        got = kind(value)
    except ValueError:
        raise CliError(EXIT_USAGE, f"{key} expects {what}, got {value!r}") from None
    if got < 0 or (kind is float and got != got):
        raise CliError(EXIT_USAGE, f"{key} expects {what}, got {value!r}")
    return got


def _options() -> list[str]:
    import re

    return sorted(set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", __doc__.split("Options:")[1])))


def _usage_error(argv: list[str]) -> CliError:
    """A docopt refusal as an operator reads it: the bad word, a guess, the command's usage."""
    usage = __doc__.split("Usage:")[1].split("\n\n")[0]
    hint = "; see pubmon --help"
    if not argv:
        return CliError(EXIT_USAGE, "a command is missing" + hint)
    first = argv[0]
    if not first.startswith("-") and first not in ALL_COMMANDS:
        guess = _did_you_mean(first, ALL_COMMANDS)
        return CliError(EXIT_USAGE, f"unknown command {first!r}{guess}{hint}")
    known = _options()
    for word in argv:
        if word == "--":
            break
        opt = word.split("=", 1)[0]
        if opt.startswith("--") and opt not in known:
            return CliError(EXIT_USAGE, f"unknown option {opt!r}{_did_you_mean(opt, known)}{hint}")
    command = first if first in ALL_COMMANDS else ""
    lines = [x.strip() for x in usage.splitlines() if x.strip().startswith(f"pubmon {command}")]
    return CliError(
        EXIT_USAGE,
        f"wrong arguments for {'pubmon ' + command if command else 'pubmon'}: "
        f"{' '.join(argv)}\nusage: " + "\n       ".join(lines),
    )


def _doc_for(words: list[str]) -> str:
    """The usage text with only the command's own pattern when the first word names one:
    docopt's matching grows with the square of the patterns (each `[options]` is every
    option), 40 ms of `pubmon status` with all of them, 3 ms with one."""
    assert __doc__ is not None
    if not words or words[0] not in ALL_COMMANDS:
        return __doc__
    head, rest = __doc__.split("Usage:\n", 1)
    usage, tail = rest.split("\n\n", 1)
    mine = [x for x in usage.splitlines() if x.split()[1] == words[0]]
    return head + "Usage:\n" + "\n".join(mine) + "\n\n" + tail


def _check_signal(text: str) -> None:
    import signal

    name = text.strip().upper()
    try:
        signal.Signals(int(name)) if name.isdigit() else signal.Signals[
            name if name.startswith("SIG") else "SIG" + name
        ]
    except (KeyError, ValueError):
        known = [s.name for s in signal.Signals] + [s.name[3:] for s in signal.Signals]
        raise CliError(
            EXIT_USAGE, f"no signal named {text!r}{_did_you_mean(name, known)}"
        ) from None


def _parse(argv: list[str] | None) -> tuple[dict[str, Any], Args | None]:
    from docopt import DocoptExit

    words = sys.argv[1:] if argv is None else argv
    try:
        raw: dict[str, Any] = docopt(_doc_for(words), argv=words, version=f"pubmon {__version__}")
    except DocoptExit:
        raise _usage_error(words) from None
    # What the patterns left out of _doc_for's text: absent, as docopt says of unused ones.
    raw = dict.fromkeys(("NAME", "SIG", "PREFIX", "SHELL", "FILE", *ALL_COMMANDS)) | raw
    command = next((c for c in COMMANDS if raw.get(c)), None)
    if command is None:
        return raw, None
    host = raw["--host"]
    if host and raw["--socket"]:
        raise CliError(EXIT_USAGE, "--socket and --host name two different daemons: give one")
    port_given = any(w == "--port" or w.startswith("--port=") for w in words)
    if port_given and not host:
        raise CliError(EXIT_USAGE, "--port goes with --host (the TCP monitor listener)")
    if (raw["--tls-ca"] or raw["--tls-cert"] or raw["--tls-key"]) and not host:
        raise CliError(EXIT_USAGE, "--tls-ca, --tls-cert and --tls-key go with --host")
    states: tuple[str, ...] = ()
    if raw["--state"]:
        states = tuple(s.strip().upper() for s in raw["--state"].split(",") if s.strip())
        for s in states:
            if s not in STATES:
                raise CliError(
                    EXIT_USAGE,
                    f"--state: no state {s!r}{_did_you_mean(s, STATES)}; "
                    f"states: {', '.join(STATES)}",
                )
    if raw["SIG"]:
        _check_signal(raw["SIG"])
    names = raw["NAME"] if isinstance(raw["NAME"], list) else [raw["NAME"]] if raw["NAME"] else []
    args = Args(
        command=command,
        names=tuple(names),
        socket="" if host else find_socket(raw),
        host=host,
        port=_number(raw, "--port", int, "a port number"),
        tls_ca=raw["--tls-ca"],
        tls_cert=raw["--tls-cert"],
        tls_key=raw["--tls-key"],
        timeout=None if raw["--timeout"] is None else _number(raw, "--timeout", float, "seconds"),
        json=bool(raw["--json"]),
        lines=_number(raw, "-n", int, "a number of lines"),
        follow=bool(raw["-f"]),
        prefix=raw["PREFIX"] or "",
        no_wait=bool(raw["--no-wait"]),
        group=bool(raw["--group"]),
        states=states,
        dry_run=bool(raw["--dry-run"]),
        timestamps=bool(raw["--timestamps"]),
        signal=raw["SIG"] or "",
        check=bool(raw["--check"]),
    )
    return raw, args


def main(argv: list[str] | None = None) -> int:
    try:
        raw, args = _parse(argv)
        if raw["daemon"]:
            config = raw["--config"] or os.environ.get("PUBMON_CONFIG")
            if not config:
                raise CliError(EXIT_USAGE, "pubmon daemon needs --config FILE (or $PUBMON_CONFIG)")
            return run_daemon(config, bool(raw["--debug"]), init=bool(raw["--init"]))
        if raw["demo"]:
            return run_demo(debug=bool(raw["--debug"]))
        if raw["upgrade-check"]:  # run by a daemon before `pubmon upgrade` re-executes it
            from pubmon.daemon.upgrade import check_main

            return check_main(raw["--config"], int(raw["--state-version"]))
        if raw["check-config"]:
            from pubmon.config.load import check_config_main

            return check_config_main(raw["FILE"] or _config_from_env())
        if raw["completion"]:
            return print_completion(raw["SHELL"])
        assert args is not None
        return _remote_main(args)
    except CliError as exc:
        if str(exc):
            print(f"pubmon: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pubmon tail -f x | head`
        return EXIT_OK


def print_completion(shell: str) -> int:
    """The bash or zsh completion script, shipped in pubmon/data."""
    from importlib.resources import files

    names = {"bash": "pubmon.bash", "zsh": "_pubmon"}
    if shell not in names:
        raise CliError(EXIT_USAGE, f"no completion for {shell!r}{_did_you_mean(shell, names)}")
    sys.stdout.write(files("pubmon").joinpath("data", names[shell]).read_text())
    return EXIT_OK

"""pubmon: an asyncio process supervisor for publishers.

Usage:
  pubmon daemon --config FILE [--debug]
  pubmon demo [--debug]
  pubmon check-config FILE
  pubmon status [NAME...] [--json] [options]
  pubmon start NAME... [options]
  pubmon stop NAME... [options]
  pubmon restart NAME... [options]
  pubmon pause NAME... [options]
  pubmon resume NAME... [options]
  pubmon reload [options]
  pubmon tail NAME [-n N] [-f] [options]
  pubmon counters [PREFIX] [options]
  pubmon -h | --help
  pubmon --version

Options:
  --config FILE    The daemon's TOML config.
  --debug          asyncio debug mode and DEBUG logging (also PYTHONASYNCIODEBUG=1).
  --socket PATH    The daemon's control socket [default: /run/pubmon/pubmon.sock].
  --host H         Talk to the TCP monitor listener on this host instead (status only,
                   unless mutual TLS grants more).
  --port P         The TCP monitor listener's port [default: 9090].
  --tls-ca FILE    With --host: speak TLS and trust this CA for the daemon's certificate,
                   whose name must match H (without it: the system's CAs).
  --tls-cert FILE  With --host: speak TLS and present this client certificate (mutual TLS).
  --tls-key FILE   The client certificate's private key (default: in the --tls-cert file).
  --timeout S      Seconds to wait for the daemon's answer [default: 30].
  --json           Machine-readable output.
  -n N             How many lines of history to show first [default: 10].
  -f               Follow: keep printing new lines (across restarts) until Ctrl-C.
  -h --help        Show this text.
  --version        Show the version.

pause freezes a publisher's whole process tree (its cgroup) until resume.
Names are instance names (feed, feed:0) or program names (feed = all its instances).
Exit codes: 0 ok, 1 error, 2 bad config, 3 daemon cannot start, 4 daemon not reachable,
5 permission denied, 6 unknown publisher, 7 invalid state for the request.
"""

from __future__ import annotations

__all__ = ["main"]

# Client commands (status, start, tail, ...) must start and exit within ~100 ms: they talk to the
# daemon through the blocking, thriftpy2-free `_wire`, and import neither asyncio nor logging
# nor the daemon's modules. Those are imported inside the functions of `daemon`, `demo` and
# `check-config`.
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from docopt import docopt

from . import __version__
from ._wire import WireClient, WireException
from .errors import ConfigError, RpcError, StartupError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_NOT_RUNNING = 4
EXIT_DENIED = 5
EXIT_UNKNOWN = 6
EXIT_INVALID_STATE = 7


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
    timeout: float
    json: bool
    lines: int
    follow: bool
    prefix: str


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


def run_daemon(config_path: str, debug: bool, *, cleanup: Callable[[], None] | None = None) -> int:
    import asyncio
    import logging

    from .config import load_config
    from .daemon import Daemon

    debug = debug or bool(os.environ.get("PYTHONASYNCIODEBUG"))
    setup_logging(debug)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:  # what check-config prints: root publishers, unknown users
        logging.getLogger("pubmon").warning("%s: %s", config.path, warning)
    try:
        code = asyncio.run(Daemon(config).run(), debug=debug)
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
    from .output import finish_writing  # logio: queued log lines, a bounded wait for them

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

    from .demo import DEMO_NAMES, demo_config, free_ports

    quotes, trades, news = DEMO_NAMES
    with tempfile.TemporaryDirectory(prefix="pubmon-demo-") as tmp:
        config = Path(tmp) / "pubmon.toml"
        ports = free_ports(5)
        token = Path(tmp) / "http-token"
        token.write_text(os.urandom(18).hex() + "\n")
        token.chmod(0o600)
        config.write_text(demo_config(Path(tmp), ports, token))
        sock = f"--socket {Path(tmp) / 'pubmon.sock'}"
        bin_ = Path(sys.executable).parent / "pubmon"
        pubmon = str(bin_) if bin_.exists() else "pubmon"
        print(
            f"pubmon demo (pid {os.getpid()}): three demo publishers, config {config}\n"
            "Try, in another terminal:\n"
            f"  {pubmon} status {sock}\n"
            f"  {pubmon} tail {quotes} -f {sock}\n"
            f"  {pubmon} restart {trades} {sock}\n"
            f"  {pubmon} counters publisher.{news} {sock}\n"
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
        self._client: WireClient | None = None
        self._tls = bool(args.host and (args.tls_ca or args.tls_cert or args.tls_key))
        self.calls = 0  # answered

    def __enter__(self) -> Remote:
        a = self.args
        try:
            if a.host:
                ctx = _tls_context(a)
                self._client = WireClient(
                    host=a.host, port=a.port, timeout=a.timeout, ssl_context=ctx
                )
            else:
                self._client = WireClient(unix_socket=a.socket, timeout=a.timeout)
        except RpcError as exc:
            cause = exc.__cause__
            if isinstance(cause, PermissionError):
                raise CliError(EXIT_DENIED, f"permission denied: {self.where}") from None
            raise CliError(
                EXIT_NOT_RUNNING, f"cannot reach the daemon at {self.where}: {_why(exc)}"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()

    def call(self, method: str, *args: object) -> Any:
        assert self._client is not None, "call() outside `with Remote(...)`"
        try:
            got = self._client.call(method, *args)
            self.calls += 1
            return got
        except WireException as exc:
            code, prefix = _DECLARED.get(exc.name, (EXIT_ERROR, f"{exc.name}: "))
            raise CliError(code, prefix + exc.message) from None
        except RpcError as exc:
            text = str(exc)
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


def _why(exc: RpcError) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc)


def _resolve(remote: Remote, names: tuple[str, ...]) -> list[Any]:
    """PublisherInfo for each name: an instance name, or a program name (all its instances)."""
    infos = remote.call("listPublishers")
    out = []
    for name in names:
        hits = [i for i in infos if i.name == name] or [i for i in infos if i.program == name]
        if not hits:
            raise CliError(EXIT_UNKNOWN, f"no publisher named {name!r}")
        out.extend(hits)
    return out


def _uptime(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cpu(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    return _uptime(seconds)


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


def _info_dict(i: Any) -> dict[str, object]:
    return {
        "name": i.name,
        "program": i.program,
        "state": i.state,
        "pid": i.pid or None,
        "health": i.health,
        "restarts": i.restarts,
        "last_exit": i.lastExit,
        "last_exit_reason": i.lastExitReason,
        "uptime": i.uptime,
        "port": i.port or None,
        "details": i.statusDetails,
        "cpu_seconds": i.cpuSeconds,
        "memory_bytes": i.memoryBytes,
        "open_fds": i.openFds,
    }


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
    infos = _resolve(remote, a.names) if a.names else remote.call("listPublishers")
    counters = remote.call("getCounters")
    if a.json:
        import json

        out = []
        for i in infos:
            cpu, mem, tasks = _usage(counters, i)
            out.append({**_info_dict(i), "cpu_seconds": cpu, "memory_bytes": mem, "tasks": tasks})
        print(json.dumps(out, indent=1))
        return EXIT_OK
    # CPU, MEM, TASKS: the publisher's cgroup when it has one (pubmon.cgroup), else its process
    # tree in /proc.
    rows = [("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "MEM", "TASKS", "HEALTH",
             "DETAILS")]  # fmt: skip
    for i in infos:
        cpu, mem, tasks = _usage(counters, i)
        rows.append(
            (
                i.name,
                i.state,
                str(i.pid or "-"),
                _uptime(i.uptime),
                str(i.restarts),
                _cpu(cpu),
                _bytes(mem),
                "-" if tasks is None else str(tasks),
                i.health,
                i.statusDetails,
            )
        )
    last = len(rows[0]) - 1
    widths = [max(len(r[c]) for r in rows) for c in range(last)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(last)) + "  " + r[last])
    return EXIT_OK


def cmd_action(remote: Remote, a: Args) -> int:
    method = {"start": "startPublisher", "stop": "stopPublisher", "restart": "restartPublisher",
              "pause": "pausePublisher", "resume": "resumePublisher"}  # fmt: skip
    code = EXIT_OK
    for info in _resolve(remote, a.names):
        try:
            i = remote.call(method[a.command], info.name)
        except CliError as exc:
            where = "" if info.name in str(exc) else f"{info.name}: "
            print(f"pubmon: {where}{exc}", file=sys.stderr)
            code = code or exc.code
            continue
        pid = f" pid {i.pid}" if i.pid else ""
        extra = f" ({i.statusDetails})" if i.state not in ("RUNNING", "STOPPED", "PAUSED") else ""
        print(f"{i.name}: {i.state}{pid}{extra}")
    return code


def cmd_reload(remote: Remote, a: Args) -> int:
    r = remote.call("reloadConfig")
    unchanged = []
    for c in r.publishers or ():
        if c.change == "unchanged":
            unchanged.append(c.name)
        else:
            fields = f" ({', '.join(c.fields)})" if c.fields else ""
            print(f"{c.name}: {c.change}{fields}")
    if unchanged:
        print(f"unchanged: {', '.join(unchanged)}")
    for line in r.daemon or ():
        print(line)
    if not r.publishers and not r.daemon:
        print("nothing to do: no publishers")
    return EXIT_OK


def cmd_tail(remote: Remote, a: Args) -> int:
    name = a.names[0]
    want = min(max(a.lines, 0), 10000)
    # afterSeq < 0 asks for the last -afterSeq lines; -n 0 asks for one only to learn the
    # cursor (0 would mean "from the start of the ring").
    chunk = remote.call("tailLog", name, -max(want, 1), 10000)
    cursor = chunk.nextSeq
    if want > 0:
        # Replies are capped in size: the newest lines come first, the older ones they left
        # out (from nextSeq - want + missed up to the first line sent) are fetched page by page.
        first = chunk.lines[0].seq if chunk.lines else cursor + 1
        older = max(0, cursor - want + chunk.missed)
        while older < first - 1:
            page = remote.call("tailLog", name, older, first - 1 - older)
            if not page.lines or page.nextSeq <= older:
                break
            _print_lines([x for x in page.lines if x.seq < first])
            older = page.nextSeq
        _print_lines(chunk.lines)
    while a.follow:
        try:
            chunk = remote.call("tailLog", name, cursor, 1000)
        except CliError as exc:
            if exc.code != EXIT_NOT_RUNNING:
                raise
            remote = _reconnect(remote)
            continue
        if chunk.missed:
            print(f"... {chunk.missed} line(s) missed ...", file=sys.stderr)
        _print_lines(chunk.lines)
        cursor = chunk.nextSeq
    return EXIT_OK


def _reconnect(remote: Remote) -> Remote:
    # The daemon went away (restart): keep trying, as `tail -F` does.
    remote.__exit__()
    while True:
        try:
            return Remote(remote.args).__enter__()
        except CliError:
            time.sleep(0.5)


def _print_lines(lines: list[Any]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(line.text + ("" if line.partial else "\n"))
    out.flush()


def cmd_counters(remote: Remote, a: Args) -> int:
    counters = remote.call("getCounters")
    for key in sorted(counters):
        if key.startswith(a.prefix):
            print(f"{key} {counters[key]}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Remote, Args], int]] = {
    "status": cmd_status,
    "start": cmd_action,
    "stop": cmd_action,
    "restart": cmd_action,
    "pause": cmd_action,
    "resume": cmd_action,
    "reload": cmd_reload,
    "tail": cmd_tail,
    "counters": cmd_counters,
}


def _remote_main(a: Args) -> int:
    with Remote(a) as remote:
        return COMMANDS[a.command](remote, a)


def _parse(argv: list[str] | None) -> tuple[dict[str, Any], Args | None]:
    raw: dict[str, Any] = docopt(__doc__, argv=argv, version=f"pubmon {__version__}")
    command = next((c for c in COMMANDS if raw.get(c)), None)
    if command is None:
        return raw, None
    try:
        args = Args(
            command=command,
            names=tuple(raw["NAME"]) if isinstance(raw["NAME"], list) else (raw["NAME"],),
            socket=raw["--socket"],
            host=raw["--host"],
            port=int(raw["--port"]),
            tls_ca=raw["--tls-ca"],
            tls_cert=raw["--tls-cert"],
            tls_key=raw["--tls-key"],
            timeout=float(raw["--timeout"]),
            json=bool(raw["--json"]),
            lines=int(raw["-n"]),
            follow=bool(raw["-f"]),
            prefix=raw["PREFIX"] or "",
        )
    except ValueError as exc:
        raise CliError(EXIT_ERROR, f"bad argument: {exc}") from None
    if (args.tls_ca or args.tls_cert or args.tls_key) and not args.host:
        raise CliError(EXIT_ERROR, "--tls-ca, --tls-cert and --tls-key go with --host")
    return raw, args


def main(argv: list[str] | None = None) -> int:
    try:
        raw, args = _parse(argv)
        if raw["daemon"]:
            return run_daemon(raw["--config"], bool(raw["--debug"]))
        if raw["demo"]:
            return run_demo(debug=bool(raw["--debug"]))
        if raw["check-config"]:
            from .config import check_config_main

            return check_config_main(raw["FILE"])
        assert args is not None
        return _remote_main(args)
    except CliError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pubmon tail -f x | head`
        return EXIT_OK

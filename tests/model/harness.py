"""The real things the model drives: config files, a `pubmon daemon` process, RPC and CLI calls,
and the NOTIFY_SOCKET the daemon reports to.

Hypothesis drives a state machine synchronously, so everything asynchronous (Thrift calls with
the project's client, the datagram socket that plays systemd) runs on one event loop in a
background thread; the machine waits on its futures with a bound, and may also leave a call in
flight (`Rpc.submit`) to send a signal while the daemon works on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control import control
from daemons import toml_value
from pubmon.errors import RpcError

from .stuckfs import STUCK

PUBMON = str(Path(sys.executable).parent / "pubmon")
CHILD = str(Path(__file__).with_name("model_child.py"))
NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")

STOP_TIMEOUT = 1.0  # every publisher's stop_timeout
SHUTDOWN_TIMEOUT = 8.0  # [daemon] shutdown_timeout
# Issue 10: a child that outlives SIGKILL by this long is reported, and the daemon's shutdown
# ends within shutdown_timeout + this ("say 10 s").
KILL_BOUND = 10.0
# What a busy 2-core box may add to any bound derived from the config (scheduling, forks, the
# Python start-up of children and CLI calls). Bounds tell a hang from slowness; speed is bench's.
GRACE = 10.0
DEAD_CRASH_LOOP = 3  # crash_loop.max_restarts of a publisher whose probe can never pass
BROKEN = "noint"  # the publisher whose `#!` interpreter is missing


@dataclass(frozen=True)
class PubSpec:
    """One publisher as the model writes it into the config file."""

    name: str
    term_delay: float = 0.0  # > 0: ignores SIGTERM that long (> STOP_TIMEOUT: gets SIGKILL)
    restart: str = "always"  # always | on-failure | never
    probe: str = "none"  # none | live (tcp on its own port) | dead (tcp on a refused port)
    version: int = 0  # MODEL_VERSION in its environment: a spawn setting
    slow_ready: bool = False  # probe none: start_timeout 0.8 instead of 0 (RUNNING later)

    @property
    def start_timeout(self) -> float:
        if self.probe == "live":
            return 5.0  # polled until the child listens; RUNNING as soon as it does
        if self.probe == "dead":
            return 0.3
        return 0.8 if self.slow_ready else 0.0

    def spawn_key(self) -> tuple[object, ...]:
        return (self.term_delay, self.version)

    def settings(self) -> tuple[object, ...]:
        """What the config file says (slow_ready means nothing with a probe)."""
        return (self.term_delay, self.version, self.restart, self.probe, self.start_timeout)


@dataclass(frozen=True)
class ModelConfig:
    publishers: tuple[PubSpec, ...]
    allow_nobody: bool = True
    broken: bool = True  # include the `#!`-without-interpreter publisher

    def get(self, name: str) -> PubSpec | None:
        return next((p for p in self.publishers if p.name == name), None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.publishers] + ([BROKEN] if self.broken else [])


class Ports:
    """Per publisher name: a port its child listens on, and a port that refuses connections
    (a TCP socket bound but not listening, held for the whole test so no one else takes it)."""

    def __init__(self, names: list[str]) -> None:
        self._held: list[socket.socket] = []
        self.live: dict[str, int] = {}
        self.dead: dict[str, int] = {}
        for name in names:
            self.live[name] = self._hold()
            self.dead[name] = self._hold()
        for s in self._held[0::2]:  # release the live ones: the children bind them
            s.close()

    def _hold(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self._held.append(s)
        return int(s.getsockname()[1])

    def close(self) -> None:
        for s in self._held:
            s.close()


def render(cfg: ModelConfig, work: Path, ports: Ports) -> str:
    """The TOML text of a model config."""
    uids = [0, 65534] if cfg.allow_nobody else [0]
    out = [
        "[daemon]",
        f"shutdown_timeout = {SHUTDOWN_TIMEOUT}",
        f"log_dir = {toml_value(str(work / 'logs'))}",
        "[control]",
        f"socket = {toml_value(str(work / 'pubmon.sock'))}",
        f"allow_uids = {toml_value(uids)}",
        "[monitor]",
        'listen = ""',
    ]
    common = [
        f"stop_timeout = {STOP_TIMEOUT}",
        "backoff = { initial = 0.05, max = 0.2, factor = 2, jitter = 0 }",
    ]
    stuck = str(work / "stuck" / STUCK)
    for p in cfg.publishers:
        term = f"{p.term_delay:g}"
        crash = DEAD_CRASH_LOOP if p.probe == "dead" else 1000
        out += [
            f"[publisher.{p.name}]",
            f"command = {toml_value([sys.executable, '-S', CHILD, '{port}', term, stuck])}",
            f"port = {ports.live[p.name]}",
            f'environment = {{ MODEL_VERSION = "{p.version}" }}',
            f"restart = {toml_value(p.restart)}",
            f"start_timeout = {p.start_timeout}",
            f"crash_loop = {{ max_restarts = {crash}, window = 60 }}",
            *common,
        ]
        if p.probe != "none":
            port = ports.dead[p.name] if p.probe == "dead" else ports.live[p.name]
            out += [
                f"[publisher.{p.name}.probe]",
                'kind = "tcp"',
                f"port = {port}",
                "interval = 0.3",
                "timeout = 0.3",
                "failure_threshold = 2",
            ]
    if cfg.broken:
        out += [
            f"[publisher.{BROKEN}]",
            f"command = {toml_value([str(work / 'noint.sh')])}",
            "start_timeout = 0",
            *common,
        ]
    return "\n".join(out) + "\n"


BROKEN_TEXTS = (
    "[daemon\nshutdown_timeout = 8\n",  # not TOML
    '[daemon]\nshutdown_timeout = "soon"\n',  # wrong type
    "[publisher.x]\ncommand = []\n",  # empty command
    "[publisher.x]\ncommand = ['true']\nrestart = 'sometimes'\n",  # bad choice
    "[nonsense]\n",  # unknown section
)


# --- what a call came back with --------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How a request ended: ok (with the value), refused (the IDL exception's name), closed (the
    connection went away: only acceptable while the daemon is going down) or hang."""

    kind: str  # ok | refused | closed | hang
    value: Any = None
    reason: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        what = self.reason or (repr(self.value)[:200] if self.value is not None else "")
        return f"{self.kind} after {self.seconds:.2f} s {what}"


REFUSALS = {"InvalidState", "UnknownPublisher", "ConfigError"}


class Loop:
    """An event loop in a daemon thread, for the async client and the notify socket."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="model")
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


async def _rpc(sock: Path, bound: float, method: str, *args: object) -> Answer:
    began = time.monotonic()
    try:
        async with asyncio.timeout(bound):
            async with control(sock, timeout=bound + 1) as client:
                value = await client.call(method, *args)
    except TimeoutError:
        return Answer("hang", seconds=time.monotonic() - began, reason=f"{method} {args}")
    except RpcError as exc:
        # The daemon answered with an internal error (an exception the IDL does not declare):
        # an error, not a refusal. Anything else is the connection going away.
        gone = ("closed", "reset", "Broken pipe", "cannot connect", "EOF")
        kind = "closed" if any(g in str(exc) for g in gone) else "error"
        return Answer(kind, reason=str(exc), seconds=time.monotonic() - began)
    except Exception as exc:
        name = type(exc).__name__
        if name not in REFUSALS:
            raise
        msg = getattr(exc, "message", str(exc))
        return Answer("refused", reason=f"{name}: {msg}", seconds=time.monotonic() - began)
    return Answer("ok", value, seconds=time.monotonic() - began)


# CLI exit codes (cli.py) the model accepts as a refusal with a reason
_CLI_REFUSALS = {2: "ConfigError", 6: "UnknownPublisher", 7: "InvalidState"}


def cli(sock: Path, bound: float, *args: str, user: tuple[str, ...] = ()) -> Answer:
    """Run `pubmon ARGS --socket SOCK` (as another user with `user`); the answer's value is
    (exit code, stdout, stderr)."""
    argv = [*user, PUBMON, *args, "--socket", str(sock), "--timeout", f"{bound:g}"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    began = time.monotonic()
    try:
        got = subprocess.run(argv, capture_output=True, text=True, timeout=bound + 5, env=env)
    except subprocess.TimeoutExpired:
        return Answer("hang", reason=" ".join(args), seconds=time.monotonic() - began)
    took = time.monotonic() - began
    value = (got.returncode, got.stdout, got.stderr)
    if got.returncode == 0:
        return Answer("ok", value, seconds=took)
    if got.returncode in _CLI_REFUSALS:
        return Answer("refused", value, reason=_CLI_REFUSALS[got.returncode], seconds=took)
    if got.returncode == 4:
        return Answer("closed", value, reason=got.stderr.strip(), seconds=took)
    return Answer("error", value, reason=got.stderr.strip(), seconds=took)


# --- the service manager's side of NOTIFY_SOCKET ---------------------------------------------


@dataclass
class Notifications:
    """Every datagram the daemon sent, as (monotonic time, fields); `on_ready` runs (on the
    loop) when the first READY=1 arrives, to look at the publishers at that very moment."""

    path: Path
    on_ready: Callable[[], Coroutine[Any, Any, None]] | None = None
    messages: list[tuple[float, list[str]]] = field(default_factory=list)
    ready_checks: list[concurrent.futures.Future[None] | asyncio.Task[None]] = field(
        default_factory=list
    )
    _transport: asyncio.DatagramTransport | None = None

    async def open(self) -> None:
        self.path.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        notifications = self

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                fields = data.decode(errors="replace").split("\n")
                notifications.messages.append((time.monotonic(), fields))
                if "READY=1" in fields and notifications.on_ready is not None:
                    notifications.ready_checks.append(loop.create_task(notifications.on_ready()))

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        transport, _ = await loop.create_datagram_endpoint(Proto, sock=sock)
        self._transport = transport

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for task in self.ready_checks:
            if isinstance(task, asyncio.Task):
                await asyncio.gather(task, return_exceptions=True)


# --- /proc ---------------------------------------------------------------------------------


def catches(pid: int, *sigs: signal.Signals) -> bool:
    """True once `pid` has handlers for all of `sigs` (SigCgt in /proc/PID/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return all(mask & (1 << (s - 1)) for s in sigs)
    return False


def wait_for(check: Callable[[], Any], what: str, bound: float, step: float = 0.02) -> Any:
    """Poll `check()` until it returns something truthy (returned), at most `bound` seconds."""
    deadline = time.monotonic() + bound
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what}")
        time.sleep(step)

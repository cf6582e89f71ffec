"""The chaos run's publishers: what kinds there are, their config text, what the driver expects.

Each `Pub` carries what the driver believes about it: whether the operator (or a fault the
restart policy does not forgive) left it wanted, the state it must settle in, and the counters
(`restarts`, `exits`) the daemon must report for it. Only the driver changes these, and only
while it holds the publisher (`busy`), so no two actions on one publisher overlap.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from daemons import toml_publisher
from pubmon.config.model import ProbeSpec, PublisherSpec
from pubmon.core.probe import make_probe

CHILD = Path(__file__).with_name("chaos_child.py")
PY = sys.executable

# plain: the chaos child; stubborn: the chaos child ignoring SIGTERM; demo: pubmon.demo with an
# fb303 probe; doomed: exits at once every time (crash loop -> FATAL); fatal: cannot be spawned.
KINDS = ("plain", "stubborn", "demo", "doomed", "fatal")
LINE_KINDS = ("plain", "stubborn")  # write numbered lines and record them
FAULTABLE = ("plain", "stubborn", "demo")
DOOMED_MAX_RESTARTS = 3
NO_SUCH_USER = "pubmon-chaos-no-such-user"


def fb303_probe_available() -> bool:
    """The fb303 probe is another engineer's work in progress: use demo publishers once it is in."""
    spec = PublisherSpec(
        name="x", program="x", command=("true",), probe=ProbeSpec(kind="fb303", port=1)
    )
    try:
        probe = make_probe(spec)
    except NotImplementedError:
        return False
    return probe is not None


@dataclass
class Env:
    """Where one chaos run keeps its things, and the settings every publisher shares."""

    tmp: Path
    token: str  # PUBMON_CHAOS in every publisher's environment: finds leftovers anywhere
    minutes: float
    monitor_port: int
    max_bytes: int = 64 * 1024
    max_line: int = 16 * 1024
    ring_lines: int = 200

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    @property
    def socket(self) -> Path:
        return self.tmp / "pubmon.sock"

    @property
    def config(self) -> Path:
        return self.tmp / "pubmon.toml"

    @property
    def not_executable(self) -> Path:
        return self.tmp / "not-executable"

    @property
    def backups(self) -> int:
        # Enough rotated files to keep every line of the run (checked: the last one must not
        # exist at the end). ~150 KB per publisher per minute measured, files of 64 KiB.
        return int(20 + 12 * self.minutes)

    def prepare(self) -> None:
        self.state.mkdir()
        self.not_executable.write_text("#!/bin/sh\nexit 0\n")
        self.not_executable.chmod(0o644)

    def header(self) -> str:
        return (
            "[daemon]\n"
            f'log_dir = "{self.logs}"\n'
            "shutdown_timeout = 30\n"
            "[control]\n"
            f'socket = "{self.socket}"\n'
            "[monitor]\n"
            f'listen = "127.0.0.1:{self.monitor_port}"\n'
            "max_connections = 256\n"
        )


@dataclass(eq=False)
class Pub:
    name: str
    kind: str
    restart: str = "always"  # always | on-failure | never
    rate: float = 5.0  # ticks a second (line kinds)
    tag: int = 0  # in the environment: bumping it is a spawn change (restart on reload)
    stop_timeout: float = 1.0
    autostart: bool = True
    port: int | None = None  # demo
    stable: bool = False  # never removed: followers follow these
    # What the driver expects.
    wanted: bool = True
    expect: str = "RUNNING"
    restarts: int = 0
    exits: int = 0
    busy: bool = False
    actions: int = 0  # driver actions begun on it (an upgrade's pid check skips those touched)
    faults: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.wanted = self.autostart
        self.expect = self.settled_state() if self.autostart else "STOPPED"
        if self.kind == "doomed" and self.autostart:
            self.exits, self.restarts = DOOMED_MAX_RESTARTS + 1, DOOMED_MAX_RESTARTS

    def settled_state(self) -> str:
        """Where a wanted publisher of this kind ends up once left alone."""
        return "FATAL" if self.kind in ("doomed", "fatal") else "RUNNING"

    def started(self) -> None:
        """An operator's start (or restart) of a publisher that was not running."""
        self.wanted = True
        self.expect = self.settled_state()
        if self.kind == "doomed":
            self.exits += DOOMED_MAX_RESTARTS + 1
            self.restarts += DOOMED_MAX_RESTARTS

    def render(self, env: Env) -> str:
        keys: dict[str, object] = {
            "restart": self.restart,
            "autostart": self.autostart,
            "stop_timeout": self.stop_timeout,
            "environment": {"PUBMON_CHAOS": env.token, "CHAOS_TAG": str(self.tag)},
            "backoff": {"initial": 0.05, "max": 0.5, "factor": 2, "jitter": 0.1, "reset_after": 5},
            "crash_loop": {"max_restarts": 100_000, "window": 60},
            "log": {
                "max_bytes": env.max_bytes,
                "backups": env.backups,
                "ring_lines": env.ring_lines,
                "max_line": env.max_line,
            },
        }
        command: list[str]
        if self.kind in LINE_KINDS:
            command = [PY, "-S", str(CHILD), "--state", str(env.state), "--rate", str(self.rate)]
            if self.kind == "stubborn":
                command.append("--ignore-term")
        elif self.kind == "demo":
            command = [PY, "-m", "pubmon.demo", "--pub_port={port}", "--name={name}"]
            keys["port"] = self.port
            keys["start_timeout"] = 15
            keys["probe"] = {
                "kind": "fb303",
                "interval": 1.0,
                "timeout": 1.0,
                "failure_threshold": 2,
            }
        elif self.kind == "doomed":
            command = ["sh", "-c", "exit 3"]
            keys["crash_loop"] = {"max_restarts": DOOMED_MAX_RESTARTS, "window": 60}
        else:
            assert self.kind == "fatal"
            if self.tag % 2:
                command = [str(env.not_executable)]
            else:
                command = ["sleep", "3600"]
                keys["user"] = NO_SUCH_USER
        return toml_publisher(self.name, command, **keys)


def render_config(env: Env, pubs: list[Pub]) -> str:
    return env.header() + "".join(p.render(env) for p in pubs)


def write_config(env: Env, text: str) -> None:
    """Replace the config in place (the daemon holds a lock on the file itself)."""
    with open(env.config, "r+" if env.config.exists() else "w") as f:
        f.seek(0)
        f.write(text)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())

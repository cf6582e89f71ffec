"""Child programs for tests (argv tuples) and builders for specs and configs."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from pubmon.config.model import (
    Backoff,
    Config,
    ControlConfig,
    CrashLoop,
    DaemonConfig,
    MonitorConfig,
    PublisherSpec,
)

PY = sys.executable


def py(code: str) -> tuple[str, ...]:
    return (PY, "-c", code)


SLEEP = ("sleep", "3600")
EXIT0 = ("true",)
EXIT1 = ("sh", "-c", "exit 1")
IGNORE_TERM = py(
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    "while True: time.sleep(3600)\n"
)
# A child that forks a grandchild into its own group, prints the grandchild's pid, and waits.
GRANDCHILD = ("sh", "-c", "sleep 3600 & echo $!; wait")
# A child that forks a grandchild and exits at once: the grandchild is orphaned to the daemon.
ORPHANER = ("sh", "-c", "sleep 3600 & echo $!; exit 0")


def numbered(n: int, stream: str = "stdout") -> tuple[str, ...]:
    return py(
        "import sys\n"
        f"out = sys.{stream}\n"
        f"out.writelines(f'line {{i}}\\n' for i in range({n}))\n"
        "out.flush()\n"
    )


def spec(name: str, command: tuple[str, ...] = SLEEP, **kw: Any) -> PublisherSpec:
    """A publisher spec with test-friendly defaults: fast start, fast stop, fast backoff."""
    base = PublisherSpec(
        name=name,
        program=kw.pop("program", name),
        command=command,
        start_timeout=kw.pop("start_timeout", 0.0),
        stop_timeout=kw.pop("stop_timeout", 2.0),
        backoff=kw.pop("backoff", Backoff(initial=0.05, max=0.2, factor=2, jitter=0)),
        crash_loop=kw.pop("crash_loop", CrashLoop(max_restarts=100, window=60)),
    )
    return replace(base, **kw)


def config(*specs: PublisherSpec, log_dir: str | None = None, path: str = "/dev/null") -> Config:
    return Config(
        path=path,
        daemon=DaemonConfig(log_dir=log_dir, shutdown_timeout=30),
        control=ControlConfig(socket=None),
        monitor=MonitorConfig(listen=""),
        publishers=specs,
    )

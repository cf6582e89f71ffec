"""What every contender offers the scenarios: start a config, answer status, be reached by RPC.

Instances are named the same way for all contenders, `<program>:<index>`, whatever the
supervisor calls them itself; each contender maps its own names to these.
"""

from __future__ import annotations

import os
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import procs

Status = dict[str, tuple[str, int]]  # instance -> (state, pid); pid 0 = none


@dataclass(frozen=True, slots=True)
class Program:
    """One program of `numprocs` instances. In argv, "{i}" is the instance index and "{port}"
    the instance's port (port + index)."""

    name: str
    argv: tuple[str, ...]
    numprocs: int = 1
    log: bool = True  # capture output into <workdir>/logs/<program>:<i>.log
    port: int | None = None
    fb303_interval: float | None = None  # probe over fb303 every this many seconds

    def instances(self) -> list[str]:
        return [f"{self.name}:{i}" for i in range(self.numprocs)]


class Conn(Protocol):
    """One connection to the contender's status API."""

    def status(self) -> Status: ...
    def ping(self) -> object: ...  # the cheapest call: fb303 getStatus or the like
    def close(self) -> None: ...


class DaemonDied(RuntimeError):
    pass


class Contender(ABC):
    name: ClassVar[str]

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pid = 0

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} in {self.workdir}>"

    @abstractmethod
    def start(self, programs: list[Program]) -> int:
        """Write the config, start the daemon, return its pid (also kept in self.pid)."""

    @abstractmethod
    def status(self) -> Status:
        """The daemon's own view of its children (one fresh connection)."""

    @abstractmethod
    def connect(self) -> Conn: ...

    @abstractmethod
    def cli_argv(self) -> list[str]:
        """The command an operator types for the status of everything."""

    def unavailable(self, feature: str) -> str | None:
        """Why `feature` ("rpc", "cli", "fb303") cannot be measured here, or None."""
        return None

    def log_path(self, instance: str) -> Path:
        return self.logs / f"{instance}.log"

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def daemon_log_tail(self, lines: int = 15) -> str:
        path = self.workdir / "daemon.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_running(self, names: list[str], timeout: float) -> tuple[float, Status]:
        """Poll status() until every name is RUNNING with a pid. Returns (time.monotonic() of
        the answer that said so, that status). Polls at most half the time: after a call that took t, it sleeps
        max(t, 20 ms), so that a slow status answer does not slow the daemon it measures."""
        start = time.monotonic()
        wanted = set(names)
        while True:
            if procs.exited(self.pid):
                raise DaemonDied(f"{self.name} exited:\n{self.daemon_log_tail()}")
            before = time.monotonic()
            try:
                st = self.status()
            except Exception:  # not listening yet: every client raises its own kind
                st = {}
            now = time.monotonic()
            if all(st.get(n, ("", 0))[0] == "RUNNING" and st[n][1] for n in wanted):
                return now, st
            if now - start > timeout:
                missing = sorted(n for n in wanted if st.get(n, ("", 0))[0] != "RUNNING")
                raise TimeoutError(
                    f"{self.name}: {len(missing)} of {len(wanted)} not RUNNING after "
                    f"{timeout} s (e.g. {missing[:3]})\n{self.daemon_log_tail()}"
                )
            time.sleep(max(now - before, 0.02))

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

import procfs

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
        """Wait until status() says every name is RUNNING with a pid. Returns (time.monotonic()
        of the answer that said so, that status).

        Status is only asked once /proc shows as many children of the daemon as names, all past
        their exec: a status call made while the daemon is spawning would slow the very thing
        measured (and a busy daemon answers late). From then on status is polled every 20 ms.
        """
        start = time.monotonic()
        deadline = start + timeout
        self._wait_children(len(names), deadline)
        wanted = set(names)
        while True:
            if procfs.exited(self.pid):
                raise DaemonDied(f"{self.name} exited:\n{self.daemon_log_tail()}")
            try:
                st = self.status()
            except Exception:  # not listening yet: every client raises its own kind
                st = {}
            now = time.monotonic()
            if all(st.get(n, ("", 0))[0] == "RUNNING" and st[n][1] for n in wanted):
                return now, st
            if now > deadline:
                missing = sorted(n for n in wanted if st.get(n, ("", 0))[0] != "RUNNING")
                raise TimeoutError(
                    f"{self.name}: {len(missing)} of {len(wanted)} not RUNNING after "
                    f"{timeout} s (e.g. {missing[:3]})\n{self.daemon_log_tail()}"
                )
            time.sleep(0.02)

    def _wait_children(self, count: int, deadline: float) -> None:
        """Until the daemon has `count` live children that exec'd (their cmdline is no longer
        the daemon's), or the deadline; /proc only, every 10 ms."""
        mine = procfs.cmdline(self.pid)
        execd: set[int] = set()
        while len(execd) < count and time.monotonic() < deadline:
            if procfs.exited(self.pid):
                raise DaemonDied(f"{self.name} exited:\n{self.daemon_log_tail()}")
            kids = procfs.children(self.pid)
            execd &= kids
            for pid in kids - execd:
                line = procfs.cmdline(pid)
                if line and line != mine and procfs.alive(pid):
                    execd.add(pid)
            time.sleep(0.01)

"""The floor (bench/floor.py): status is one JSON line per request line on its unix socket."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import procfs

from contenders.base import Contender, Program, Status

SCRIPT = Path(__file__).resolve().parents[1] / "floor.py"


class LineConn:
    def __init__(self, socket_path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(30)
        self._sock.connect(str(socket_path))
        self._reader = self._sock.makefile("rb")

    def status(self) -> Status:
        self._sock.sendall(b"\n")
        return {name: ("RUNNING", pid) for name, pid in json.loads(self._reader.readline()).items()}

    def ping(self) -> object:
        return self.status()  # the floor has one call: the status of everything

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


class Floor(Contender):
    name = "floor"
    wrapper: bool | str = False  # True: setpriv + sh; "arm": pubmon's _arm

    @property
    def socket(self) -> Path:
        return self.workdir / "floor.sock"

    def start(self, programs: list[Program]) -> int:
        for p in programs:
            if p.port is not None or p.fb303_interval:
                raise ValueError("the floor has no ports and no probes")
        config = {
            "wrapper": self.wrapper,
            "socket": str(self.socket),
            "log_dir": str(self.logs),
            "programs": [
                {"name": p.name, "argv": list(p.argv), "numprocs": p.numprocs} for p in programs
            ],
        }
        path = self.workdir / "floor.json"
        path.write_text(json.dumps(config))
        self.pid = procfs.start_daemon(
            [sys.executable, str(SCRIPT), str(path)], self.workdir / "daemon.log"
        )
        return self.pid

    def status(self) -> Status:
        conn = LineConn(self.socket)
        try:
            return conn.status()
        finally:
            conn.close()

    def connect(self) -> LineConn:
        return LineConn(self.socket)

    def cli_argv(self) -> list[str]:
        return [sys.executable, str(SCRIPT), "--status", str(self.socket)]

    def unavailable(self, feature: str) -> str | None:
        if feature == "fb303":
            return "the floor has no health probe"
        return None


class WrappedFloor(Floor):
    """The floor, every child behind pubmon's parent-death-signal wrapper (setpriv + sh)."""

    name = "floor+wrapper"
    wrapper = True


class ArmFloor(Floor):
    """The floor, every child behind pubmon's own one-exec wrapper (`pubmon/_arm`, built at
    install when a C compiler is there): what pubmon's spawn costs over the same guarantee
    paid the way pubmon pays it."""

    name = "floor+arm"
    wrapper = "arm"

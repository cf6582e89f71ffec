"""supervisord 4.3 from PyPI, in its own venv; status over XML-RPC on its unix socket.

Settings chosen to match pubmon's: startsecs=0 (RUNNING at once, like start_timeout = 0),
autorestart=true, stdout and stderr into one file per instance with no rotation.
"""

from __future__ import annotations

import http.client
import shlex
import socket
import subprocess
import sys
import xmlrpc.client
from pathlib import Path

import procfs

from contenders.base import Contender, Program, Status

VENV = Path(__file__).resolve().parents[1] / ".venv-supervisor"
REQUIREMENT = "supervisor>=4.3,<4.4"


def ensure_installed() -> Path:
    """Create bench/.venv-supervisor with supervisor in it, unless it is there. Returns its bin."""
    bin_dir = VENV / "bin"
    if not (bin_dir / "supervisord").exists():
        print(f"installing {REQUIREMENT} into {VENV}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(bin_dir / "python"), "-m", "pip", "install", "-q", REQUIREMENT], check=True
        )
    return bin_dir


def version() -> str:
    out = subprocess.run(
        [str(VENV / "bin" / "supervisord"), "--version"], capture_output=True, text=True
    )
    return out.stdout.strip()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """HTTP/1.1 over a unix socket, the connection kept between calls (as supervisorctl does)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: object) -> http.client.HTTPConnection:
        if self._connection[1] is None:
            self._connection = (host, _UnixHTTPConnection(self._path))
        conn = self._connection[1]
        assert conn is not None
        return conn


def _canonical(name: str) -> str:
    program, _, index = name.rpartition("_")
    return f"{program}:{index}"


class XmlRpcConn:
    def __init__(self, socket_path: Path) -> None:
        self._proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_UnixTransport(str(socket_path))
        )

    def status(self) -> Status:
        infos = self._proxy.supervisor.getAllProcessInfo()
        return {_canonical(i["name"]): (i["statename"], i["pid"]) for i in infos}  # type: ignore[union-attr]

    def ping(self) -> object:
        return self._proxy.supervisor.getState()

    def close(self) -> None:
        self._proxy("close")()


class Supervisord(Contender):
    name = "supervisord"

    @property
    def socket(self) -> Path:
        return self.workdir / "supervisor.sock"

    @property
    def config(self) -> Path:
        return self.workdir / "supervisord.conf"

    def start(self, programs: list[Program]) -> int:
        w = self.workdir
        total = sum(p.numprocs for p in programs)
        lines = [
            "[unix_http_server]",
            f"file={self.socket}",
            "chmod=0700",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={w / 'supervisord.log'}",
            f"pidfile={w / 'supervisord.pid'}",
            f"childlogdir={w}",
            # supervisord closes fds 3..minfds-1 in every child before exec: a generous value
            # slows each spawn, so ask for what the children need (pipes and a log file each).
            f"minfds={max(1024, 4 * total + 64)}",
            f"minprocs={max(200, total + 64)}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{self.socket}",
        ]
        for p in programs:
            if p.port is not None:
                raise ValueError("supervisord has no per-instance port expansion here")
            command = shlex.join(a.replace("%", "%%") for a in p.argv)
            log = f"{self.logs}/%(program_name)s:%(process_num)d.log" if p.log else "NONE"
            lines += [
                f"[program:{p.name}]",
                f"command={command.replace('{i}', '%(process_num)d')}",
                "process_name=%(program_name)s_%(process_num)d",
                f"numprocs={p.numprocs}",
                "startsecs=0",
                "autorestart=true",
                "redirect_stderr=true",
                f"stdout_logfile={log}",
                "stdout_logfile_maxbytes=0",
                "stdout_logfile_backups=0",
            ]
        self.config.write_text("\n".join(lines) + "\n")
        argv = [str(VENV / "bin" / "supervisord"), "-c", str(self.config)]
        self.pid = procfs.start_daemon(argv, w / "daemon.log")
        return self.pid

    def status(self) -> Status:
        conn = XmlRpcConn(self.socket)
        try:
            return conn.status()
        finally:
            conn.close()

    def connect(self) -> XmlRpcConn:
        return XmlRpcConn(self.socket)

    def cli_argv(self) -> list[str]:
        return [str(VENV / "bin" / "supervisorctl"), "-c", str(self.config), "status"]

    def unavailable(self, feature: str) -> str | None:
        if feature == "fb303":
            return "supervisord has no health probe"
        return None

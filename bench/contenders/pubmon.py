"""pubmon: `pubmon daemon --config FILE`, status over its Thrift control socket.

The tree it runs from is byte-compiled first (`_compiled`): a wheel is compiled when pip installs
it, but this checkout is an editable install, and where PYTHONDONTWRITEBYTECODE is set (it is on
the bench machine) every daemon start compiled ~60 modules from source again. Measured for
issue 16 (200 `sleep` publishers, CPU time of the daemon to all RUNNING, 3 runs each): 380-390 ms
from source, 270-290 ms compiled; its RSS 1.1 MB lower (36.4 vs 35.3 MB).

Until the control socket existed, status came from /proc (children of the daemon carrying
PUBMON_PUBLISHER=<name>); that path is kept as `proc_status()` for builds without
`listPublishers`, and as a cross-check.
"""

from __future__ import annotations

import asyncio
import compileall
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import procfs

from contenders.base import Contender, Program, Status

PUBMON = Path(sys.executable).with_name("pubmon")  # the console script of the same venv


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return ""
    return Path(spec.origin).read_text()


_compiled_trees: set[Path] = set()


def _compiled(src: Path | None) -> None:
    """Byte-compile the pubmon package that `src` (None: the installed one) runs, once per tree.
    compileall writes the .pyc files even under PYTHONDONTWRITEBYTECODE; Python then reads them."""
    if src is not None:
        package = src / "pubmon"
    else:
        spec = importlib.util.find_spec("pubmon")
        if spec is None or spec.origin is None:
            return
        package = Path(spec.origin).parent
    if package not in _compiled_trees:
        compileall.compile_dir(package, quiet=1)
        _compiled_trees.add(package)


def thrift_available() -> bool:
    return "def listPublishers" in _module_source("pubmon.service.handler")


def fb303_available() -> str | None:
    """None when the demo publisher and the fb303 probe both exist; else what is missing."""
    if importlib.util.find_spec("pubmon.demo") is None:
        return "pubmon.demo (the fb303 demo publisher) not yet available"
    from pubmon.config.model import ProbeSpec, PublisherSpec
    from pubmon.core.probe import make_probe

    spec = PublisherSpec(
        name="x", program="x", command=("true",), probe=ProbeSpec(kind="fb303", port=1)
    )

    async def try_probe() -> None:
        probe = make_probe(spec)
        assert probe is not None
        await probe.close()

    try:
        asyncio.run(try_probe())
    except NotImplementedError:
        return "the fb303 probe is not yet available in pubmon.core.probe"
    return None


def _toml(value: object) -> str:
    return json.dumps(value)  # JSON strings, numbers and lists are valid TOML


def _canonical(name: str) -> str:
    return name if ":" in name else f"{name}:0"  # numprocs = 1 gives the bare program name


class ThriftConn:
    """A blocking thriftpy2 client on the control socket: binary protocol, framed, both in
    thriftpy2's Cython codec (its pure-Python decoder alone takes ~30 ms for 1000 publishers)."""

    def __init__(self, socket_path: Path) -> None:
        from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory
        from thriftpy2.rpc import make_client
        from thriftpy2.transport import TCyFramedTransportFactory

        from pubmon.thrift import idl

        self._client: Any = make_client(
            idl.pubmon().PubmonService,
            unix_socket=str(socket_path),
            proto_factory=TCyBinaryProtocolFactory(),
            trans_factory=TCyFramedTransportFactory(),
            timeout=30_000,
        )

    def status(self) -> Status:
        return {_canonical(i.name): (i.state, i.pid) for i in self._client.listPublishers()}

    def ping(self) -> object:
        return self._client.getStatus()

    def close(self) -> None:
        self._client.close()


class Pubmon(Contender):
    name = "pubmon"
    _programs: list[Program] = []  # set by start(): log_path() needs the numprocs
    src: Path | None = None  # run the daemon from this source tree (PYTHONPATH), for A/B runs

    @property
    def socket(self) -> Path:
        return self.workdir / "pubmon.sock"

    def start(self, programs: list[Program]) -> int:
        self._programs = programs
        lines = [
            "[daemon]",
            f"log_dir = {_toml(str(self.logs))}",
            "[control]",
            f"socket = {_toml(str(self.socket) if thrift_available() else '')}",
            "[monitor]",
            'listen = ""',
        ]
        for p in programs:
            argv = [a.replace("{i}", "{index}") for a in p.argv]
            lines += [
                f"[publisher.{p.name}]",
                f"command = {_toml(argv)}",
                f"numprocs = {p.numprocs}",
                "start_timeout = 30" if p.fb303_interval else "start_timeout = 0",
                "log = { max_bytes = 0 }",  # no rotation: the logs scenario reads one file
            ]
            if p.port is not None:
                lines.append(f"port = {p.port}")
            if p.fb303_interval:
                lines += [
                    f"[publisher.{p.name}.probe]",
                    'kind = "fb303"',
                    f"interval = {p.fb303_interval}",
                    f"timeout = {min(2.0, p.fb303_interval)}",
                ]
        config = self.workdir / "pubmon.toml"
        config.write_text("\n".join(lines) + "\n")
        env = None if self.src is None else {**os.environ, "PYTHONPATH": str(self.src)}
        _compiled(self.src)
        self.pid = procfs.start_daemon(
            [str(PUBMON), "daemon", "--config", str(config)], self.workdir / "daemon.log", env
        )
        return self.pid

    def log_path(self, instance: str) -> Path:
        program = instance.rsplit(":", 1)[0]
        single = any(p.name == program and p.numprocs == 1 for p in self._programs)
        name = program if single else instance.replace(":", "-")  # feed:0 writes feed-0.log
        return self.logs / f"{name}.log"

    def status(self) -> Status:
        if not thrift_available():
            return self.proc_status()
        conn = ThriftConn(self.socket)
        try:
            return conn.status()
        finally:
            conn.close()

    def proc_status(self) -> Status:
        """Children of the daemon that exec'd with PUBMON_PUBLISHER set count as RUNNING."""
        out: Status = {}
        for pid in procfs.children(self.pid):
            name = procfs.environ_value(pid, "PUBMON_PUBLISHER")
            if name is not None and procfs.alive(pid):
                out[_canonical(name)] = ("RUNNING", pid)
        return out

    def connect(self) -> ThriftConn:
        return ThriftConn(self.socket)

    def cli_argv(self) -> list[str]:
        return [str(PUBMON), "status", "--json", "--socket", str(self.socket)]

    def unavailable(self, feature: str) -> str | None:
        if feature in ("rpc", "cli") and not thrift_available():
            return "pubmon's Thrift control socket (listPublishers) is not yet available"
        if feature == "fb303":
            return fb303_available()
        return None

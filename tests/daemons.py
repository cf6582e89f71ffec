"""Run `pubmon daemon` as a real process for tests, and read its state from outside."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from procs import alive, descendants, environ

# Commands for toml_publisher: one that sleeps, one that ignores SIGTERM once it printed "x".
SLEEP = ["sleep", "3600"]
IGNORE_TERM = [
    sys.executable,
    "-c",
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('x', flush=True)\n"
    "while True: time.sleep(3600)",
]


def write_config(tmp: Path, body: str, name: str = "pubmon.toml") -> Path:
    path = tmp / name
    path.write_text(daemon_header(tmp) + body)
    return path


async def wait_file_lines(path: Path, n: int, timeout: float = 10) -> None:
    """Until the file at `path` holds `n` lines."""
    async with asyncio.timeout(timeout):
        while not path.exists() or path.read_text().count("\n") < n:
            await asyncio.sleep(0.01)


def toml_publisher(name: str, command: list[str], **keys: object) -> str:
    lines = [f"[publisher.{name}]", f"command = {toml_value(command)}"]
    keys.setdefault("start_timeout", 0)
    keys.setdefault("stop_timeout", 2)
    for key, value in keys.items():
        lines.append(f"{key} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """`value` as a TOML value: bool, number, string, list or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def daemon_header(tmp: Path, *, log_dir: bool = True, socket: bool = False) -> str:
    text = "[daemon]\nshutdown_timeout = 30\n"
    if log_dir:
        text += f'log_dir = "{tmp / "logs"}"\n'
    text += f'[control]\nsocket = "{tmp / "pubmon.sock" if socket else ""}"\n'
    text += '[monitor]\nlisten = ""\n'
    return text


async def wait_line(seen: list[str], coming: asyncio.Queue[str], text: str, timeout: float) -> str:
    """The first line containing `text`: among the lines `seen` so far, else the next one to
    come through `coming` (a queue fed with every line as it is appended to `seen`)."""
    for line in seen:
        if text in line:
            return line
    async with asyncio.timeout(timeout):
        while True:
            line = await coming.get()
            if text in line:
                return line


@dataclass
class RunningDaemon:
    proc: asyncio.subprocess.Process
    config: Path
    stderr: list[str] = field(default_factory=list)
    _lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    async def wait_log(self, text: str, timeout: float = 10) -> str:
        """Wait for a stderr line containing `text` (lines already seen count)."""
        return await wait_line(self.stderr, self._lines, text, timeout)

    def publisher_pids(self) -> dict[str, int]:
        """The daemon's publishers, by PUBMON_PUBLISHER in their environment."""
        out: dict[str, int] = {}
        for pid in descendants(self.pid):
            try:
                env = environ(pid)
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid != self.pid or not alive(pid):
                continue
            for item in env:
                if item.startswith(b"PUBMON_PUBLISHER="):
                    out[item.split(b"=", 1)[1].decode()] = pid
        return out

    async def wait_publishers(self, n: int, timeout: float = 20) -> dict[str, int]:
        async with asyncio.timeout(timeout):
            while len(pids := self.publisher_pids()) < n:
                await asyncio.sleep(0.02)
        return pids

    async def wait_exit(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


async def start_daemon(
    config: Path,
    *extra: str,
    wrap: tuple[str, ...] = (),
    stdout: int = asyncio.subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> asyncio.subprocess.Process:
    """`pubmon daemon --config config` behind `wrap`, its stderr a pipe (for `pump_stderr`)."""
    return await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-m",
        "pubmon",
        "daemon",
        "--config",
        str(config),
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )


async def pump_stderr(
    proc: asyncio.subprocess.Process, seen: list[str], coming: asyncio.Queue[str]
) -> None:
    """Each line of `proc`'s stderr appended to `seen` and put to `coming` (for `wait_line`)."""
    assert proc.stderr is not None
    async for raw in proc.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        seen.append(line)
        coming.put_nowait(line)


@asynccontextmanager
async def run_daemon(
    config: Path,
    *extra: str,
    ready: bool = True,
    wrap: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> AsyncIterator[RunningDaemon]:
    """Start `pubmon daemon --config config` (behind `wrap`, e.g. setpriv; with `env` added to
    ours); on exit make sure it and its children are gone."""
    proc = await start_daemon(config, *extra, wrap=wrap, env=env)
    d = RunningDaemon(proc, config)
    pump = asyncio.ensure_future(pump_stderr(proc, d.stderr, d._lines))
    try:
        if ready:
            await d.wait_log("ready:", timeout=30)
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        async with asyncio.timeout(10):
            await pump

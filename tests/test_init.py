"""pubmon as an init (pubmon.daemon.init): PID 1 of a private PID namespace, as in a container.

Each test boots `pubmon daemon` under `setpriv --pdeathsig KILL unshare --pid --fork
--mount-proc --kill-child=SIGKILL`: the daemon is the namespace's init, so every orphan of the
namespace lands on it and the kernel drops any signal it has no handler for. The matrix is the
one tini and dumb-init test: orphans reaped (also those of a publisher that exits at once),
each handled signal, exit statuses, a child that ignores SIGTERM, nothing left behind, and
publisher lines on stdout under a flood.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemons import IGNORE_TERM, SLEEP, pump_stderr, start_daemon, toml_publisher, wait_line
from procs import children, descendants, state

UNSHARE = (
    "setpriv", "--pdeathsig", "KILL",
    "unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL",
)  # fmt: skip


# Forks a helper into its own session that says "bye" into a file when SIGTERM comes, and
# exits once the helper is ready (as a daemonizing program does).
DAEMONIZER = """
import os, signal, sys, time
ready, bye = sys.argv[1:]
if os.fork() == 0:
    os.setsid()
    def term(*_):
        with open(bye, "w") as f:
            f.write("bye\\n")
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    while True:
        time.sleep(3600)
while not os.path.getsize(ready) if os.path.exists(ready) else True:
    time.sleep(0.01)
"""


def _cannot_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return "unshare/setpriv (util-linux) not installed"
    try:
        subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a PID namespace here: {exc}"
    return None


pytestmark = pytest.mark.skipif(
    (why := _cannot_unshare()) is not None, reason=why or "", allow_module_level=False
)


def header(tmp: Path, *, socket: bool = False, extra: str = "") -> str:
    # No log_dir: as PID 1 publisher lines then go to stdout by default.
    sock = tmp / "pubmon.sock" if socket else ""
    return (
        f"[daemon]\nshutdown_timeout = 30\n{extra}"
        f'[control]\nsocket = "{sock}"\n[monitor]\nlisten = ""\n'
    )


@dataclass
class Pid1:
    proc: asyncio.subprocess.Process  # unshare, outside the namespace
    stdout: bytearray = field(default_factory=bytearray)
    stderr: list[str] = field(default_factory=list)
    _lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _init: int | None = None
    _out: asyncio.Event = field(default_factory=asyncio.Event)
    pumps: list[asyncio.Future[None]] = field(default_factory=list)
    reading: bool = False

    def read_stdout(self) -> None:
        if not self.reading:
            self.reading = True
            self.pumps.append(asyncio.ensure_future(_pump_out(self)))

    @property
    def init(self) -> int:
        """pubmon's host pid: the only child of unshare."""
        if self._init is None:
            (self._init,) = children(self.proc.pid)
        return self._init

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.init, sig)

    async def wait_log(self, text: str, timeout: float = 15) -> str:
        return await wait_line(self.stderr, self._lines, text, timeout)

    async def wait_stdout(self, text: bytes, timeout: float = 15) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.stdout:
                self._out.clear()
                await self._out.wait()

    async def wait_ended(self, name: str, timeout: float = 15) -> str:
        """Until `name` went EXITED (from STARTING or RUNNING)."""
        pattern = re.compile(rf"\b{re.escape(name)} pid None: \w+ -> EXITED")
        for line in self.stderr:
            if pattern.search(line):
                return line
        async with asyncio.timeout(timeout):
            while True:
                line = await self._lines.get()
                if pattern.search(line):
                    return line

    async def wait_exit(self, timeout: float = 30) -> int:
        self.read_stdout()  # asyncio's wait() returns once the pipes are closed too
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def wait_only_publishers_left(self, n: int, timeout: float = 15) -> None:
        """Until the init's children are exactly `n` live processes: no zombie, no orphan."""
        async with asyncio.timeout(timeout):
            while True:
                kids = children(self.init)
                if len(kids) == n and all(state(p) not in (None, "Z") for p in kids):
                    return
                await asyncio.sleep(0.05)  # a bounded poll of /proc: nothing signals "reaped"


async def _pump_out(d: Pid1) -> None:
    assert d.proc.stdout is not None
    while chunk := await d.proc.stdout.read(1 << 16):
        d.stdout += chunk
        d._out.set()


@asynccontextmanager
async def pid1(
    config: Path, *, ready: bool = True, read_stdout: bool = True
) -> AsyncIterator[Pid1]:
    proc = await start_daemon(config, wrap=UNSHARE, stdout=asyncio.subprocess.PIPE)
    d = Pid1(proc)
    d.pumps.append(asyncio.ensure_future(pump_stderr(proc, d.stderr, d._lines)))
    if read_stdout:
        d.read_stdout()
    try:
        if ready:
            await d.wait_log("ready:")
        yield d
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)  # --kill-child: the namespace goes with it
            await proc.wait()
        d.read_stdout()
        async with asyncio.timeout(10):
            await asyncio.gather(*d.pumps)
        print("\n".join(d.stderr[-30:]))  # shown when the test fails
    stolen = [line for line in d.stderr if "returncode 255" in line or "status 255" in line]
    assert not stolen, stolen


def wait_for(path: Path) -> str:
    """Shell: wait until the file has content (an orphan writes its pid there), then exit."""
    return f"while [ ! -s {path} ]; do sleep 0.01; done; exit 0"


def write(tmp: Path, body: str, **kw: object) -> Path:
    path = tmp / "pubmon.toml"
    path.write_text(header(tmp, **kw) + body)  # type: ignore[arg-type]
    return path


async def test_orphans_are_reaped_and_the_rest_gets_sigterm_before_pid1_exits(
    tmp_path: Path,
) -> None:
    orphan = tmp_path / "orphan"
    quick = tmp_path / "quick"
    bye = tmp_path / "bye"
    ready = tmp_path / "ready"
    body = (
        # A double fork: the subshell exits, its sleep is re-parented to PID 1 and dies later.
        toml_publisher(
            "spawner", ["sh", "-c", f"(sh -c 'echo $$ > {orphan}; sleep 0.3' &); sleep 3600"]
        )
        # A publisher that exits at once, leaving an orphan in its own session.
        # (It waits until the orphan is in its own session: exiting kills its process group.)
        + toml_publisher(
            "quick",
            ["sh", "-c", f"setsid sh -c 'echo $$ > {quick}; sleep 0.3' & {wait_for(quick)}"],
            restart="never",
        )
        # A daemonized helper that must be given SIGTERM, and time, when the container stops.
        + toml_publisher("daemonizer", [sys.executable, "-c", DAEMONIZER, str(ready), str(bye)],
                         restart="never")
    )  # fmt: skip
    async with pid1(write(tmp_path, body)) as d:
        await d.wait_ended("quick")
        async with asyncio.timeout(10):
            while not (orphan.exists() and quick.exists()):
                await asyncio.sleep(0.02)
        # Left: the spawner's shell and the daemonizer's helper; no zombie, no other orphan.
        await d.wait_only_publishers_left(2)
        inside = descendants(d.init)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
        await d.wait_log("other process(es) left: SIGTERM")
        assert bye.read_text() == "bye\n"  # SIGTERM, and it had the time to act on it
        assert not [line for line in d.stderr if "outlived SIGTERM" in line]
        assert not [p for p in inside if state(p) is not None]


async def test_every_signal_an_init_gets_is_handled(tmp_path: Path) -> None:
    async with pid1(write(tmp_path, toml_publisher("a", SLEEP))) as d:
        d.signal(signal.SIGHUP)
        await d.wait_log("reloaded ")
        d.signal(signal.SIGUSR1)
        await d.wait_log("log files reopened")
        d.signal(signal.SIGUSR2)
        await d.wait_log("publishers carried over")  # an upgrade in place, as PID 1 too
        d.signal(signal.SIGQUIT)  # graceful, as SIGTERM: nginx's STOPSIGNAL
        await d.wait_log("SIGQUIT: stopping gracefully")
        assert await d.wait_exit() == 0
        await d.wait_log("a pid None: STOPPING -> STOPPED (stopped (killed by SIGTERM))")


async def test_a_child_that_ignores_sigterm_is_killed_after_its_stop_timeout(
    tmp_path: Path,
) -> None:
    body = toml_publisher("stubborn", IGNORE_TERM, stop_timeout=1)
    async with pid1(write(tmp_path, body)) as d:
        await d.wait_stdout(b"stubborn | x\n")
        d.signal(signal.SIGINT)
        assert await d.wait_exit() == 0
        await d.wait_log("STOPPING -> STOPPED (stopped (killed by SIGKILL))")


async def test_a_second_sigint_kills_at_once(tmp_path: Path) -> None:
    body = toml_publisher("stubborn", IGNORE_TERM, stop_timeout=300)
    async with pid1(write(tmp_path, body)) as d:
        await d.wait_stdout(b"stubborn | x\n")
        d.signal(signal.SIGINT)
        await d.wait_log("SIGINT: stopping gracefully")
        d.signal(signal.SIGINT)
        assert await d.wait_exit(timeout=30) == 0  # not the 300 s stop_timeout
        await d.wait_log("SIGINT again: killing every publisher now")


@pytest.mark.parametrize(
    ("script", "status"), [("exit 3", 3), ("ulimit -c 0; kill -SEGV $$", 139), ("exit 0", 0)]
)
async def test_a_critical_publisher_that_ends_ends_pid1_with_its_status(
    tmp_path: Path, script: str, status: int
) -> None:
    body = toml_publisher("other", SLEEP) + toml_publisher(
        "main", ["sh", "-c", f"sleep 0.2; {script}"], critical=True, restart="never"
    )
    async with pid1(write(tmp_path, body), ready=False) as d:
        assert await d.wait_exit() == status
        await d.wait_log("critical publisher main EXITED")
        await d.wait_log("other pid None: STOPPING -> STOPPED")  # stopped in order, not dropped


async def test_stdout_under_a_flood_from_20_publishers_loses_and_mixes_no_line(
    tmp_path: Path,
) -> None:
    n = 1500
    flood = flood_script(n, 300)
    body = "".join(toml_publisher(f"p{i}", flood, restart="never") for i in range(20))
    async with pid1(write(tmp_path, body), ready=False) as d:
        for i in range(20):
            await d.wait_ended(f"p{i}", timeout=60)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    line = re.compile(rb"(p\d+) ([|!]) (p\d+) (\d+) (x*)")
    seen: dict[tuple[bytes, bytes], list[int]] = {}
    text = bytes(d.stdout)
    assert text.endswith(b"\n")
    for raw in text.split(b"\n")[:-1]:
        m = line.fullmatch(raw)
        assert m, raw[:200]
        name, mark, own, i, xs = m.groups()
        assert name == own and len(xs) == int(i) * 37 % 300
        assert mark == (b"!" if int(i) % 4 == 3 else b"|")
        seen.setdefault((name, mark), []).append(int(i))
    assert len(seen) == 40
    for (_, mark), numbers in seen.items():
        want = [i for i in range(n) if (i % 4 == 3) == (mark == b"!")]
        assert numbers == want


def flood_script(n: int, width: int) -> list[str]:
    """A publisher writing n numbered lines of 0..width-1 x's, every fourth one to stderr."""
    return [
        sys.executable,
        "-c",
        "import os, sys\n"
        "name = os.environ['PUBMON_PUBLISHER']\n"
        f"for i in range({n}):\n"
        "    out = sys.stderr if i % 4 == 3 else sys.stdout\n"
        f"    out.write('%s %d ' % (name, i) + 'x' * (i * 37 % {width}) + '\\n')\n"
        "    if i % 50 == 0: out.flush()\n",
    ]


async def test_a_stdout_nobody_reads_drops_counted_lines_and_stalls_nothing(
    tmp_path: Path,
) -> None:
    from pubmon.thrift.blocking import BlockingClient

    n, pubs = 1500, 20  # ~15 MB: more than the pipe and the 4 MiB buffer hold
    body = "".join(
        toml_publisher(f"p{i}", flood_script(n, 1000), restart="never") for i in range(pubs)
    ) + toml_publisher("steady", SLEEP)
    async with pid1(write(tmp_path, body, socket=True), read_stdout=False) as d:
        for i in range(pubs):
            await d.wait_ended(f"p{i}", timeout=60)  # supervision went on
        client = BlockingClient(unix_socket=str(tmp_path / "pubmon.sock"), timeout=5)
        try:
            counters = await asyncio.to_thread(client.call, "getCounters")
        finally:
            client.close()
        assert counters["daemon.stdout_dropped"] > 0
        assert counters["daemon.stdout_lines"] + counters["daemon.stdout_dropped"] == n * pubs
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0  # not held up by the writer stuck on a full pipe
        warnings = [line for line in d.stderr if "stdout: dropping publisher lines" in line]
        assert len(warnings) == 1  # once per episode


async def test_status_details_name_the_critical_publisher(tmp_path: Path) -> None:
    from pubmon.thrift.blocking import BlockingClient

    body = toml_publisher("slow", IGNORE_TERM, stop_timeout=2) + toml_publisher(
        "main", ["sh", "-c", "sleep 0.5; exit 3"], critical=True, restart="never"
    )
    async with pid1(write(tmp_path, body, socket=True)) as d:
        await d.wait_log("critical publisher main EXITED")
        client = BlockingClient(unix_socket=str(tmp_path / "pubmon.sock"), timeout=5)
        try:
            details = await asyncio.to_thread(client.call, "getStatusDetails")
        finally:
            client.close()
        assert "stopping: critical publisher main EXITED: exit status 3" in details
        assert await d.wait_exit() == 3

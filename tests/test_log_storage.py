"""Log storage that hangs, and log files swapped for links: the daemon goes on and stays safe.

A real `pubmon daemon` writes its publishers' logs into a FUSE file system of our own
(`hangfs.py`, a loopback over a folder) that the test tells to hang and to recover, as a dead
NFS server or FUSE daemon would: every write blocks in the kernel. The daemon must go on
answering RPC, supervising and feeding `tailLog`, count what the file misses, write again once
the storage recovers, and stop without hanging on it.

Then, on plain storage, a log file replaced by a symlink or a hard link to a root-owned victim:
the daemon (root) must refuse to write through it, say so, and count the bytes as dropped.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control import control, poll
from daemons import RunningDaemon, run_daemon, toml_publisher
from procs import state

HANGFS = Path(__file__).with_name("hangfs.py")
# ~8 MB/s of numbered 100-byte lines ("line 000000001 xxx...\n"): enough to fill the log
# writer's queue within seconds of a hang.
FLOOD = [
    sys.executable,
    "-c",
    "import os, time\n"
    "i = 0\n"
    "pad = b'x' * 85\n"
    "while True:\n"
    "    out = []\n"
    "    for _ in range(800):\n"
    "        i += 1\n"
    "        out.append(b'line %09d %s\\n' % (i, pad))\n"
    "    os.write(1, b''.join(out))\n"
    "    time.sleep(0.01)\n",
]
TALKER = [
    sys.executable,
    "-c",
    "import os, time\ni = 0\nwhile True:\n    i += 1\n    os.write(1, b'%08d\\n' % i)\n"
    "    time.sleep(0.01)\n",
]
CALL_BOUND = 10.0  # a generous bound on any RPC answer while the storage hangs
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@dataclass
class HangFS:
    proc: subprocess.Popen[str]
    backing: Path
    mount: Path

    def command(self, what: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        assert _read_line(self.proc, 10) == "done " + what

    def hang(self) -> None:
        self.command("hang")

    def recover(self) -> None:
        self.command("ok")

    @asynccontextmanager
    async def released(self) -> AsyncIterator[None]:
        """Let the file system go on when the block ends, however it ends: a daemon with a
        thread in a hung FUSE request cannot be reaped (not even after SIGKILL) until then."""
        try:
            yield
        finally:
            if self.proc.poll() is None:
                self.recover()


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"hangfs said nothing within {timeout} s")
    return proc.stdout.readline().strip()


def _mounted(path: Path) -> bool:
    """From /proc/self/mounts: a stat of a hung or dead FUSE mount would hang or fail."""
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def _unmount(mount: Path) -> None:
    if _mounted(mount) and subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def hangfs(tmp_path: Path) -> Iterator[HangFS]:
    """The FUSE loopback mounted on tmp_path/mnt; always released and unmounted afterwards.

    Teardown lets blocked operations go on first; a server that does not end then is killed,
    which aborts the connection (every waiting request fails at once: nothing stays in D state).
    """
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(HANGFS), str(backing), str(mount)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert _read_line(proc, 20) == "ready"
        yield HangFS(proc, backing, mount)
    finally:
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # EOF: the gate opens for good
        except (BrokenPipeError, OSError):
            pass
        _unmount(mount)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _unmount(mount)
        assert proc.stdout is not None
        proc.stdout.close()


def config(tmp: Path, log_dir: Path, body: str) -> Path:
    path = tmp / "pubmon.toml"
    path.write_text(
        f'[daemon]\nshutdown_timeout = 20\nlog_dir = "{log_dir}"\n'
        f'[control]\nsocket = "{tmp / "pubmon.sock"}"\n[monitor]\nlisten = ""\n' + body
    )
    return path


async def counter(c: Any, key: str) -> int:
    async with asyncio.timeout(CALL_BOUND):
        value: int = (await c.call("getCounters"))[key]
    return value


async def last_seq(c: Any, name: str) -> int:
    async with asyncio.timeout(CALL_BOUND):
        seq: int = (await c.call("tailLog", name, -1, 1)).nextSeq
    return seq


async def running_pid(c: Any, name: str) -> int:
    async with asyncio.timeout(CALL_BOUND):
        infos = await c.call("listPublishers")
    return next((i.pid for i in infos if i.name == name and i.state == "RUNNING"), 0)


def last_number(path: Path) -> int:
    """The number of the last whole line of a FLOOD log file (0 when none yet)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4096))
            tail = f.read()
    except FileNotFoundError:
        return 0
    lines = [x for x in tail.split(b"\n")[:-1] if x.startswith(b"line ") and len(x) == 100]
    return int(lines[-1].split()[1]) if lines else 0


async def _gt(aw: Any, than: int) -> bool:
    return bool(await aw > than)


async def _new_pid(aw: Any, old: int) -> bool:
    return await aw not in (0, old)


async def _true(value: Any) -> Any:
    return value


def _count(d: RunningDaemon, text: str) -> int:
    return sum(text in line for line in d.stderr)


@pytest.mark.slow
async def test_hung_log_storage_stalls_nothing_and_writing_resumes(
    tmp_path: Path, hangfs: HangFS
) -> None:
    (hangfs.backing / "logs").mkdir(mode=0o750)
    on_file = hangfs.backing / "logs" / "flood.log"  # read beside the mount, never through it
    body = toml_publisher("flood", FLOOD, log={"max_bytes": 0}) + toml_publisher(
        "sleeper", ["sleep", "3600"]
    )
    cfg = config(tmp_path, hangfs.mount / "logs", body)
    async with (
        run_daemon(cfg) as d,
        control(tmp_path / "pubmon.sock", timeout=CALL_BOUND) as c,
        hangfs.released(),  # before the daemon's teardown, which waits for its exit
    ):
        await poll(lambda: _true(last_number(on_file) > 1000), "the first lines on file")

        # Storage that is slow but moves: the child is held back (its pipe paused once the
        # writer is HIGH behind) and loses nothing, if it moves again before STALL_SECONDS.
        hangfs.hang()

        async def paused() -> bool:
            before = await counter(c, "publisher.flood.log_bytes")
            await asyncio.sleep(0.2)  # part of the condition: nothing read for 0.2 s
            return await counter(c, "publisher.flood.log_bytes") == before

        await poll(paused, "the flood's pipe paused", 30)
        hangfs.recover()
        caught_up = await last_seq(c, "flood")
        await poll(lambda: _true(last_number(on_file) >= caught_up), "the file caught up", 30)
        numbers = [int(x.split()[1]) for x in on_file.read_bytes().split(b"\n")[:-1]]
        assert numbers == list(range(1, len(numbers) + 1))
        assert await counter(c, "publisher.flood.log_dropped") == 0

        hangfs.hang()
        hung_at = await last_seq(c, "flood")
        # The ring and tail go on, RPC answers, and what the file cannot take is counted.
        await poll(lambda: _gt(counter(c, "publisher.flood.log_dropped_bytes"), 0), "drops", 30)
        await poll(lambda: _gt(last_seq(c, "flood"), hung_at + 50_000), "tail goes on", 30)
        dropped = await counter(c, "publisher.flood.log_dropped")
        await poll(lambda: _gt(counter(c, "publisher.flood.log_dropped"), dropped), "more drops")
        await d.wait_log("log directory")  # the stall is named once
        # Supervision goes on: a killed child is restarted while the storage still hangs.
        old = await running_pid(c, "sleeper")
        os.kill(old, signal.SIGKILL)
        await poll(lambda: _new_pid(running_pid(c, "sleeper"), old), "sleeper restarted", 30)

        hangfs.recover()
        resumed_at = await last_seq(c, "flood")
        await d.wait_log("writing again", timeout=30)
        # New lines land in the file again (numbers beyond those read when it recovered).
        await poll(lambda: _true(last_number(on_file) > resumed_at), "new lines on file", 30)
        await d.wait_log("queueing lines for the file again", timeout=30)

        # Stopping must not hang on hung storage: a bounded wait for the writer, then the
        # daemon abandons it, says so and exits. (The kernel holds a thread whose FUSE request
        # its server already took until that request is answered: the process is reaped once
        # the storage recovers, its main thread has finished.)
        hangfs.hang()
        await poll(lambda: _true(_count(d, "finished nothing") == 2), "stuck again", 30)
        d.signal(signal.SIGTERM)
        await d.wait_log("did not finish", timeout=60)
        await poll(lambda: _true(state(d.pid) in ("Z", None)), "the main thread ended", 10)
        hangfs.recover()
        assert await d.wait_exit(timeout=30) == 0
    # Each episode is logged once when it begins and once when it ends, not per lost line.
    assert _count(d, "queueing lines for the file again") == 1
    assert 2 <= _count(d, "flood: log file") <= 3


# -- files swapped for links ---------------------------------------------------------------------

VICTIM = b"root's precious file\n"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


async def test_log_files_swapped_for_links_to_a_root_file_are_refused(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    victims = {name: tmp_path / f"victim-{name}" for name in ("sym", "hard", "zero", "rot")}
    for victim in victims.values():
        victim.write_bytes(VICTIM)
    body = "".join(
        toml_publisher(name, TALKER, log={"max_bytes": 4000, "backups": 0 if name == "zero" else 2})
        for name in victims
    )
    async with (
        run_daemon(config(tmp_path, logs, body)) as d,
        control(tmp_path / "pubmon.sock", timeout=CALL_BOUND) as c,
    ):
        for name in victims:
            await poll(lambda n=name: _true(_size(logs / f"{n}.log") > 0), f"{name}'s first lines")
        # Deleted and replaced by a symlink / a hard link: the file is recreated through the
        # directory fd with O_NOFOLLOW and checked, so both are refused, also on SIGUSR1.
        (logs / "sym.log").unlink()
        (logs / "sym.log").symlink_to(victims["sym"])
        (logs / "hard.log").unlink()
        os.link(victims["hard"], logs / "hard.log")
        # Moved away and replaced while the daemon still writes the old file: the next rotation
        # renames the link itself (rot), or truncates the daemon's own file, never by path (zero).
        (logs / "rot.log").rename(logs / "rot.log.away")
        (logs / "rot.log").symlink_to(victims["rot"])
        (logs / "zero.log").rename(logs / "zero.log.away")
        (logs / "zero.log").symlink_to(victims["zero"])

        line = await d.wait_log(f"{logs / 'sym.log'} (refused: it is a symbolic link)")
        assert "cannot write log file" in line
        await d.wait_log(f"{logs / 'hard.log'} (refused: it has 2 hard links)")
        for name in ("sym", "hard"):
            key = f"publisher.{name}.log_dropped_bytes"
            await poll(lambda k=key: _gt(counter(c, k), 0), f"{name}'s bytes counted as dropped")
        moved = (logs / "rot.log.1", logs / "rot.log.2")
        await poll(lambda: _true(any(p.is_symlink() for p in moved)), "rot rotated, link renamed")
        await poll(lambda: _true(not (logs / "rot.log").is_symlink()), "a fresh rot.log")
        sizes = [_size(logs / "zero.log.away")]

        async def shrank() -> bool:
            sizes.append(_size(logs / "zero.log.away"))
            return 0 <= sizes[-1] < max(sizes)

        await poll(shrank, "zero truncated (its own file)", 15)
        d.signal(signal.SIGUSR1)
        await d.wait_log("log files reopened")
        dropped = await counter(c, "publisher.sym.log_dropped")
        await poll(lambda: _gt(counter(c, "publisher.sym.log_dropped"), dropped), "still refused")

        # The link removed: the log file is made again and written.
        (logs / "sym.log").unlink()
        await poll(lambda: _true(_size(logs / "sym.log") > 0), "sym.log written again", 15)
        await d.wait_log(f"{logs / 'sym.log'} again")
    for name, victim in victims.items():
        assert victim.read_bytes() == VICTIM, name
        assert victim.stat().st_nlink == (2 if name == "hard" else 1)
    # One line when the refusals began: neither SIGUSR1 nor every write repeats it.
    assert _count(d, f"{logs / 'sym.log'} (refused") == 1
    assert _count(d, f"{logs / 'hard.log'} (refused") == 1

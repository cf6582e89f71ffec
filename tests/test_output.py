"""pubmon.core.output: an OutputLog fed by a child (through a Supervisor or a subprocess
protocol), its echo to stderr."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from children import numbered as numbered_child
from children import py, spec
from outputs import numbered
from pubmon.config.model import LogSpec
from pubmon.core import logwriter
from pubmon.core.adopted import AdoptedChild
from pubmon.core.lifecycle import PublisherState
from pubmon.core.logfile import LogFile, Run
from pubmon.core.logwriter import DirWriter
from pubmon.core.output import MAX_TAIL_LINES, OutputLog
from supervised import in_state, lines_seen, running


def test_echo_copies_lines_to_stderr(logdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = OutputLog("feed:1", LogSpec(echo=True), None)
    sink = log.open_stream("stderr")
    sink.feed(b"one\ntw")
    sink.feed(b"o\n")
    log.reconfigure(LogSpec(echo=False))
    sink.feed(b"three\n")
    assert capfd.readouterr().err == "feed:1| one\nfeed:1| two\n"


# -- end to end ----------------------------------------------------------------------------------


async def test_every_line_of_a_fast_child_reaches_the_log_file(tmp_path: Path) -> None:
    n = 200_000
    async with running(spec("chatty", numbered_child(n), restart="never"), log_dir=tmp_path) as sup:
        pub = sup.get("chatty")
        await in_state(pub, PublisherState.EXITED)
        assert pub.output.lines == n
    lines = (tmp_path / "chatty.log").read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert lines[:-1] == [f"line {i}".encode() for i in range(n)]


async def test_huge_line_invalid_utf8_and_no_final_newline_survive(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "w = sys.stdout.buffer.write\n"
        "w(b'a' * (5 << 20))\n"  # 5 MiB, no newline, then the stream ends with garbage
        "w(b'\\nbad \\xff\\xfe utf8\\nlast')\n"
    )
    big = spec("big", py(code), restart="never", log=replace(spec("x").log, ring_lines=200))
    async with running(big, log_dir=tmp_path) as sup:
        pub = sup.get("big")
        await in_state(pub, PublisherState.EXITED)
        assert pub.output.last_seq == 82  # 80 fragments of 64 KiB, then two lines
        chunk = pub.output.tail(0, 10_000)
    lines = chunk.lines
    assert lines[-1].text == "last" and lines[-1].partial
    assert lines[-2].text == "bad \\xff\\xfe utf8" and not lines[-2].partial
    fragments = lines[:-2]  # the newest of the 80: the ring holds ring.BYTE_CAP of them
    assert chunk.missed == 82 - len(lines) and [f.seq for f in lines] == list(
        range(83 - len(lines), 83)
    )
    assert "".join(f.text for f in fragments) == "a" * (65536 * len(fragments))
    assert all(f.partial for f in fragments[:-1]) and not fragments[-1].partial
    assert all(len(f.text) <= 65536 for f in fragments)
    raw = (tmp_path / "big.log").read_bytes()
    assert raw.replace(b"\n", b"").startswith(b"a" * (5 << 20))
    assert raw.endswith(b"bad \xff\xfe utf8\nlast\n")


# 100-byte numbered lines, written in os.write calls as large as the pipe takes: the flood.
FLOOD_LINES = 300_000  # 30 MB, well past logwriter.HIGH (plus the 1 MiB pipe)
FLOOD = (
    "import os\n"
    "pad = b'x' * 89\n"
    f"view = memoryview(b''.join(b'%09d %s\\n' % (i, pad) for i in range({FLOOD_LINES})))\n"
    "while view:\n"
    "    view = view[os.write(1, view) :]\n"
)


def flood_lines() -> bytes:
    pad = b"x" * 89
    return b"".join(b"%09d %s\n" % (i, pad) for i in range(FLOOD_LINES))


async def test_a_writer_that_catches_up_while_a_pipe_is_held_leaves_it_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer thread runs whenever the loop thread lets go of the GIL, also in the middle
    of `DirWriter.hold` (its epoll_ctl as it starts watching). If it empties the queue there,
    the watch resumes the pipe at once, before the sink has paused it: that resume must not be
    lost, else the pipe stays paused for good, the child blocks on it and its output never
    reaches the file (no stall is declared: nothing waits any more). Forced here: storage
    that does not move until the sink holds its pipe, then catches up within `hold`."""
    gate = threading.Event()
    write = LogFile.write
    watch = DirWriter._watch

    def slow_write(self: LogFile, runs: Sequence[Run]) -> None:
        gate.wait(30)  # the storage is slow: the queue grows past HIGH, the sink holds
        write(self, runs)

    def watch_once_caught_up(self: DirWriter) -> None:
        if not gate.is_set():  # the first hold: let the writer finish all it has, now
            caught_up = threading.Event()
            self.mark(caught_up.set)
            gate.set()
            assert caught_up.wait(30)
            assert self.pending <= logwriter.LOW
        watch(self)

    monkeypatch.setattr(LogFile, "write", slow_write)
    monkeypatch.setattr(DirWriter, "_watch", watch_once_caught_up)
    async with running(spec("flood", py(FLOOD), restart="never"), log_dir=tmp_path) as sup:
        pub = sup.get("flood")
        await in_state(pub, PublisherState.EXITED, timeout=30)
        assert gate.is_set()  # the sink did hold its pipe
        assert await pub.output.flushed()
        assert pub.output.lines == FLOOD_LINES and pub.output.dropped == 0
    assert (tmp_path / "flood.log").read_bytes() == flood_lines()


async def test_an_adopted_childs_pipe_is_held_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `pubmon upgrade` a child's pipes are read by its AdoptedChild, not by asyncio's
    transports: its sinks pause those as well. They used not to (no pipe was attached): a
    flood went on into the queue while the storage was behind, and past 64 MiB off the file."""
    gate = threading.Event()
    write = LogFile.write

    def slow_write(self: LogFile, runs: Sequence[Run]) -> None:
        gate.wait(30)  # the storage is behind until the sink has held its pipe back
        write(self, runs)

    monkeypatch.setattr(LogFile, "write", slow_write)
    log = OutputLog("flood", LogSpec(), str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", FLOOD], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        fd = os.dup(proc.stdout.fileno())
        proc.stdout.close()
        child = AdoptedChild("flood", proc.pid, proc.pid, time.monotonic(), pipes={1: fd})
        child.sinks = {1: log.open_stream("stdout")}
        child.connect()
        pipe = child._pipes[1]
        async with asyncio.timeout(30):  # held back, or (before) every line read
            while pipe.reading and log.lines < FLOOD_LINES:
                await log.wait_beyond(log.last_seq)
        held = not pipe.reading
        gate.set()
        assert await child.drain(30)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        gate.set()
        proc.kill()
        proc.wait()
        log.close()
    assert held
    assert await log.flushed()
    assert (log.lines, log.dropped) == (FLOOD_LINES, 0)
    assert (tmp_path / "flood.log").read_bytes() == flood_lines()


LONG_LINE = 16 << 20  # the longest max_line a config may set: a whole line is one run


async def test_long_lines_of_many_children_wait_for_a_slow_writer_and_none_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each reader that pushes the queue past HIGH pauses its pipe, but only after its run
    is queued: with many readers at once the queue passes HIGH by one run per reader. Five
    children each ending a 16 MiB line while the storage is behind (not stalled: it moves
    again well within STALL_SECONDS) are 80 MiB; the queue once refused what passed 64 MiB
    and the line was lost from the file, reported as a stall that was none."""
    gate = threading.Event()
    write = LogFile.write

    def slow_write(self: LogFile, runs: Sequence[Run]) -> None:
        gate.wait(30)  # behind until every child's line has been read
        write(self, runs)

    monkeypatch.setattr(LogFile, "write", slow_write)
    code = (
        "import os\n"
        f"view = memoryview(b'y' * {LONG_LINE - 1} + b'\\n')\n"
        "while view:\n"
        "    view = view[os.write(1, view) :]\n"
    )
    log = replace(spec("x").log, max_line=LONG_LINE, ring_lines=10)
    specs = [spec(f"long{i}", py(code), restart="never", log=log) for i in range(5)]
    async with running(*specs, log_dir=tmp_path) as sup:
        pubs = [sup.get(s.name) for s in specs]
        for pub in pubs:
            await lines_seen(pub, 1, timeout=30)
        gate.set()
        for pub in pubs:
            await in_state(pub, PublisherState.EXITED, timeout=30)
            assert await pub.output.flushed()
            assert (pub.output.lines, pub.output.dropped) == (1, 0)
    for s in specs:
        assert (tmp_path / f"{s.name}.log").read_bytes() == b"y" * (LONG_LINE - 1) + b"\n"


CHILD = (
    "import sys\n"
    "lines = (f'line {i:07d} of the numbered lines\\n' for i in range(1, 200001))\n"
    "sys.stdout.write(''.join(lines))\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('done')\n"
)


class Forward(asyncio.SubprocessProtocol):
    """What the supervisor's protocol does with output: chunks to sinks, EOF to eof()."""

    def __init__(self, log: OutputLog) -> None:
        self.sinks = {1: log.open_stream("stdout"), 2: log.open_stream("stderr")}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open_pipes = 2
        self._exited = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.sinks[fd].feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.sinks[fd].eof()
        self._open_pipes -= 1
        self._check()

    def process_exited(self) -> None:
        self._exited = True
        self._check()

    def _check(self) -> None:
        if not self._open_pipes and self._exited and not self.done.done():
            self.done.set_result(None)


async def test_a_real_child_through_a_subprocess_protocol(logdir: Path) -> None:
    log = OutputLog("child", LogSpec(), str(logdir))
    loop = asyncio.get_running_loop()
    transport, proto = await loop.subprocess_exec(
        lambda: Forward(log), sys.executable, "-c", CHILD, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(10):
            await proto.done
    finally:
        transport.close()
    assert transport.get_returncode() == 0
    assert await log.flushed()
    lines = (logdir / "child.log").read_bytes().splitlines(keepends=True)
    lines.remove(b"done\n")  # stderr's partial last line, wherever it landed
    assert b"".join(lines) == numbered(1, 200_000)
    ring = log.tail(log.last_seq - 2000, MAX_TAIL_LINES).lines
    assert [(x.stream, x.text, x.partial) for x in ring if x.stream == "stderr"] == [
        ("stderr", "done", True)
    ]
    assert log.lines == 200_001 and log.dropped == 0

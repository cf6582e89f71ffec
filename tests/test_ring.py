"""pubmon.core.ring: framing (lines cut at max_line, partial pieces), the ring and its cursors."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest

from outputs import feed_randomly, numbered, texts
from pubmon.config.model import LogSpec
from pubmon.core import ring as _ring
from pubmon.core.output import MAX_TAIL_LINES, OutputLog
from pubmon.core.ring import LONG_LINE, extra_pieces, newlines


def frame(stream: bytes, max_line: int) -> list[tuple[bytes, bool]]:
    """Reference framing, the plain splitter of asyncio-gotchas §4.2 run over a whole stream."""
    out = []
    i, n = 0, len(stream)
    while i < n:
        j = stream.find(b"\n", i, i + max_line + 1)
        if j >= 0:
            out.append((stream[i:j], False))
            i = j + 1
        else:
            k = min(n, i + max_line)
            out.append((stream[i:k], True))
            i = k
    return out


# -- framing -------------------------------------------------------------------------------------


def test_numbered_lines_in_random_chunks(logdir: Path) -> None:
    rng = random.Random(200_000)
    data = numbered(1, 200_000)
    log = OutputLog("feed:0", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    feed_randomly(sink, data, rng, [1, 7, 100, 4096, 65536, 262144])
    sink.eof()
    assert log.sync()
    assert (logdir / "feed-0.log").read_bytes() == data
    assert (log.lines, log.bytes, log.dropped, log.last_seq) == (200_000, len(data), 0, 200_000)
    newest = log.last(2000)
    assert [line.seq for line in newest.lines] == list(range(198_001, 200_001))
    assert texts(newest.lines) == numbered(198_001, 200_000).decode().splitlines()
    assert not any(line.partial for line in newest.lines)
    assert {line.stream for line in newest.lines} == {"stdout"}


def test_extra_pieces_fast_and_slow_paths() -> None:
    # Fast path: every max_line/2 window holds a newline, nothing to add.
    short = numbered(1, 5000)
    assert extra_pieces(short, 0, len(short), 64) == 0
    # A run between max_line/2 and max_line misses a window but needs no cut: exactly 0.
    middle = b"x" * 50 + b"\n" + b"y" * 64 + b"\n" + b"z\n"
    assert extra_pieces(middle, 0, len(middle), 64) == 0
    # Slow path, exact at the boundaries: 65 bytes -> 2 pieces, 128 -> 2, 129 -> 3.
    for size, extra in [(64, 0), (65, 1), (128, 1), (129, 2), (1000, 15)]:
        data = b"ab\n" + b"q" * size + b"\ncd\n"
        assert extra_pieces(data, 0, len(data), 64) == extra, size
        assert extra_pieces(data, 3, len(data), 64) == extra, size
    rng = random.Random(7)
    for _ in range(500):
        cut = rng.choice([1, 2, 3, 5, 64, 100])
        lines = [b"w" * rng.choice([0, cut - 1, cut, cut + 1, rng.randint(0, 4 * cut)])]
        lines += [b"v" * rng.randint(0, 3 * cut) for _ in range(rng.randint(0, 20))]
        data = b"\n".join(lines) + b"\n"
        assert data.count(b"\n") + extra_pieces(data, 0, len(data), cut) == len(frame(data, cut))


@pytest.fixture(params=["native", "bytes.count"])
def counter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way `newlines` counts: the optional C extension, and the pure-Python fallback."""
    if request.param == "native":
        if _ring._native_count() is None:
            pytest.skip("pubmon._linecount is not built here (no C compiler at install)")
        monkeypatch.setattr(_ring, "_count", _ring._native_count())
    else:
        monkeypatch.setattr(_ring, "_count", None)
    return str(request.param)


def test_the_native_count_is_bytes_count() -> None:
    # pubmon._linecount.count(data, start, end) == data.count(b"\n", start, end): 16-byte steps
    # and their tail, 255-step rounds (4080 bytes), the GIL let go from 4096 bytes, slice-style
    # clamping of start and end, and any buffer.
    count = _ring._native_count()
    if count is None:
        pytest.skip("pubmon._linecount is not built here (no C compiler at install)")
    rng = random.Random(161)
    for trial in range(3000):
        n = rng.choice([0, 1, 15, 16, 17, 4079, 4080, 4081, 4096, rng.randint(0, 70_000)])
        data = rng.randbytes(n) if trial % 3 == 0 else bytes(rng.choices(b"ab\n", k=n))
        start = rng.randint(-n - 3, n + 3)
        end = rng.randint(-n - 3, n + 3)
        assert count(data, start, end) == data.count(b"\n", start, end), (n, start, end)
    full = b"\n" * 100_000  # every lane saturating its 255 steps
    assert count(full, 0, len(full)) == count(memoryview(full), 0, 10**9) == 100_000
    with pytest.raises(TypeError):
        count("text", 0, 1)  # type: ignore[arg-type]


def test_newlines_is_exact_whatever_the_finds(counter: str) -> None:
    rng = random.Random(16)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 99, LONG_LINE, rng.randint(0, 6000)]) for _ in range(40)]
        data = b"".join(b"x" * size + b"\n" for size in sizes) + b"tail"
        end = data.rfind(b"\n") + 1
        start = rng.choice([0, data.find(b"\n") + 1, rng.randint(0, end)])
        want = data.count(b"\n", start, end)
        for finds in (0, 1, 5, end // LONG_LINE, 10**9):
            assert newlines(data, start, end, finds) == want, (start, finds)
    assert newlines(b"", 0, 0, 10) == 0


def test_lines_counted_the_same_as_their_length_changes(logdir: Path, counter: str) -> None:
    # Long lines switch the sink to a find per line, short ones back to count: numbering and the
    # file stay exact across every switch and chunking.
    rng = random.Random(3)
    parts = [numbered(1, 3000), b"".join(b"%05d " % i + b"L" * 4000 + b"\n" for i in range(300))]
    parts += [numbered(3001, 6000), b"".join(b"%05d " % i + b"M" * 1500 + b"\n" for i in range(99))]
    data = b"".join(parts)
    log = OutputLog("feed:0", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    feed_randomly(sink, data, rng, [100, 4096, 65536, 262144])
    sink.eof()
    assert log.sync()
    assert (logdir / "feed-0.log").read_bytes() == data
    assert log.last_seq == log.lines == data.count(b"\n")
    assert texts(log.last(99).lines) == data.decode().splitlines()[-99:]


@pytest.mark.parametrize("seed", range(6))
def test_framing_matches_reference_for_any_chunking(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    for trial in range(150):
        cut = rng.choice([64, 100, 256])
        pieces = []
        for _ in range(rng.randint(0, 40)):
            size = rng.choice([0, 1, cut - 1, cut, cut + 1, 2 * cut, 2 * cut + 1])
            size = rng.choice([size, rng.randint(0, 5 * cut)])
            pieces.append(bytes(rng.choice(b"ab\xc3\xa9\xff") for _ in range(size)))
        stream = b"\n".join(pieces) + rng.choice([b"", b"\n"])
        log = OutputLog("p", LogSpec(max_line=cut, ring_lines=10**9), str(tmp_path / str(trial)))
        sink = log.open_stream("stderr")
        feed_randomly(sink, stream, rng, [1, 3, cut, 4 * cut, 20 * cut])
        sink.eof()
        got = log.tail(0, MAX_TAIL_LINES).lines
        want = [(t.decode("utf-8", "backslashreplace"), p) for t, p in frame(stream, cut)]
        assert [(line.text, line.partial) for line in got] == want
        assert [line.seq for line in got] == list(range(1, len(want) + 1))
        assert log.lines == len(want)
        assert log.sync()
        log.close()
        written = (tmp_path / str(trial) / "p.log").read_bytes()
        assert written.replace(b"\n", b"") == stream.replace(b"\n", b"")
        assert not written or written.endswith(b"\n")


def test_a_long_line_without_newline_comes_back_whole(logdir: Path) -> None:
    """A line of as many bytes as the ring may hold, fed in 64 KiB chunks with no newline: the
    ring gives back its 64 KiB pieces in order and the file holds it all. (Was a 5 MiB line when
    the ring held 8 MiB.)"""
    letters = bytes(97 + i % 26 for i in range(256))
    line = random.Random(5).randbytes(_ring.BYTE_CAP).translate(letters)
    log = OutputLog("big", LogSpec(max_line=65536, ring_lines=10**6), str(logdir))
    sink = log.open_stream("stdout")
    for i in range(0, len(line), 65536):
        sink.feed(line[i : i + 65536])
    sink.eof()
    frags = log.tail(0, MAX_TAIL_LINES).lines
    assert len(frags) == log.lines == _ring.BYTE_CAP // 65536 and all(f.partial for f in frags)
    assert "".join(f.text for f in frags).encode() == line
    assert {len(f.text) for f in frags} == {65536}
    assert log.sync()
    written = (logdir / "big.log").read_bytes()
    assert written.replace(b"\n", b"") == line
    assert max(map(len, written.split(b"\n"))) <= 65536


def test_long_lines_in_one_chunk_are_cut_in_the_ring_but_whole_in_the_file(logdir: Path) -> None:
    log = OutputLog("p", LogSpec(max_line=100), str(logdir))
    sink = log.open_stream("stdout")
    data = b"short\n" + b"L" * 250 + b"\n" + b"M" * 100 + b"\nend\n"
    sink.feed(data)
    got = [(len(x.text), x.partial) for x in log.tail(0, 100).lines]
    assert got == [(5, False), (100, True), (100, True), (50, False), (100, False), (3, False)]
    assert [x.seq for x in log.tail(0, 100).lines] == [1, 2, 3, 4, 5, 6]
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == data


def test_invalid_utf8_and_a_last_line_without_newline_survive(logdir: Path) -> None:
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"ok\n\xff\xfebad\ncaf\xc3")
    sink.eof()
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"ok\n\xff\xfebad\ncaf\xc3\n"
    got = [(x.text, x.partial) for x in log.tail(0, 10).lines]
    assert got == [("ok", False), ("\\xff\\xfebad", False), ("caf\\xc3", True)]


def test_streams_interleave_in_the_file_only_at_line_boundaries(logdir: Path) -> None:
    rng = random.Random(3)
    log = OutputLog("p", LogSpec(max_line=64, ring_lines=10**6), str(logdir))
    data = {
        "stdout": b"".join(b"out%d:%s\n" % (i, b"o" * rng.randint(0, 40)) for i in range(3000)),
        "stderr": b"".join(b"err%d:%s\n" % (i, b"e" * rng.randint(0, 40)) for i in range(3000)),
    }
    sinks = {name: log.open_stream(name) for name in ("stdout", "stderr")}
    pos = {"stdout": 0, "stderr": 0}
    while any(pos[s] < len(data[s]) for s in pos):
        name = rng.choice([s for s in pos if pos[s] < len(data[s])])
        k = rng.randint(1, 150)
        sinks[name].feed(data[name][pos[name] : pos[name] + k])
        pos[name] += k
    assert log.sync()
    lines = (logdir / "p.log").read_bytes().splitlines(keepends=True)
    assert b"".join(x for x in lines if x.startswith(b"out")) == data["stdout"]
    assert b"".join(x for x in lines if x.startswith(b"err")) == data["stderr"]
    assert len(lines) == 6000
    ring = log.tail(0, MAX_TAIL_LINES).lines
    assert all(x.text.startswith("out" if x.stream == "stdout" else "err") for x in ring)


# -- the ring and its cursors --------------------------------------------------------------------


def ring_of(n: int, ring_lines: int) -> OutputLog:
    log = OutputLog("p", LogSpec(ring_lines=ring_lines), None)
    sink = log.open_stream("stdout")
    for i in range(1, n + 1):
        sink.feed(b"%d\n" % i)
    return log


def test_tail_cursor_semantics() -> None:
    log = ring_of(100, ring_lines=10)
    assert log.path is None and log.last_seq == 100
    chunk = log.tail(0, 100)
    assert texts(chunk.lines) == [str(i) for i in range(91, 101)]
    assert (chunk.next_seq, chunk.missed) == (100, 90)
    chunk = log.tail(95, 2)
    assert ([x.seq for x in chunk.lines], chunk.next_seq, chunk.missed) == ([96, 97], 97, 0)
    chunk = log.tail(100, 5)
    assert (chunk.lines, chunk.next_seq, chunk.missed) == ([], 100, 0)
    future = log.tail(5000, 5)  # the daemon restarted: resync to the present
    assert (future.lines, future.next_seq, future.missed) == ([], 100, 0)
    assert [x.seq for x in log.tail(50, 0).lines] == [91]  # max_lines clamped to >= 1
    assert log.tail(-3, 1).missed == 90
    last = log.last(3)
    assert ([x.seq for x in last.lines], last.next_seq, last.missed) == ([98, 99, 100], 100, 0)
    assert (log.last(0).lines, log.last(0).next_seq) == ([], 100)
    assert log.last(15).missed == 5


def test_tail_clamps_max_lines_and_empty_ring() -> None:
    empty = OutputLog("p", LogSpec(), None)
    assert (empty.tail(0, 10).lines, empty.tail(0, 10).next_seq, empty.last(5).lines) == ([], 0, [])
    log = OutputLog("p", LogSpec(ring_lines=20_000), None)
    log.open_stream("stdout").feed(numbered(1, 20_000))
    chunk = log.tail(0, 10**9)
    assert len(chunk.lines) == MAX_TAIL_LINES and chunk.next_seq == MAX_TAIL_LINES
    assert chunk.lines[-1].text == numbered(10_000, 10_000).decode().strip()
    assert len(log.last(10**9).lines) == MAX_TAIL_LINES


def test_ring_evicts_whole_chunks_and_keeps_at_least_ring_lines() -> None:
    log = OutputLog("p", LogSpec(ring_lines=1000), None)
    sink = log.open_stream("stdout")
    sink.feed(numbered(1, 600))
    sink.feed(numbered(601, 1200))
    sink.feed(numbered(1201, 1800))
    chunk = log.tail(0, MAX_TAIL_LINES)  # the first chunk went, the other two hold >= 1000 lines
    assert (chunk.lines[0].seq, chunk.missed, len(chunk.lines)) == (601, 600, 1200)


def test_ring_byte_cap() -> None:
    log = OutputLog("p", LogSpec(ring_lines=10**9, max_line=2 << 20), None)
    sink = log.open_stream("stdout")
    for i in range(20):
        sink.feed(b"%d" % i + b"x" * (_ring.BYTE_CAP // 8) + b"\n")
    chunk = log.tail(0, MAX_TAIL_LINES)
    assert chunk.missed == 20 - len(chunk.lines) > 0
    assert log._ring.nbytes <= _ring.BYTE_CAP
    assert chunk.lines[-1].text.startswith("19x")


def test_reconfigure_shrinks_ring_and_changes_max_line(logdir: Path) -> None:
    log = ring_of(50, ring_lines=50)
    log.reconfigure(LogSpec(ring_lines=5, max_line=64))
    assert log.tail(0, 100).missed == 45
    sink = log.open_stream("stdout")
    sink.feed(b"y" * 100 + b"\n")
    assert [(len(x.text), x.partial) for x in log.last(2).lines] == [(64, True), (36, False)]


async def test_wait_beyond_wakes_on_feed_and_cancels_cleanly() -> None:
    log = OutputLog("p", LogSpec(), None)
    sink = log.open_stream("stdout")
    await log.wait_beyond(-1)  # already true: returns at once
    waiter = asyncio.create_task(log.wait_beyond(0))
    await asyncio.sleep(0)  # let it block (a scheduling step, not a timing guess)
    assert not waiter.done()
    sink.feed(b"partial")  # no complete line yet
    await asyncio.sleep(0)
    assert not waiter.done()
    sink.feed(b" line\n")
    async with asyncio.timeout(5):
        await waiter
    doomed = asyncio.create_task(log.wait_beyond(1))
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert not log._waiters
    many = [asyncio.create_task(log.wait_beyond(1)) for _ in range(3)]
    await asyncio.sleep(0)
    sink.feed(b"x\n")
    async with asyncio.timeout(5):
        await asyncio.gather(*many)
    assert not log._waiters


# -- many small chunks -----------------------------------------------------------------------------


_SMALL_CHUNKS = """
import os
from pubmon.config.model import LogSpec
from pubmon.core.output import OutputLog

log = OutputLog("x", LogSpec(ring_lines=10000), None)
sink = log.open_stream("stdout")
r, w = os.pipe()
def maps():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
maps0, rss0 = maps(), rss()
for i in range(3000):
    os.write(w, b"line %d\\n" % i)
    sink.feed(os.read(r, 262144))  # as asyncio reads a pipe: 256 KiB asked, a line got
assert len(log.tail(0, 10000).lines) == 3000
print(maps() - maps0, rss() - rss0)
"""


async def test_small_output_chunks_kept_in_the_ring_do_not_pin_a_page_each() -> None:
    # Each pipe read is a 256 KiB buffer (mmap'ed by malloc) shrunk to the bytes read; a ring
    # that kept those chunks as they came pinned a mapping of a whole page for every retained
    # chunk of a line or two: 18,000 mappings and +70 MiB for 200 publishers with 200-line rings
    # (default rings: 2000 lines). Found by the chaos soak: the daemon's RSS climbed ~0.27 MiB/s
    # without end. Run in a fresh interpreter: malloc's mmap threshold depends on the process's
    # history.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SMALL_CHUNKS, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    mappings, rss_kib = map(int, out.split())
    assert mappings < 300, f"{mappings} new memory mappings for 3000 lines"
    assert rss_kib < 3 * 1024, f"RSS grew {rss_kib} KiB for 3000 short lines"

"""Line framing and the in-memory ring of output lines behind `pubmon.core.output.OutputLog`.

The ring stores output the way it arrived, one entry per block of complete lines, and splits a
block into lines only when a client reads it. An entry's bytes are `prefix + data[:end]` and hold
`nlines` lines numbered `first_seq .. first_seq + nlines - 1`. Framing (`split_block`):

- the block is split on b"\\n"; each terminated segment is one line with partial=False;
- with `cut` > 0, a segment longer than `cut` bytes becomes pieces of `cut` bytes, all partial
  except the last piece of a terminated segment (`cut` = 0 promises no segment is that long);
- an unterminated last segment (fragments of a growing line, or a last line at EOF) gives pieces
  that are all partial.

`extra_pieces` counts what the cutting adds to `data.count(b"\\n")` without a Python loop per line,
so the writer can number lines exactly while doing only C-speed work per chunk. `newlines` counts
the newlines themselves: with the optional `pubmon._linecount` extension (16 bytes a step, without
the GIL), else by a find per line where lines are long and `bytes.count` elsewhere (see there).
"""

from __future__ import annotations

__all__ = ["BYTE_CAP", "LONG_LINE", "RawLine", "Ring", "extra_pieces", "newlines", "split_block"]

from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import final

# Bytes of chunks the ring may hold beyond its newest entry: `ring_lines` lines of up to 512
# bytes, fewer of longer ones (256 lines of 4 KiB). It bounds the rings of a fleet to about 1 GiB
# at 1000 publishers (it was 8 MiB: 8 GiB), and a fresh daemon's rings fill with fewer page
# faults (20 children writing 4 KiB lines: 0.8x supervisord's rate with 8 MiB, 1.0x with 1 MiB).
BYTE_CAP = 1 << 20


def _native_count() -> Callable[[bytes, int, int], int] | None:
    try:
        from pubmon._linecount import count
    except ImportError:  # not compiled (no C compiler at install): `newlines` uses bytes.count
        return None
    return count


_count = _native_count()
# Chunks shorter than this are kept as a compact copy. A pipe read is a 256 KiB buffer shrunk to
# what was read (malloc mmaps it): kept as it came, a chunk of one short line pins a page-sized
# mapping of its own (the chaos run saw 18,000 mappings, +70 MiB, for 200 chatty publishers).
COPY_BELOW = 32 << 10
# Bytes per line above which a find per line (memchr, SIMD) counts newlines faster than
# bytes.count (a plain byte loop, ~3 GB/s here): a 256 KiB chunk of 4 KiB lines takes 10 µs
# by finds, 65 µs by count; of 100-byte lines, 129 µs by finds, 85 µs by count (timeit,
# Python 3.11, load ~2; the find loop costs ~150 ns a line).
LONG_LINE = 1024

RawLine = tuple[int, float, str, bytes, bool]  # seq, time, stream, bytes, partial


def split_block(block: bytes, cut: int) -> list[tuple[bytes, bool]]:
    """Frame `block` into (line bytes, partial) pairs by the rules in the module docstring."""
    segments = block.split(b"\n")
    rest = segments.pop()  # b"" when the block ends with a newline
    if cut <= 0:
        out = [(seg, False) for seg in segments]
        if rest:
            out.append((rest, True))
        return out
    out = []
    for seg in segments:
        size = len(seg)
        if size <= cut:
            out.append((seg, False))
        else:
            out.extend((seg[i : i + cut], i + cut < size) for i in range(0, size, cut))
    out.extend((rest[i : i + cut], True) for i in range(0, len(rest), cut))
    return out


def newlines(data: bytes, start: int, end: int, finds: int) -> int:
    """How many b"\\n" `data[start:end]` holds.

    With `pubmon._linecount` (compiled at install when a C compiler is there), one call that
    counts 16 bytes a step and lets go of the GIL: 256 KiB of 100-byte lines in ~10 µs instead
    of ~85 with `bytes.count`, a byte-at-a-time loop. That count was the whole gap to
    supervisord with 20 children writing 100-byte lines (issue 16: 0.65x with it, 1.22x without).
    Without the extension: at most `finds` C `find`s, one per line, then one `count` for the
    rest. Exact whatever `finds` is; the caller picks it for speed: the lines' length /
    LONG_LINE finds when they have been long (each find then skips a long line at memchr speed),
    0 otherwise (a stream that turns short then costs at most `finds` finds).
    """
    if _count is not None:
        return _count(data, start, end)
    find = data.find
    n = 0
    pos = start
    while pos < end:
        if n >= finds:
            return n + data.count(b"\n", pos, end)
        pos = find(b"\n", pos, end) + 1
        if not pos:
            break
        n += 1
    return n


def extra_pieces(data: bytes, start: int, end: int, cut: int) -> int:
    """Pieces beyond one per line that cutting at `cut` adds to the lines in `data[start:end]`.

    `data[end - 1]` must be b"\\n", and `data[start - 1]` too unless `start` is 0. A line longer
    than `cut` contains a whole aligned window of `cut // 2` bytes, so while every window holds a
    newline (the common case, one C `find` per window) no line needs cutting. A window without one
    lies inside a long line: measure that line exactly and go on after its end.
    """
    step = max(1, cut // 2)
    extra = 0
    pos = start
    while pos < end:
        stop = pos + step
        if data.find(b"\n", pos, stop) >= 0:
            pos = stop
            continue
        first = data.rfind(b"\n", 0, pos) + 1  # 0 when the line starts the data
        last = data.find(b"\n", stop, end)  # found: data[end - 1] is a newline outside the window
        size = last - first
        if size > cut:
            extra += (size - 1) // cut
        pos = last + 1
    return extra


@final
@dataclass(slots=True, eq=False)
class _Entry:
    first_seq: int
    nlines: int
    time: float
    stream: str
    prefix: bytes
    data: bytes  # the whole chunk as read: keeping it costs no copy
    end: int
    cut: int

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.data)

    def lines(self) -> list[tuple[bytes, bool]]:
        block = self.prefix + self.data[: self.end] if self.prefix else self.data[: self.end]
        pieces = split_block(block, self.cut)
        assert len(pieces) == self.nlines, (len(pieces), self.nlines)
        return pieces


def _first_seq(entry: _Entry) -> int:
    return entry.first_seq


@final
class Ring:
    """Numbers lines from 1 and keeps at least the newest `keep_lines` of them, within BYTE_CAP.

    Whole entries are evicted, oldest first, while the rest still holds `keep_lines` lines, or while
    the ring is over BYTE_CAP and more than one entry remains. The newest entry is never evicted.
    """

    def __init__(self, keep_lines: int) -> None:
        self.keep_lines = keep_lines
        self.last_seq = 0
        self.cleared = 0  # lines up to this seq were cleared by an operator (never "missed")
        self._entries: deque[_Entry] = deque()
        self._lines = 0
        self._bytes = 0

    def add(
        self,
        nlines: int,
        now: float,
        stream: str,
        prefix: bytes,
        data: bytes,
        end: int,
        cut: int,
    ) -> None:
        if end < COPY_BELOW:
            data = bytes(memoryview(data)[:end])  # always a copy, even of the whole of `data`
        entry = _Entry(self.last_seq + 1, nlines, now, stream, prefix, data, end, cut)
        self.last_seq += nlines
        self._entries.append(entry)
        self._lines += nlines
        self._bytes += entry.size
        if self._lines - self._entries[0].nlines >= self.keep_lines or self._bytes > BYTE_CAP:
            self.trim()

    def trim(self) -> None:
        entries = self._entries
        while len(entries) > 1 and (
            self._lines - entries[0].nlines >= self.keep_lines or self._bytes > BYTE_CAP
        ):
            old = entries.popleft()
            self._lines -= old.nlines
            self._bytes -= old.size

    def clear(self) -> int:
        """Forget every line kept (`pubmon clear`); numbering goes on, so a follower's cursor
        stays valid, and the lines cleared are not reported to it as missed. Returns how many
        lines were dropped."""
        dropped = self._lines
        self._entries.clear()
        self._lines = self._bytes = 0
        self.cleared = self.last_seq
        return dropped

    def read(self, after_seq: int, max_lines: int) -> tuple[list[RawLine], int, int]:
        """Up to `max_lines` lines with seq > after_seq: (lines, next_seq, missed)."""
        last = self.last_seq
        if after_seq >= last:  # caught up, or a cursor from the future (resync to the present)
            return [], last, 0
        after = max(after_seq, 0)
        entries = self._entries
        start = max(after + 1, entries[0].first_seq if entries else last + 1)
        missed = max(0, start - max(after, self.cleared) - 1)
        if not entries:  # cleared, nothing new since
            return [], last, missed
        index = bisect_right(entries, start, key=_first_seq) - 1
        out: list[RawLine] = []
        for entry in islice(entries, index, None):
            first = entry.first_seq
            pieces = entry.lines()
            take = pieces[start - first : start - first + max_lines - len(out)]
            out.extend(
                (seq, entry.time, entry.stream, text, partial)
                for seq, (text, partial) in enumerate(take, start)
            )
            if len(out) >= max_lines:
                break
            start = first + entry.nlines
        return out, out[-1][0], missed

    def __len__(self) -> int:
        return self._lines

    @property
    def nbytes(self) -> int:
        return self._bytes

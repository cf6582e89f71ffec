"""Child output: a chunked line splitter, a ring of numbered lines, a rotating log file.

The supervisor's SubprocessProtocol hands each chunk of a child's stdout and stderr to a
`StreamSink` (`pipe_data_received` -> `feed`, `pipe_connection_lost` -> `eof`). All sinks of one
publisher write into one `OutputLog`, which lives across restarts of the child::

    log = OutputLog("feed:0", spec.log, "/var/log/pubmon")
    out = log.open_stream("stdout")          # a new sink per pipe per spawn
    out.feed(b"hello\\nwor"); out.feed(b"ld\\n"); out.eof()
    log.tail(0, 100).lines                   # [LogLine(1, t, "stdout", "hello", False), ...]

Speed is the point (a child may write > 1 GB/s): a chunk costs a few C calls (`rfind`, `count`,
one `find` per max_line/2 bytes), one writev and one ring entry, never Python work per line of
under 1 KiB (lines of 1 KiB and more are counted by one `find` each, faster than `count` there). The
ring keeps chunks whole and splits them into lines only when a client tails it.

Lines are split on b"\\n" before decoding; a line longer than `max_line` bytes becomes fragments
of `max_line` bytes flagged partial (the last piece, the one ending in the newline, is not), and
an incomplete last line at EOF is one more partial line. Joining the fragments gives the line
back, byte for byte. Sequence numbers count every line and fragment from 1 across spawns.

The file `<log_dir>/<name>.log` ("api-0.log" for instance api:0: no ':' in file names; a file an
older pubmon named "api:0.log" is renamed at the first open, backups too) gets both streams,
interleaved only at line boundaries, as the child's raw bytes with no prefixes. Opt-in, per
publisher: `timestamps = true` starts each line with the time its chunk was read
("2026-12-06 03:38:53.123 "), `stderr = "marked"` starts stderr lines with "stderr| ", and
`stderr = "separate"` writes them to `<name>.err.log` instead. A prefix costs one join and one
bytes.replace per chunk (C calls, no Python work per line); measured here, 100 MB of 60-byte
lines in 256 KiB chunks to /dev/shm (load average 13): 390-420 MB/s plain, 275 MB/s marked,
237 MB/s with timestamps. Three departures from "the bytes as written":

- an incomplete line that grows past `max_line` is written `max_line` bytes at a time, each piece
  followed by an added b"\\n": the file can't keep a line open while the other stream writes;
- at EOF an incomplete last line is written with an added b"\\n";
- complete lines longer than `max_line` that arrive whole are written uncut (only the ring cuts).

The file is written by the log directory's own thread (`pubmon.core.logwriter`), never on the event
loop: storage that hangs cannot stop the loop. A sink whose writer falls behind pauses its pipe
(`attach_pipe`), so a slow disk slows the child as blocking writes did and loses nothing; storage
that makes no progress at all for a while is declared stalled, and then the runs the writer's
queue cannot hold are dropped from the file. Lines always reach the ring and `tail -f`.

Nothing is dropped silently. `dropped` counts the lines and `dropped_bytes` the bytes that did not
reach the file, for any reason: the queue was full while the storage stalled, the file could not
be opened or written (ENOSPC, EIO, a symlink refused; see `pubmon.core.logfile.LogFile`), or the log
was closed. Each failure episode is logged once when it starts and once, with what it lost, when
it ends.
"""

from __future__ import annotations

__all__ = [
    "MAX_TAIL_LINES",
    "LogChunk",
    "LogCleared",
    "LogLine",
    "OutputLog",
    "StreamSink",
    "file_name",
    "finish_writing",
]

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, final

from pubmon.config.model import LogSpec
from pubmon.core import logwriter as _logwriter
from pubmon.core import stdout as _stdout
from pubmon.core.logfile import Buf, LogFile
from pubmon.core.logwriter import DirWriter
from pubmon.core.ring import LONG_LINE, Ring, extra_pieces, newlines, split_block

logger = logging.getLogger(__name__)

MAX_TAIL_LINES = 10_000  # cap on the lines one tail()/last() call returns

Stream = Literal["stdout", "stderr"]


class Pipe(Protocol):
    """What a sink pauses: asyncio's read-pipe transport, or an adopted child's pipe."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def finish_writing(timeout: float = _logwriter.EXIT_WAIT) -> int:
    """Before the process exits: give the log writers `timeout` seconds in all to write what is
    queued; abandon (and name, in one warning each) those stuck on hung storage. Returns how
    many were abandoned. Called by the daemon, whose `os._exit` skips the atexit hook that
    does the same for other programs."""
    return _logwriter.finish(timeout)


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int  # 1, 2, 3, ... per publisher, continuing across restarts of the child
    time: float  # time.time() when the chunk holding it was read
    stream: str  # "stdout" | "stderr"
    text: str  # without the newline; UTF-8 decoded with errors="backslashreplace"
    partial: bool  # a cut of a line longer than max_line, or a last line with no newline at EOF


@dataclass(frozen=True, slots=True)
class LogChunk:
    lines: list[LogLine]
    next_seq: int  # the cursor for the next call: the last line's seq, or unchanged / resynced
    missed: int  # lines after the cursor that were evicted from the ring before this call


@dataclass(frozen=True, slots=True)
class LogCleared:
    """What `OutputLog.clear` did."""

    lines: int  # lines dropped from the ring
    files: list[str]  # files emptied or removed
    error: str  # "" or why the files could not (all) be cleared


def file_name(name: str) -> str:
    """The log file of instance `name`: "api:0" -> "api-0.log" (a ':' in a file name trips
    scp, rsync host:path arguments and logrotate globs). load.py refuses two instances whose
    file names would be the same."""
    return name.replace(":", "-") + ".log"


class _Stamp:
    """The file's line prefix "2026-12-06 03:38:53.123 ", strftime'd once a second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second, self.text = -1, ""

    def __call__(self, now: float) -> bytes:
        second = int(now)
        if second != self.second:
            self.second = second
            self.text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self.text}.{int(now * 1000) % 1000:03d} ".encode()


@final
class StreamSink:
    """One pipe of one spawn. Keeps the stream's incomplete last line between chunks.

    `feed` and `eof` are synchronous, called from the protocol callbacks, and never raise on
    any data (file errors are counted, not raised). `attach_pipe` gives it the pipe it reads,
    which it pauses while the log file's writer is behind; without one, `feed` called outside an
    event loop waits instead (at most `pubmon.core.logwriter.STALL_SECONDS`), and on a loop it
    is not held back at all (its runs queue up for as long as the writer moves).
    """

    __slots__ = ("_log", "_long", "_paused", "_pipe", "_stream", "_tail")

    def __init__(self, log: OutputLog, stream: Stream) -> None:
        self._log = log
        self._stream = stream
        self._tail: bytes | bytearray = b""  # a bytearray while a line grows over many chunks
        self._pipe: Pipe | None = None
        self._paused = False
        self._long = False  # the last chunk's lines were long: count its successor's by finds

    def attach_pipe(self, pipe: Pipe) -> None:
        """The pipe feeding this sink: paused while the log writer is behind."""
        self._pipe = pipe

    def feed(self, data: bytes) -> None:
        log = self._log
        log.bytes += len(data)
        end = data.rfind(b"\n") + 1
        if not end:
            if data:
                self._grow(data)
            return
        cut = log._max_line
        tail = self._tail
        # The first line starts in the carried tail; measure it exactly. The others are measured by
        # extra_pieces, which for lines shorter than max_line / 2 is one find per window.
        first = data.find(b"\n")
        head = len(tail) + first
        extra = (head - 1) // cut if head > cut else 0
        extra += extra_pieces(data, first + 1, end, cut)
        nlines = 1 + newlines(data, first + 1, end, end // LONG_LINE if self._long else 0)
        self._long = end >= nlines * LONG_LINE
        prefix = bytes(tail)  # no copy when it already is bytes
        self._tail = data[end:]
        body: Buf = data if end == len(data) else memoryview(data)[:end]
        behind = log._emit(
            self._stream,
            nlines + extra,
            prefix,
            data,
            end,
            cut if extra else 0,
            (prefix, body) if prefix else (body,),
            len(prefix) + end,
        )
        if behind:
            self._hold(behind)

    def eof(self) -> None:
        """The pipe closed: an incomplete last line becomes a partial line (file: plus b"\\n")."""
        tail, self._tail = self._tail, b""
        if tail:
            block = bytes(tail)
            cut = self._log._max_line
            nlines = (len(block) - 1) // cut + 1  # > 1 only if max_line shrank meanwhile
            size = len(block)
            self._log._emit(self._stream, nlines, b"", block, size, cut, (block, b"\n"), size + 1)

    def _grow(self, data: bytes) -> None:
        """A chunk with no newline: extend the tail; whole max_line pieces beyond it go out now."""
        tail = self._tail
        if not isinstance(tail, bytearray):
            tail = self._tail = bytearray(tail)  # amortized appends for a line of many chunks
        tail += data
        cut = self._log._max_line
        if len(tail) > cut:
            nlines = (len(tail) - 1) // cut  # leaves 1..max_line bytes, which may yet end the line
            block = bytes(tail[: nlines * cut])
            del tail[: nlines * cut]
            pieces = [block[i : i + cut] for i in range(0, len(block), cut)]
            pieces.append(b"")  # each piece gets its b"\n" in the file
            written = b"\n".join(pieces)
            behind = self._log._emit(
                self._stream, nlines, b"", block, len(block), cut, (written,), len(written)
            )
            if behind:
                self._hold(behind)

    def _hold(self, writer: DirWriter) -> None:
        """The file's writer is behind: pause the pipe until it catches up (or wait, pipeless).

        Paused first, then handed to the writer: its thread may catch up at any moment, also
        while `hold` runs (the loop thread lets go of the GIL in the epoll_ctl that starts the
        watch), and `hold` then calls `_resume` before it returns. Paused after that resume, the
        pipe would stay paused for good: its child blocked, its output missing from the file
        and from the ring, and no stall declared, since nothing waits any more.
        """
        pipe = self._pipe
        if pipe is None:
            if asyncio._get_running_loop() is None:  # a caller thread may wait; the loop never
                writer.wait_for_room()
        elif not self._paused:
            self._paused = True
            pipe.pause_reading()
            if not writer.hold(self._resume):
                self._resume()  # room already: the writer caught up since `submit`

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            assert self._pipe is not None
            self._pipe.resume_reading()  # a no-op on a pipe closed meanwhile


@final
class OutputLog:
    """All output of one publisher: the file sink, the ring, the counters.

    Counters (plain ints): `lines` seen (fragments included), `bytes` seen, and what never
    reached the file: `dropped` lines and `dropped_bytes`. The ring always has every line (up to
    its limits).
    """

    def __init__(self, name: str, spec: LogSpec, log_dir: str | None) -> None:
        self.name = name
        self.lines = 0
        self.bytes = 0
        self._base = file_name(name).removesuffix(".log")
        self.path = None if log_dir is None else os.path.join(log_dir, f"{self._base}.log")
        self._log_dir = log_dir
        self._spec = spec
        self._ring = Ring(spec.ring_lines)
        self._max_line = max(1, spec.max_line)
        self._echo = spec.echo
        self._echo_prefix = f"{name}| ".encode()
        self._waiters: set[asyncio.Future[None]] = set()  # wait_beyond() callers, woken per block
        self._dropped_lines = 0  # not queued for the file (full queue, closed); loop side only
        self._dropped_bytes = 0
        self._lost_before = (0, 0)  # (bytes, lines) lost by files replaced on reopen-after-close
        self._overflow_from: tuple[int, int] | None = None  # set while the queue turns runs away
        self._writer: DirWriter | None = None
        self._last_writer: DirWriter | None = None  # for sync/flushed after close
        self._file: LogFile | None = None
        self._err_file: LogFile | None = None  # stderr = "separate": <name>.err.log
        self._stamp = _Stamp()
        if log_dir is not None:
            self._open_file(log_dir)

    def __repr__(self) -> str:
        return (
            f"<OutputLog {self.name!r} last_seq={self.last_seq} bytes={self.bytes}"
            f" dropped={self.dropped} file={self.path!r}>"
        )

    @property
    def files(self) -> list[LogFile]:
        return [f for f in (self._file, self._err_file) if f is not None]

    @property
    def paths(self) -> list[str]:
        """The log files: <name>.log, and <name>.err.log with stderr = "separate"."""
        return [f.path for f in self.files]

    @property
    def dropped(self) -> int:
        """Lines that did not reach the file (whatever the reason; the ring has them)."""
        lost = sum(f.lost_lines for f in self.files)
        return self._dropped_lines + self._lost_before[1] + lost

    @property
    def dropped_bytes(self) -> int:
        """Bytes of lines that did not reach the file, as they would have been written."""
        lost = sum(f.lost_bytes for f in self.files)
        return self._dropped_bytes + self._lost_before[0] + lost

    def open_stream(self, stream: Stream) -> StreamSink:
        """A fresh splitter for one pipe of one spawn."""
        return StreamSink(self, stream)

    def reconfigure(self, spec: LogSpec) -> None:
        """Apply new limits now (reload). The ring trims at once; the file stays open."""
        self._spec = spec
        self._max_line = max(1, spec.max_line)
        self._echo = spec.echo
        self._ring.keep_lines = spec.ring_lines
        self._ring.trim()
        writer = self._writer
        if writer is not None and (spec.stderr == "separate") != (self._err_file is not None):
            if self._err_file is None:
                self._err_file = self._new_file(f"{self._base}.err.log", None)
                writer.reopen(self._err_file)
            else:
                writer.close(self._err_file)
                self._err_file = None
        for file in self.files:
            file.max_bytes = spec.max_bytes  # read by the writer thread before each write
            file.backups = spec.backups
            if (file.gid, file.mode) != (spec.group, spec.mode):
                file.gid, file.mode = spec.group, spec.mode
                if writer is not None:
                    writer.reopen(file)  # applied now, by the open

    def reopen(self) -> None:
        """Close and reopen the file (SIGUSR1, after logrotate moved it). No-op without a file.

        Returns at once: the writer thread reopens it after the lines queued before.
        """
        if self._log_dir is None:
            return
        if self._writer is None:  # closed: start again with fresh file objects
            lost = self._lost_before
            self._lost_before = (
                lost[0] + sum(f.lost_bytes for f in self.files),
                lost[1] + sum(f.lost_lines for f in self.files),
            )
            self._open_file(self._log_dir)
            return
        for file in self.files:
            self._writer.reopen(file)

    async def clear(self, timeout: float = 5.0) -> LogCleared:
        """Empty the ring (for new readers: a follower's cursor stays valid) and the log files,
        removing their rotated copies (`pubmon clear`). Lines queued before are cleared with the
        file; lines fed after go to the emptied file. Waits for the writer at most `timeout`.
        """
        dropped = self._ring.clear()
        writer = self._writer
        if writer is None:
            return LogCleared(dropped, [], "")
        files = self.files
        for file in files:
            file.cleared = None
            writer.clear(file)
        if not await writer.flushed(timeout):
            return LogCleared(
                dropped, [], f"the log writer did not get to it within {timeout:g} s"
                f" ({writer.busy()}); it will clear the files when it does",
            )  # fmt: skip
        paths: list[str] = []
        errors: list[str] = []
        for file in files:
            done, error = file.cleared or ([], "not cleared")
            paths += done
            if error:
                errors.append(error)
        return LogCleared(dropped, paths, "; ".join(errors))

    def close(self) -> None:
        """Close the file. Lines fed afterwards still reach the ring and count as dropped.

        Returns at once: the writer thread writes what is queued, then closes the file. Whoever
        must know when that happened awaits `flushed` first; the process's exit waits for it
        (at most `pubmon.core.logwriter.EXIT_WAIT` seconds, then gives up and says so).
        """
        writer, self._writer = self._writer, None
        if writer is not None:
            for file in self.files:
                writer.close(file)
            _logwriter.release(writer)

    def sync(self, timeout: float = 10.0) -> bool:
        """Block until the file holds every line fed so far (or failed them). For tests and
        tools, never the event loop: False if `timeout` passed first."""
        writer = self._last_writer
        return writer.sync(timeout) if writer is not None else True

    async def flushed(self, timeout: float = 10.0) -> bool:
        """Like `sync`, awaited on the loop."""
        writer = self._last_writer
        return await writer.flushed(timeout) if writer is not None else True

    def _open_file(self, log_dir: str) -> None:
        writer = self._writer = self._last_writer = _logwriter.acquire(log_dir)
        # An older pubmon named "api:0" files "api:0.log": the first open renames them.
        legacy = f"{self.name}.log" if ":" in self.name else None
        self._file = self._new_file(f"{self._base}.log", legacy)
        writer.reopen(self._file)
        self._err_file = None
        if self._spec.stderr == "separate":
            self._err_file = self._new_file(f"{self._base}.err.log", None)
            writer.reopen(self._err_file)

    def _new_file(self, name: str, legacy: str | None) -> LogFile:
        assert self._writer is not None
        spec = self._spec
        return LogFile(
            self.name,
            self._writer.dir,
            name,
            spec.max_bytes,
            spec.backups,
            legacy=legacy,
            gid=spec.group,
            mode=spec.mode,
        )

    @property
    def last_seq(self) -> int:
        return self._ring.last_seq

    def tail(self, after_seq: int, max_lines: int) -> LogChunk:
        """Lines with seq > after_seq, oldest first, at most `max_lines` (clamped to 1..10000).

        `missed` counts the lines after the cursor that the ring no longer holds. A cursor in the
        future (the daemon restarted, numbering began again) gets no lines and next_seq = last_seq.
        """
        limit = min(max(max_lines, 1), MAX_TAIL_LINES)
        raw, next_seq, missed = self._ring.read(after_seq, limit)
        lines = [
            LogLine(seq, when, stream, text.decode("utf-8", "backslashreplace"), partial)
            for seq, when, stream, text, partial in raw
        ]
        return LogChunk(lines, next_seq, missed)

    def last(self, n: int) -> LogChunk:
        """The newest `n` lines (at most 10000); `missed` counts those already evicted."""
        n = min(n, MAX_TAIL_LINES)
        if n <= 0:
            return LogChunk([], self.last_seq, 0)
        return self.tail(max(0, self.last_seq - n), n)

    async def wait_beyond(self, seq: int) -> None:
        """Return once last_seq > seq. Cancellable; a cancelled wait leaves no waiter behind.

        One future per waiter, made on the running loop (an Event kept between calls would stay
        bound to the loop that first waited on it).
        """
        while self._ring.last_seq <= seq:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)

    def _emit(
        self,
        stream: str,
        nlines: int,
        prefix: bytes,
        data: bytes,
        end: int,
        cut: int,
        file_bufs: Sequence[Buf],
        file_bytes: int,
    ) -> DirWriter | None:
        """One block of lines, `prefix + data[:end]` framed with `cut`: to file, ring, waiters.

        Returns the file's writer when it is behind (the caller holds its pipe back), else None.
        """
        self.lines += nlines
        writer = self._writer
        behind = None
        now = time.time()
        if writer is not None:
            spec = self._spec
            file = self._file
            if stream == "stderr":
                if self._err_file is not None:
                    file = self._err_file
                elif spec.stderr == "marked":
                    file_bufs, file_bytes = _prefixed(file_bufs, b"stderr| ")
            if spec.timestamps:
                file_bufs, file_bytes = _prefixed(file_bufs, self._stamp(now))
            assert file is not None
            if writer.submit(file, file_bufs, file_bytes, nlines):
                if self._overflow_from is not None:
                    self._overflow_ended()
                if writer.congested():
                    behind = writer
            else:
                self._dropped_lines += nlines
                self._dropped_bytes += file_bytes
                if self._overflow_from is None:
                    self._overflow_began(writer, file_bytes, nlines)
        elif self._file is not None:  # closed
            self._dropped_lines += nlines
            self._dropped_bytes += file_bytes
        self._ring.add(nlines, now, stream, prefix, data, end, cut)
        stdout = _stdout.sink  # [daemon] log_stdout: replaces echo, which would repeat each line
        if stdout is not None:
            stdout.add(self.name, stream, prefix + data[:end], cut)
        elif self._echo:
            self._echo_block(prefix + data[:end], cut)
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return behind

    def _overflow_began(self, writer: DirWriter, nbytes: int, nlines: int) -> None:
        self._overflow_from = (self._dropped_bytes - nbytes, self._dropped_lines - nlines)
        logger.warning(
            "%s: log file %s: its writer is stalled (%s) and the queue is full; dropping lines"
            " from the file until it catches up (they still reach the ring and tail)",
            self.name,
            self.path,
            writer.busy(),
        )

    def _overflow_ended(self) -> None:
        assert self._overflow_from is not None
        nbytes = self._dropped_bytes - self._overflow_from[0]
        nlines = self._dropped_lines - self._overflow_from[1]
        self._overflow_from = None
        logger.info(
            "%s: log file %s: queueing lines for the file again; %d bytes (%d lines) dropped"
            " meanwhile",
            self.name,
            self.path,
            nbytes,
            nlines,
        )

    def _echo_block(self, block: bytes, cut: int) -> None:
        """Copy lines to the daemon's stderr as `name| line` (opt-in: per-line work, may block)."""
        prefix = self._echo_prefix
        out = b"".join([prefix + text + b"\n" for text, _ in split_block(block, cut)])
        try:
            fd = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            fd = 2
        view = memoryview(out)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            pass  # the daemon's own stderr is gone; the file and the ring still have the lines


def _prefixed(bufs: Sequence[Buf], prefix: bytes) -> tuple[tuple[bytes], int]:
    """Whole lines (the last ends in b"\\n") with `prefix` before each, in C calls only."""
    block = b"".join(bufs)
    out = prefix + block[:-1].replace(b"\n", b"\n" + prefix) + b"\n"
    return (out,), len(out)

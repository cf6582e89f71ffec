"""Micro benchmark of pubmon.core.output: how fast child output reaches the ring and the log file.

    .venv/bin/python bench/bench_output.py [--mb 200] [--repeat 5] [--dir DIR]

Prints one JSON object per measurement (MB = 10**6 bytes, best and median of --repeat runs):
- baseline_write_count_100B_lines: os.write + bytes.count per chunk, no OutputLog: the floor;
- feed_100B_lines: 100-byte lines in 256 KiB chunks fed straight into OutputLog (the fast path),
  timed until the log writer thread has written them all (no pipe to pause: the feeding waits
  whenever the writer is 16 MiB behind);
- feed_100B_lines_ring_only: the same with log_dir None (no file);
- feed_long_lines_mixed: every chunk also holds a 100 KiB line, more than max_line (the slow path);
- feed_1MiB_lines: lines of 1 MiB, so most chunks carry no newline and are cut into fragments;
- e2e_*: a real child writing 200 MB of 100-byte lines (os.write of 1 MiB blocks) through a pipe
  enlarged to 1 MiB, read by asyncio (256 KiB per read) through a SubprocessProtocol into
  (pubmon) OutputLog, its sinks pausing the pipes while the writer thread is behind, timed
  until the file holds everything, (file_count) only a file write plus bytes.count, as in
  DESIGN.md "Output", or (discard) nothing, the ceiling of the pipe itself.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from pubmon.config.model import LogSpec
from pubmon.core.output import OutputLog

F_SETPIPE_SZ = 1031
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
CHUNK = 256 * 1024
LINE = 100

CHILD = """
import os, sys
total = int(sys.argv[1])
line = b"x" * 99 + b"\\n"
block = line * ((1 << 20) // len(line))
done = 0
while done < total:
    view = memoryview(block)[: total - done]
    while view:
        view = view[os.write(1, view) :]
    done += len(block)
"""


def lines_of(size: int, count: int, seed: int = 0) -> bytes:
    """`count` lines of `size` bytes (newline included), each numbered."""
    body = size - 1
    return b"".join(b"%0*d\n" % (body, (seed + i) % 10**body) for i in range(count))


def chunks(stream: bytes, total: int) -> Iterator[bytes]:
    """Up to `total` bytes of `stream` repeated, in CHUNK pieces (lines straddle chunks)."""
    sliced = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    sent = 0
    while sent < total:
        for piece in sliced:
            yield piece
            sent += len(piece)
            if sent >= total:
                return


def fast_stream() -> bytes:
    # CHUNK lines of 100 bytes: 100 chunks whose repetition is itself a stream of whole lines
    return lines_of(LINE, CHUNK)


def mixed_stream() -> bytes:
    long = b"L" * (100 * 1024) + b"\n"
    short = lines_of(LINE, (CHUNK - len(long)) // LINE)
    return (long + short) * 64


def long_stream() -> bytes:
    return (b"M" * ((1 << 20) - 1) + b"\n") * 16


def bench_feed(
    name: str, make: Callable[[], bytes], total: int, repeat: int, root: str | None
) -> None:
    """Chunks straight into an OutputLog (root None: ring only, no file)."""
    prepared = list(chunks(make(), total))  # materialize: time the sink, not the slicing
    times = []
    for run in range(repeat):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            log = OutputLog(f"bench:{run}", LogSpec(), None if root is None else tmp)
            sink = log.open_stream("stdout")
            start = time.perf_counter()
            for piece in prepared:
                sink.feed(piece)
            sink.eof()
            assert log.sync(60)  # the writer thread has written it all
            times.append(time.perf_counter() - start)
            log.close()
    report(name, log.bytes, times, lines=log.lines, chunk=CHUNK)


def bench_baseline(total: int, repeat: int, root: str) -> None:
    """The floor of any design that writes and counts: os.write + bytes.count per chunk."""
    prepared = list(chunks(fast_stream(), total))
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            out = os.open(os.path.join(tmp, "raw.log"), _FLAGS, 0o640)
            start = time.perf_counter()
            newlines = 0
            for piece in prepared:
                os.write(out, piece)
                newlines += piece.count(b"\n")
            times.append(time.perf_counter() - start)
            os.close(out)
    report("baseline_write_count_100B_lines", sum(map(len, prepared)), times, lines=newlines)


class _Forward(asyncio.SubprocessProtocol):
    def __init__(
        self,
        feed: Callable[[int, bytes], None],
        eof: Callable[[int], None],
        attach: Callable[[int, asyncio.ReadTransport], None],
    ) -> None:
        self.feed = feed
        self.attach = attach
        self.eof = eof
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pipes = 2
        self.exited = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        for fd in (1, 2):
            pipe = transport.get_pipe_transport(fd)
            assert isinstance(pipe, asyncio.ReadTransport)
            self.attach(fd, pipe)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.feed(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.eof(fd)
        self.pipes -= 1
        self.check()

    def process_exited(self) -> None:
        self.exited = True
        self.check()

    def check(self) -> None:
        if not self.pipes and self.exited and not self.done.done():
            self.done.set_result(None)


async def run_child(total: int, handlers: Handlers) -> None:
    feed, eof, attach, _ = handlers
    loop = asyncio.get_running_loop()
    transport, proto = await loop.subprocess_exec(
        lambda: _Forward(feed, eof, attach),
        sys.executable,
        "-c",
        CHILD,
        str(total),
        stdin=asyncio.subprocess.DEVNULL,
    )
    for fd in (1, 2):
        pipe = transport.get_pipe_transport(fd)
        assert pipe is not None
        fcntl.fcntl(pipe.get_extra_info("pipe").fileno(), F_SETPIPE_SZ, 1 << 20)
    try:
        await proto.done
    finally:
        transport.close()
    assert transport.get_returncode() == 0


Handlers = tuple[
    Callable[[int, bytes], None],
    Callable[[int], None],
    Callable[[int, asyncio.ReadTransport], None],
    Callable[[], None],
]


def e2e_handlers(kind: str, tmp: str, total: int) -> Handlers:
    """(feed, eof, attach, finish) for one end-to-end variant."""
    if kind == "pubmon":
        log = OutputLog("e2e", LogSpec(), tmp)
        sinks = {1: log.open_stream("stdout"), 2: log.open_stream("stderr")}

        def finish() -> None:
            assert log.sync(60)
            assert log.bytes == total and log.dropped == 0, log
            log.close()

        return (
            lambda fd, data: sinks[fd].feed(data),
            lambda fd: sinks[fd].eof(),
            lambda fd, pipe: sinks[fd].attach_pipe(pipe),
            finish,
        )
    if kind == "file_count":
        out = os.open(os.path.join(tmp, "raw.log"), _FLAGS, 0o640)
        newlines = [0]

        def feed(fd: int, data: bytes) -> None:
            os.write(out, data)
            newlines[0] += data.count(b"\n")

        return feed, (lambda fd: None), (lambda fd, pipe: None), (lambda: os.close(out))
    return (lambda fd, data: None), (lambda fd: None), (lambda fd, pipe: None), (lambda: None)


def bench_e2e(total: int, repeat: int, root: str) -> None:
    for kind in ("pubmon", "file_count", "discard"):
        times = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                handlers = e2e_handlers(kind, tmp, total)
                start = time.perf_counter()
                asyncio.run(run_child(total, handlers))
                handlers[-1]()  # finish: for pubmon, until the file holds everything
                times.append(time.perf_counter() - start)
        report(f"e2e_{kind}", total, times, read_max=CHUNK, pipe=1 << 20)


def report(name: str, size: int, times: list[float], **extra: object) -> None:
    best = min(times)
    print(
        json.dumps(
            {
                "bench": name,
                "mb": round(size / 1e6, 1),
                "best_s": round(best, 4),
                "median_s": round(statistics.median(times), 4),
                "mb_per_s": round(size / 1e6 / best),
                "median_mb_per_s": round(size / 1e6 / statistics.median(times)),
                **extra,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="megabytes per run (default 200)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best wins)")
    parser.add_argument("--dir", default=None, help="where the log files go (default: $TMPDIR)")
    args = parser.parse_args()
    total = args.mb * 10**6
    root = args.dir or tempfile.gettempdir()
    bench_baseline(total, args.repeat, root)
    bench_feed("feed_100B_lines", fast_stream, total, args.repeat, root)
    bench_feed("feed_100B_lines_ring_only", fast_stream, total, args.repeat, None)
    bench_feed("feed_long_lines_mixed", mixed_stream, total, args.repeat, root)
    bench_feed("feed_1MiB_lines", long_stream, total, args.repeat, root)
    bench_e2e(total, args.repeat, root)


if __name__ == "__main__":
    main()

"""Publisher lines on pubmon's own stdout (`[daemon] log_stdout`), for `docker logs` and
`kubectl logs`: `name | line` for a publisher's stdout, `name ! line` for its stderr.

Why a writer thread and a bounded buffer: whatever reads a container's stdout (a log shipper, a
terminal scrolled back, a full pipe) may stop reading. The event loop only appends whole framed
lines to a buffer (`add`, no system call); one thread writes them out. While the buffer is full,
new lines are dropped and counted, never the loop blocked: one warning when dropping starts,
one info line with the count when a block fits again (the same rules as the log files).

One writer writes every publisher line, whole: no two lines mix. It takes everything buffered
at once and writes it with one blocking write, which a pipe completes before returning: a
system call releases the GIL, and getting it back from a busy loop can take the 5 ms switch
interval, so fewer, larger writes are what keep up with a flood.
When stdout and stderr are the same pipe (`2>&1`, a container with a tty), pubmon's own log
lines share it: then writes are at most PIPE_BUF bytes, cut at line boundaries, which the kernel
keeps whole, so a log line never lands inside a publisher line (a publisher line longer than
PIPE_BUF is written alone); slower, so only then. Lines longer than the publisher's
`log.max_line` come out as pieces, each on its own line.

One stdout per process: the active sink is a module attribute (`sink`), installed by the daemon
and read by `OutputLog` for every block of lines.
"""

from __future__ import annotations

__all__ = ["StdoutSink", "install", "sink", "uninstall"]

import logging
import os
import select
import stat
import threading
from collections import deque

from pubmon.core.ring import split_block
from pubmon.host.threads import start_without_signals

logger = logging.getLogger(__name__)

MAX_BUFFER = 4 << 20  # bytes of framed lines waiting for the writer

sink: StdoutSink | None = None


class StdoutSink:
    """Frames lines, buffers them (bounded) and writes them to `fd` from a thread."""

    def __init__(self, fd: int = 1, *, max_buffer: int = MAX_BUFFER) -> None:
        self.fd = fd
        self.max_buffer = max_buffer
        self.lines = 0  # lines accepted into the buffer
        self.dropped = 0  # lines dropped: buffer full, or stdout failed
        self.error: str | None = None  # why stdout cannot be written (then everything drops)
        self._dropping = False
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._closing = False
        self._cond = threading.Condition()
        self._atomic = select.PIPE_BUF if _shares_pipe_with_stderr(fd) else max_buffer
        self._thread = threading.Thread(target=self._run, name="pubmon stdout", daemon=True)

    def start(self) -> None:
        start_without_signals(self._thread)

    def add(self, name: str, stream: str, block: bytes, cut: int) -> None:
        """The event loop's side: one block of lines of one publisher (see output.StreamSink)."""
        pieces = split_block(block, cut)
        if not pieces:
            return
        prefix = name.encode() + (b" | " if stream == "stdout" else b" ! ")
        out = b"".join([prefix + text + b"\n" for text, _ in pieces])
        with self._cond:
            # Once dropping, take lines again only when half the buffer is free: one episode
            # per stall, not a warning and an info line per block while it drains.
            limit = self.max_buffer // 2 if self._dropping else self.max_buffer
            fits = self.error is None and self._size + len(out) <= limit
            if fits:
                self._chunks.append(out)
                self._size += len(out)
                self.lines += len(pieces)
                self._cond.notify()
            else:
                self.dropped += len(pieces)
        if not fits and not self._dropping:
            self._dropping = True
            why = self.error or f"{self.max_buffer} bytes waiting: stdout is not being read"
            logger.warning("stdout: dropping publisher lines (%s); counting them", why)
        elif fits and self._dropping:
            self._dropping = False
            logger.info("stdout: writing publisher lines again; %d dropped so far", self.dropped)

    def close(self, timeout: float) -> bool:
        """Write what is buffered, waiting at most `timeout` s. False if lines were left."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = sum(c.count(b"\n") for c in self._chunks)
            self._chunks.clear()
            self._size = 0
            self.dropped += left
        if left:
            logger.warning("stdout: %d publisher line(s) not written at exit", left)
        return not left

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closing:
                    self._cond.wait()
                if not self._chunks:
                    return
                batch, size = list(self._chunks), self._size
                self._chunks.clear()
            data = b"".join(batch)
            try:
                self._write(data)
            except OSError as exc:
                with self._cond:
                    self.error = f"cannot write: {exc.strerror}"
                    self.dropped += sum(c.count(b"\n") for c in self._chunks) + data.count(b"\n")
                    self._chunks.clear()
            with self._cond:
                self._size -= size

    def _write(self, data: bytes) -> None:
        atomic, pos, end = self._atomic, 0, len(data)
        while pos < end:
            stop = end
            if end - pos > atomic:
                stop = data.rfind(b"\n", pos, pos + atomic) + 1
                if not stop:  # one line longer than PIPE_BUF: written alone
                    stop = data.find(b"\n", pos) + 1 or end
            piece = memoryview(data)[pos:stop]
            while piece:
                try:
                    piece = piece[os.write(self.fd, piece) :]
                except BlockingIOError:  # someone set O_NONBLOCK on the shared description
                    select.select([], [self.fd], [], 1.0)
            pos = stop


def _shares_pipe_with_stderr(fd: int) -> bool:
    try:
        out, err = os.fstat(fd), os.fstat(2)
    except OSError:
        return False
    return stat.S_ISFIFO(out.st_mode) and (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def install(new: StdoutSink) -> None:
    global sink
    new.start()
    sink = new


def uninstall(timeout: float) -> None:
    global sink
    old, sink = sink, None
    if old is not None:
        old.close(timeout)

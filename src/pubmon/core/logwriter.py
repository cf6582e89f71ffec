"""One thread per log directory writes the log files, so that storage can never stall the loop.

A log file system that hangs (NFS, a dead FUSE mount) blocks `open` and `write` for as long as it
hangs. Done on the event loop, that stopped watchdog pings, RPC and supervision, and systemd then
killed the daemon with every publisher. Now every file operation (open, write, rotate, reopen,
close) runs on the thread of the file's directory, fed by a queue of operations in order::

    loop thread                                 writer thread of /var/log/pubmon
    sink.feed -> ring, tail -f (always)
              -> writer.submit(file, run) ----> writev as many queued runs of a file as fit
                                                in one call (fewer syscalls than one per chunk)

Flow control. The queue is bounded by HIGH bytes (a run is charged at least one page: a small
pipe read can pin a page of its own). While the writer makes progress, a sink whose run takes
the queue past HIGH pauses its pipe (`pause_reading`): a fast child then waits on its full pipe,
exactly as with blocking writes, and no line is lost to a slow disk. Once the queue is below LOW
the pipes resume. If the writer has finished nothing for STALL_SECONDS while pipes wait, the
storage counts as stalled: one warning names the directory and the operation stuck, the pipes
resume, and runs that do not fit under HIGH are dropped (counted per publisher by the caller)
instead of holding the children back. The first operation the thread finishes afterwards ends
the stall (one info line); the queued runs are written then, in order. A sink with no pipe to
pause, fed outside any event loop (tools, tests), waits for the queue instead, at most
STALL_SECONDS; on a loop it never waits.

While the writer moves, no run is refused: each reader pauses only after the run that took the
queue past HIGH, so the queue passes HIGH by at most one run per reader, bytes already read into
memory. A fixed cap (HARD, 64 MiB) used to lose lines to storage that was only behind, never
stalled, and call it a stall: five children ending 16 MiB lines (max_line's limit) in one loop
turn, or about 200 whose pipes were read (256 KiB each) in one loop turn.

Children never inherit a log fd. A FUSE file system sends a FLUSH request on every close of
every copy of an fd, and a spawned child closes its inherited copies before exec (close_fds):
with the log storage hung, that close hung the vfork, and with it the loop. So the thread gives
itself a private fd table (unshare(CLONE_FILES)) before it opens anything: its log files and
directory fd are in no table a child is forked from. The copies of the daemon's fds that the
private table starts with are pointed at /dev/null (dup2, so their numbers stay taken: a log
handler's or the loop's fd number can never come to mean a log file in this thread). So the
thread cannot wake the loop through the loop's self-pipe (`call_soon_threadsafe`): each writer
has a wake-up pipe of its own, made before the thread starts and kept in its table, which the
loop reads only while a pipe is paused or a stall is declared (plus a slow tick that declares
stalls).

Lifetime. `acquire(path)` returns the directory's writer, starting its thread; `release` stops
it after everything queued so far (the supervisor closes a log when a publisher is removed and
at shutdown). The threads are daemon threads: a thread stuck in a hung write must not keep the
process alive. An exit hook gives the writers still running EXIT_WAIT seconds in all to finish
the queued work, then abandons them with one warning each (which file, how long stuck, how much
was left unwritten): shutdown never hangs on hung storage.
"""

from __future__ import annotations

__all__ = [
    "EXIT_WAIT",
    "HIGH",
    "LOW",
    "STALL_SECONDS",
    "DirWriter",
    "acquire",
    "finish",
    "release",
    "wait_all",
]

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import final

from pubmon.core.logfile import Buf, LogDir, LogFile, Run
from pubmon.host.threads import start_without_signals

logger = logging.getLogger(__name__)

HIGH = 16 << 20  # queued bytes above which sinks pause their pipes (or, stalled, drop)
LOW = 4 << 20  # paused pipes resume once the queue is below this
PAGE = 4096  # the least a queued run is charged
STALL_SECONDS = 2.0  # no operation finished for this long while pipes wait: the storage is stuck
EXIT_WAIT = 5.0  # seconds, in all, that the exit hook waits for writers to finish
_BATCH = 4096  # operations taken from the queue per pass
POLL = 0.01  # seconds between looks at a writer that a `flushed` caller waits for
TICK = 0.1  # seconds between the loop side's looks at a writer while pipes wait or it stalls
_CLONE_FILES = 0x400
_libc = ctypes.CDLL(None, use_errno=True)

# Operations: (kind, file, payload, cost). Writes carry a Run; marks a callback.
_WRITE, _REOPEN, _CLOSE, _MARK, _STOP, _CLEAR = range(6)
_Op = tuple[int, LogFile | None, object, int]


@final
class DirWriter:
    """The writer thread of one log directory, and the loop-side flow control around it.

    `submit`, `congested`, `hold` and `reopen`/`close` are called from the event loop thread (or
    one caller thread, without a loop); everything else runs on the writer thread.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.dir = LogDir(path)
        self.stalled = False  # set by the loop side, cleared when the writer progresses again
        self.refs = 0
        self._stopping = False
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._submitted = 0  # bytes charged by submit (loop side only)
        self._consumed = 0  # bytes charged of runs handled (writer thread only)
        self._progress = 0  # operations finished (writer thread only)
        self._busy: tuple[str, float] | None = None  # (what, since) while the thread is in one
        self._stall_began = 0.0
        self._stall_polled = False  # declared by the loop side's poll, which also ends it
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._waiting = 0  # callers blocked in wait_for_room
        self._holders: list[Callable[[], None]] = []  # resume callbacks of paused pipes
        self._timer: asyncio.TimerHandle | None = None  # the loop side's tick, while it waits
        self._seen = (0, 0.0)  # progress, and when the loop side last saw it change
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._want_wake = False  # the loop side waits: write a byte to _wake_w on news
        self._reader: asyncio.AbstractEventLoop | None = None  # the loop reading _wake_r
        self._private = False  # the thread has its own fd table (else: no wake-ups, ticks only)
        self._thread = threading.Thread(target=self._run, name=f"pubmon-log:{path}", daemon=True)

    def __repr__(self) -> str:
        return (
            f"<DirWriter {self.path!r} queued={self.pending} refs={self.refs}"
            f" stalled={self.stalled}>"
        )

    @property
    def pending(self) -> int:
        """Bytes charged for runs queued and not yet handled."""
        return self._submitted - self._consumed

    # --- loop side ----------------------------------------------------------------------------

    def submit(self, file: LogFile, bufs: Sequence[Buf], nbytes: int, nlines: int) -> bool:
        """Queue one run of whole lines for `file`. False: dropped (stalled, and past HIGH).
        While the writer moves every run is taken; its sink holds back after (`congested`)."""
        cost = nbytes if nbytes > PAGE else PAGE
        if self.stalled and self._submitted - self._consumed + cost > HIGH:
            return False
        self._submitted += cost
        self._queue.put((_WRITE, file, (bufs, nbytes, nlines), cost))
        return True

    def congested(self) -> bool:
        """True when a sink should hold back: the queue is past HIGH and the writer progresses."""
        return self._submitted - self._consumed > HIGH and not self.stalled

    def hold(self, resume: Callable[[], None]) -> bool:
        """A sink has paused its pipe: call `resume` on the loop once there is room again (or
        the writer is declared stalled), which may be before `hold` returns (the thread may
        catch up meanwhile). False: there is room already; `resume` will not be called."""
        if self._submitted - self._consumed <= LOW:
            return False
        self._holders.append(resume)
        self._watch()
        return True

    def wait_for_room(self) -> None:
        """Block the caller (a sink with no pipe to pause) until the queue is below LOW, at most
        STALL_SECONDS; with no progress meanwhile, declare the storage stalled."""
        seen = self._progress
        with self._drained:
            self._waiting += 1
            try:
                room = self._drained.wait_for(
                    lambda: self._submitted - self._consumed <= LOW, timeout=STALL_SECONDS
                )
            finally:
                self._waiting -= 1
        if not room and self._progress == seen:
            self._declare_stalled(polled=False)

    def reopen(self, file: LogFile) -> None:
        self._queue.put((_REOPEN, file, None, 0))

    def close(self, file: LogFile) -> None:
        self._queue.put((_CLOSE, file, None, 0))

    def clear(self, file: LogFile) -> None:
        """Empty `file` and remove its backups, after the runs queued before (`pubmon clear`)."""
        self._queue.put((_CLEAR, file, None, 0))

    def mark(self, done: Callable[[], None]) -> None:
        """Call `done` on the writer thread once everything queued before it is handled."""
        self._queue.put((_MARK, None, done, 0))

    def sync(self, timeout: float) -> bool:
        """Block until everything queued so far is handled. False if `timeout` passed first."""
        if self._stopping:
            return self.join(timeout)
        event = threading.Event()
        self.mark(event.set)
        return event.wait(timeout)

    async def flushed(self, timeout: float) -> bool:
        """Wait (on the loop) until everything queued so far is handled. False on timeout."""
        if self._stopping:
            return await asyncio.to_thread(self.join, timeout)
        event = threading.Event()
        self.mark(event.set)
        try:
            async with asyncio.timeout(timeout):
                while not event.is_set():
                    await asyncio.sleep(POLL)
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        start_without_signals(self._thread)

    def stop(self) -> None:
        """End the thread once everything queued so far is handled."""
        self._stopping = True
        self._queue.put((_STOP, None, None, 0))

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def busy(self) -> str:
        """What the thread is doing and for how long, for messages about a stuck writer."""
        busy = self._busy
        if busy is None:
            return "idle"
        what, since = busy
        return f"{what} for {time.monotonic() - since:.1f} s"

    def _watch(self) -> None:
        """Start watching the writer from the loop, unless it is watched already."""
        loop = asyncio.get_running_loop()
        if self._reader is not None and self._reader is not loop:
            self._unwatch()  # left over from a loop that has ended (tests run one per test)
        if self._timer is not None:
            return
        self._seen = (self._progress, time.monotonic())
        self._timer = loop.call_later(TICK, self._tick)
        if self._reader is None:
            loop.add_reader(self._wake_r, self._woken)
            self._reader = loop
        self._check()

    def _tick(self) -> None:
        self._timer = None
        if self._check():
            self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)

    def _woken(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self._check()

    def _check(self) -> bool:
        """Resume paused pipes once there is room, end a stall once the writer progresses,
        declare one when it has not for STALL_SECONDS. True while there is more to wait for."""
        self._want_wake = True  # first: news from now on wakes us, news before is seen below
        now = time.monotonic()
        progress = self._progress
        moved = progress != self._seen[0]
        if moved:
            self._seen = (progress, now)
        if self.stalled and moved:
            self._unstalled()
        stuck = now - self._seen[1] >= STALL_SECONDS
        if self._holders and (self._submitted - self._consumed <= LOW or stuck):
            if stuck:
                self._declare_stalled(polled=True)
            holders, self._holders = self._holders, []
            for resume in holders:
                resume()
        if self._holders or self.stalled:
            return True
        self._unwatch()
        return False

    def _unwatch(self) -> None:
        self._want_wake = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reader is not None:
            try:
                self._reader.remove_reader(self._wake_r)
            except RuntimeError:  # that loop is closed
                pass
            self._reader = None

    def _close_wake(self) -> None:
        """No user left: stop watching and close the loop side's copies of the wake-up pipe."""
        self._unwatch()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _declare_stalled(self, *, polled: bool) -> None:
        if self.stalled:
            return
        self._stall_began = time.monotonic()
        self._stall_polled = polled
        self.stalled = True
        logger.warning(
            "log directory %s: its writer finished nothing for %.0f s (%s); children's output"
            " is no longer held back for it, and what the queue cannot hold is dropped from the"
            " log files (it still reaches the ring and tail)",
            self.path,
            STALL_SECONDS,
            self.busy(),
        )

    def _unstalled(self) -> None:
        self.stalled = False
        logger.info(
            "log directory %s: writing again after %.1f s stalled",
            self.path,
            time.monotonic() - self._stall_began,
        )

    # --- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        self._private = _private_fd_table(keep=self._wake_w)
        try:
            while True:
                ops = [get()]
                while len(ops) < _BATCH:
                    try:
                        ops.append(get_nowait())
                    except queue.Empty:
                        break
                if not self._handle(ops):
                    return
        finally:
            self.dir.close()
            if self._private:
                # The copy in this thread's own table; absent when the loop side had closed
                # its copy before this thread unshared (a writer that closed at once).
                with contextlib.suppress(OSError):
                    os.close(self._wake_w)
            _live.discard(self)

    def _handle(self, ops: list[_Op]) -> bool:
        """Handle one batch in order; consecutive writes to one file go out together."""
        i, n = 0, len(ops)
        keep_going = True
        while i < n:
            kind, file, payload, cost = ops[i]
            if kind == _WRITE:
                assert file is not None
                runs: list[Run] = [payload]  # type: ignore[list-item]
                j = i + 1
                while j < n and ops[j][0] == _WRITE and ops[j][1] is file:
                    runs.append(ops[j][2])  # type: ignore[arg-type]
                    cost += ops[j][3]
                    j += 1
                self._step(f"writing {file.path}", file.write, runs)
                self._finished(cost, j - i)
                i = j
                continue
            if kind == _REOPEN:
                assert file is not None
                self._step(f"opening {file.path}", self._reopen, file)
            elif kind == _CLOSE:
                assert file is not None
                self._step(f"closing {file.path}", LogFile.close, file)
            elif kind == _CLEAR:
                assert file is not None
                self._step(f"clearing {file.path}", LogFile.clear, file)
            elif kind == _MARK:
                payload()  # type: ignore[operator]
            else:
                keep_going = False
            self._finished(0, 1)
            i += 1
        return keep_going

    def _reopen(self, file: LogFile) -> None:
        self.dir.refresh()
        file.reopen()

    def _step(self, what: str, fn: Callable[..., None], arg: object) -> None:
        self._busy = (what, time.monotonic())
        try:
            fn(arg)
        except Exception:  # a bug of ours: never let it end the thread and stop all logging
            logger.exception("log directory %s: unexpected error %s", self.path, what)
        finally:
            self._busy = None

    def _finished(self, cost: int, ops: int) -> None:
        with self._lock:
            self._consumed += cost
            self._progress += ops
            if self._waiting and self._submitted - self._consumed <= LOW:
                self._drained.notify_all()
        if self.stalled and not self._stall_polled:
            self._unstalled()  # declared by a pipeless caller: no loop polls for its end
        if self._private and self._want_wake and (self.stalled or self.pending <= LOW):
            self._want_wake = False
            try:
                os.write(self._wake_w, b"\0")  # this thread's own copy, kept by _private_fd_table
            except OSError:
                pass


def _private_fd_table(keep: int) -> bool:
    """Give the calling thread its own fd table, its copies of the process's fds but `keep`
    pointed at /dev/null. False if it could not: the thread then shares the process's table."""
    if _libc.unshare(_CLONE_FILES) != 0:
        err = ctypes.get_errno()
        logger.warning("log writer: cannot unshare its fd table (%s)", os.strerror(err))
        return False
    try:
        names = os.listdir("/proc/thread-self/fd")
    except OSError as exc:
        logger.warning("log writer: cannot list its fds (%s)", exc)
        return True
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    for name in names:
        fd = int(name)
        if fd > 2 and fd not in (null, keep):
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:
                pass
    os.close(null)
    return True


_registry: dict[str, DirWriter] = {}
_live: set[DirWriter] = set()  # started and not yet joined: what the exit hook waits for
_registry_lock = threading.Lock()


def acquire(path: str) -> DirWriter:
    """The writer of directory `path` (as given, not resolved), started on first use."""
    with _registry_lock:
        writer = _registry.get(path)
        if writer is None:
            writer = _registry[path] = DirWriter(path)
            _live.add(writer)
            writer.start()
        writer.refs += 1
        return writer


def release(writer: DirWriter) -> None:
    """One user fewer; the last one stops the thread after the work queued so far."""
    with _registry_lock:
        writer.refs -= 1
        if writer.refs > 0:
            return
        if _registry.get(writer.path) is writer:
            del _registry[writer.path]
    writer.stop()
    writer._close_wake()


def wait_all(timeout: float) -> list[DirWriter]:
    """Stop every writer after its queued work and wait, `timeout` in all; the ones left."""
    with _registry_lock:
        writers = list(_live)
        for writer in _registry.values():
            writer.refs = 0
        _registry.clear()
    deadline = time.monotonic() + timeout
    left = []
    for writer in writers:
        writer.stop()
    for writer in writers:
        if writer.join(max(0.0, deadline - time.monotonic())):
            _live.discard(writer)
        else:
            left.append(writer)
    return left


def finish(timeout: float = EXIT_WAIT) -> int:
    """At exit: let the writers finish their queued work, `timeout` seconds in all; abandon
    those that do not, with one warning each. Returns how many were abandoned.

    An abandoned thread stuck in the kernel may still hold the process back after it exits:
    a FUSE request already taken by its server waits uninterruptibly for the answer (an NFS
    hard mount is killable). Nothing in user space can end that wait; everything else is done.
    """
    left = wait_all(timeout)
    for writer in left:
        logger.warning(
            "log directory %s: its writer did not finish within %.0f s (%s); abandoning it with"
            " %d bytes of log lines unwritten",
            writer.path,
            timeout,
            writer.busy(),
            writer.pending,
        )
    return len(left)


atexit.register(finish)  # for programs that end normally (the daemon calls it itself)

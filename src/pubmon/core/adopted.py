"""A child this image did not spawn: a publisher carried over by `pubmon upgrade`.

After the exec, the child is still ours (the daemon kept its pid, so the child's parent pid
and its parent-death signal are unchanged), but asyncio knows nothing of it: there is no
SubprocessTransport. `AdoptedChild` gives the publisher the same surface as `process.Child`:

- exit: a pidfd (`os.pidfd_open`) watched with `loop.add_reader`; once it is readable the
  child has exited and `os.waitpid(pid, WNOHANG)` reaps it, by pid, with its status. A child
  that exited while the daemon was between the two images is a zombie: its pidfd is readable
  at once, and its status is the one it exited with;
- output: its stdout and stderr pipes (fds handed over through the exec) read by `loop.add_reader`
  callbacks (`_Pipe`) into the same kind of sinks `spawn()` uses, and paused by a sink while its
  log file's writer is behind, as a spawned child's pipes are;
- signals: to its process group, as `Child.signal` does.

The orphan reaper tracks it like a spawned child (`OrphanReaper.track`): a sweep never takes
its status.
"""

from __future__ import annotations

__all__ = ["AdoptedChild"]

import asyncio
import contextlib
import logging
import os
import signal

from pubmon.core.process import Child, Sink

logger = logging.getLogger(__name__)


class _Pipe:
    """One handed-over pipe read straight from the loop's selector into its sink: what
    asyncio's read-pipe transport does, without its set-up cost (2000 of them at 1000
    publishers are in the upgrade's pause)."""

    __slots__ = ("_child", "_loop", "fd", "reading", "sink", "stream")

    def __init__(self, child: AdoptedChild, stream: int, fd: int, sink: Sink) -> None:
        self._child = child
        self._loop = child._loop
        self.stream = stream
        self.fd = fd
        self.sink = sink
        self.reading = False
        os.set_blocking(fd, False)

    def resume(self) -> None:
        if not self.reading and self.fd >= 0:
            self._loop.add_reader(self.fd, self._ready)
            self.reading = True

    def pause(self) -> None:
        if self.reading:
            self._loop.remove_reader(self.fd)
            self.reading = False

    # What a sink pauses while its log writer is behind (`StreamSink.attach_pipe`).
    pause_reading = pause
    resume_reading = resume

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("%s: reading its pipe failed: %s", self._child.name, exc)
            data = b""
        if data:
            self.sink.feed(data)
        else:
            self.close()

    def close(self) -> None:
        """At EOF or when the child is closed: the sink gets its EOF (a last partial line)."""
        if self.fd < 0:
            return
        self.pause()
        os.close(self.fd)
        self.fd = -1
        self.sink.eof()
        self._child._pipe_closed(self.stream)


READ_SIZE = 256 * 1024  # asyncio's read-pipe transport reads this much per wake-up


class _Futures:
    """What `Child` reads from its SubprocessProtocol: the exit and the end of both pipes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.exited: asyncio.Future[int] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()


class AdoptedChild(Child):
    """A carried-over child: see the module docstring.

    Made synchronously (so that a publisher has its child before its runner first runs), then
    `watch()` starts watching its exit and `connect()` reads its pipes (fd by stream: 1 stdout,
    2 stderr) into `sinks`. `returncode` given: it had exited and been reaped already; its exit
    is reported at once.
    """

    def __init__(
        self,
        name: str,
        pid: int,
        pgid: int,
        started: float,
        *,
        pipes: dict[int, int],
        returncode: int | None = None,
    ) -> None:
        # Not Child.__init__: there is no transport. The attributes Child's methods read are
        # set here; `_proto` is a stand-in with the same two futures.
        loop = asyncio.get_running_loop()
        self.name = name
        self.pid = pid
        self.pgid = pgid
        self.started = started
        self.sinks: dict[int, Sink] = {}
        self._loop = loop
        self._proto = _Futures(loop)  # type: ignore[assignment]
        self._pipes: dict[int, _Pipe] = {}
        self._fds = dict(pipes)  # stream -> fd, while its pipe is open
        self._open = set(pipes)
        self._watching = False
        self._pidfd: int | None = None
        if not self._open:
            self._proto.pipes_closed.set_result(None)
        if returncode is not None:
            self._proto.exited.set_result(returncode)

    def watch(self) -> None:
        """Watch its exit through a pidfd (readable once it exited; a zombie's at once)."""
        if self._proto.exited.done():
            return
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            logger.warning("%s pid %d: gone, its exit status lost", self.name, self.pid)
            self._proto.exited.set_result(255)
            return
        self._loop.add_reader(self._pidfd, self._reap)
        self._watching = True

    def connect(self) -> None:
        """Read its pipes into `sinks` from now on."""
        for stream, fd in sorted(self._fds.items()):
            sink = self.sinks[stream]
            pipe = self._pipes[stream] = _Pipe(self, stream, fd, sink)
            attach = getattr(sink, "attach_pipe", None)
            if attach is not None:  # held back while its log file's writer is behind
                attach(pipe)
            pipe.resume()

    def pause_reading(self) -> list[_Pipe]:
        """Stop reading its pipes (an upgrade quiesces); returns those to resume."""
        paused = [p for p in self._pipes.values() if p.reading]
        for pipe in paused:
            pipe.pause()
        return paused

    def _reap(self) -> None:
        try:
            got, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            got, status = self.pid, 255 << 8
            logger.warning("%s pid %d: its exit status is lost", self.name, self.pid)
        if not got:
            return
        self._stop_watching()
        if not self._proto.exited.done():
            self._proto.exited.set_result(os.waitstatus_to_exitcode(status))

    def _stop_watching(self) -> None:
        if self._watching and self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
        self._watching = False

    def _pipe_closed(self, stream: int) -> None:
        self._open.discard(stream)
        self._fds.pop(stream, None)
        if not self._open and not self._proto.pipes_closed.done():
            self._proto.pipes_closed.set_result(None)

    def pipe_fds(self) -> dict[int, int]:
        """The fds of its pipes still open, by stream (1 stdout, 2 stderr)."""
        return {s: fd for s, fd in self._fds.items() if s in self._open}

    def close(self) -> None:
        self._stop_watching()
        for pipe in list(self._pipes.values()):
            pipe.close()
        for stream, fd in list(self._fds.items()):
            if stream not in self._pipes:  # never connected
                with contextlib.suppress(OSError):
                    os.close(fd)
                self._pipe_closed(stream)
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __repr__(self) -> str:
        return f"<AdoptedChild {self.name!r} pid={self.pid} returncode={self.returncode}>"

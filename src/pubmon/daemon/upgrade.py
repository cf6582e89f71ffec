"""`pubmon upgrade` and SIGUSR2: re-execute the daemon in place, carrying every publisher over.

The old image (`Upgrader.upgrade`):
1. asks the new code whether it can take over: `<interpreter> <console script> upgrade-check
   --state-version N --config FILE`, found on disk now (a `pip install -U` in the venv is what
   runs). It loads the config and says whether it reads state format N. A failure (broken
   install, unknown format, bad config) refuses the upgrade with its reason; nothing changes;
2. waits until no spawn is in flight (a forked child not yet recorded would be orphaned);
3. then, in one synchronous step (no other callback runs: asyncio hands every chunk it reads
   to the sinks at once, so nothing is held in user space between the pipes and the state):
   RELOADING=1, the state into a memfd (`_collect`: every publisher's runner state, its
   child's pid, pipe fds and the splitter's partial lines, its ring with the sequence numbers,
   the daemon's counters, the listening sockets, the lock), O_CLOEXEC cleared on those fds,
   and `execve` of the same interpreter and argv, with the memfd named in PUBMON_UPGRADE_FD.

The new image (`Handover`), seeing PUBMON_UPGRADE_FD: keeps the lock, reuses the listening
sockets (clients that connected meanwhile waited in the backlog: answered, never refused),
builds the publishers from the config as usual and, before their runners first run, gives
each its saved state and its child as an `AdoptedChild` (no spawn). A child that exited while
the daemon was between the images is a zombie, reaped and handled by its runner (exit code
kept, restart policy applied). Then READY=1, as after a start.

Timers are deadlines on CLOCK_MONOTONIC (the publishers' clock and the loop's), which an exec
does not reset: a BACKOFF publisher restarts when it would have.

A state that cannot be read, or a publisher whose entry cannot be used, never orphans a
process: what can be adopted is, every other child of the daemon is stopped by pid (SIGTERM
to its group, SIGKILL after STOP_BOUND) and reaped, the fds named in PUBMON_UPGRADE_FDS that
were not taken are closed, and the log says what happened. The config then starts the
publishers afresh.

The new image reads the config from its file, like a start would; so an upgrade is refused
while that file differs from the config running (reload first, or put it back): an edit is
applied by a reload, never silently by an upgrade.
"""

from __future__ import annotations

__all__ = [
    "STATE_VERSION",
    "DaemonState",
    "Handover",
    "UpgradeAccepted",
    "Upgrader",
    "check_main",
]

import asyncio
import contextlib
import itertools
import json
import logging
import mmap
import os
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pubmon._version import __version__
from pubmon.core.adopted import AdoptedChild
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.reaper import OrphanReaper, children_of
from pubmon.core.ring import Ring, _Entry
from pubmon.core.stats import EXIT_REASONS
from pubmon.daemon.lock import DaemonLock
from pubmon.daemon.notify import Notifier
from pubmon.daemon.signals import HANDLED
from pubmon.errors import InvalidState, UpgradeRefused
from pubmon.host.inherited import offer, unclaimed

if TYPE_CHECKING:
    from pubmon.config.model import Config
    from pubmon.core.output import OutputLog, StreamSink
    from pubmon.core.process import Child
    from pubmon.core.publisher import Publisher
    from pubmon.core.supervisor import Supervisor
    from pubmon.http.server import HttpServer
    from pubmon.service.handler import Listeners

logger = logging.getLogger(__name__)

# The state formats: 1, the first; 2 adds "http_exits" (the dashboard's recent exits) and each
# publisher's "state_since" (a new image said "RUNNING since <the upgrade>"). This
# code writes the newest format the code on disk reads (its check refuses the others), so
# that going back to an older pubmon stays possible, and reads every format listed here.
STATE_VERSION = 2
SUPPORTED_STATE_VERSIONS = frozenset({1, 2})
ENV_FD = "PUBMON_UPGRADE_FD"
ENV_FDS = "PUBMON_UPGRADE_FDS"
ENV_EXEC_AT = "PUBMON_UPGRADE_EXEC_AT"  # CLOCK_MONOTONIC of the execve: the pause's breakdown
_MAGIC = b"PUBMONUP"
CHECK_TIMEOUT = 30.0
SPAWN_WAIT = 30.0  # how long the exec may wait for spawns and a reload in flight to finish
SYNC_BOUND = 2.0  # how long the exec waits for the log writers to catch up
STOP_BOUND = 2.0  # a child the new image cannot adopt: SIGTERM, then SIGKILL after this
CALLS_BOUND = 3.0  # how long the exec waits for the answers to the calls in flight
FORK_PATIENCE = 2.0  # how long the exec looks for a free turn to fork before it queues
UPGRADING = "pubmon is upgrading"  # how every answer cut short by an upgrade begins
UPGRADING_RETRY = f"{UPGRADING}: retry"  # a call refused: nothing of it was done
S = PublisherState


class DaemonState(Protocol):
    """What an upgrade reads of the daemon (pubmon.daemon.daemon.Daemon, which imports this
    module), and the counters the new image restores."""

    started_at: float
    reloads: int
    reload_failures: int
    last_reload_error: str

    @property
    def config(self) -> Config: ...
    @property
    def supervisor(self) -> Supervisor | None: ...
    @property
    def ready(self) -> asyncio.Event: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def reload_busy(self) -> bool: ...
    @property
    def reload_queued(self) -> bool: ...  # a SIGHUP's or reloadConfig's, not begun yet
    @property
    def reaper(self) -> OrphanReaper: ...
    @property
    def notifier(self) -> Notifier: ...
    @property
    def lock(self) -> DaemonLock | None: ...
    @property
    def listeners(self) -> Listeners | None: ...
    @property
    def http(self) -> HttpServer | None: ...
    def status_details(self) -> str: ...


class UpgradeAccepted(NamedTuple):
    """The new code accepted the state: the daemon re-executes right after this is answered."""

    old_version: str
    new_version: str
    publishers: int  # processes carried over
    upgrades_before: int  # daemon.upgrades now; the new image counts one more


# --- the check, run as `pubmon upgrade-check` by the code on disk --------------------------------


def check_main(config_path: str, state_version: int) -> int:
    """`pubmon upgrade-check`: print {"version", "publishers"} as JSON and exit 0 when this code
    can take over a daemon whose state has `state_version`; else the reason on stderr, exit 2."""
    from pubmon.config.load import load_config
    from pubmon.errors import ConfigError

    forced = os.environ.get("PUBMON_TEST_UPGRADE_CHECK_FAIL")  # test hook: a broken install
    if forced:
        print(forced, file=sys.stderr)
        return 2
    reads = SUPPORTED_STATE_VERSIONS
    if older := os.environ.get("PUBMON_TEST_UPGRADE_READS"):  # test hook: an older pubmon
        reads = frozenset(int(x) for x in older.split(","))
    if state_version not in reads:
        known = ", ".join(map(str, sorted(reads)))
        print(
            f"pubmon {__version__} cannot read state format {state_version} (it reads {known})",
            file=sys.stderr,
        )
        return 2
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps({"version": __version__, "publishers": len(config.publishers)}))
    return 0


def _command_prefix() -> list[str]:
    """The interpreter and what names pubmon on its command line: [python, /venv/bin/pubmon]
    or [python, -m, pubmon]. From sys.orig_argv, so that the files on disk now are run."""
    orig = sys.orig_argv
    prefix = orig[: len(orig) - (len(sys.argv) - 1)]
    return [sys.executable, *prefix[1:]]


def _exec_argv() -> list[str]:
    return [sys.executable, *sys.orig_argv[1:]]


# --- the old image --------------------------------------------------------------------------------


class Upgrader:
    """The daemon's upgrade requests (RPC `upgrade`, SIGUSR2) and its upgrade counters."""

    def __init__(self, daemon: DaemonState) -> None:
        self._daemon = daemon
        self.upgrades = 0
        self.failures = 0
        self.last_pause_ms = 0
        self.last_adopted = 0
        self.last_lost = 0
        self.last_error = ""
        self._busy = False
        self.state_version = STATE_VERSION  # what the code on disk reads (see `_check`)
        # Calls in flight (see `admit` and `cuttable`): from the first `_go` on, new calls are
        # refused ("pubmon is upgrading: retry") and those in flight are answered before the
        # exec, which would otherwise close their connections with nothing said.
        self.under_way = False
        self._calls: set[asyncio.Task[Any]] = set()  # async calls whose reply is not out yet
        self._cuttable: dict[asyncio.Timeout, str | None] = {}
        self._cut_at: float | None = None
        self._blocked_at = 0.0  # last time something other than calls held the exec back
        self._held: Counter[str] = Counter()  # what held the exec back: polls (5 ms) each
        self._fork_hold: asyncio.Task[None] | None = None
        self._forks_held = False

    def counters(self) -> dict[str, int]:
        return {
            "daemon.upgrades": self.upgrades,
            "daemon.upgrade_failures": self.failures,
            "daemon.last_upgrade_pause_ms": self.last_pause_ms,
            "daemon.last_upgrade_adopted": self.last_adopted,
            "daemon.last_upgrade_lost": self.last_lost,
        }

    async def upgrade(self, *, delay: float = 0.05) -> UpgradeAccepted:
        """Check the new code, then re-execute `delay` s later (time for the answer to go out).
        UpgradeRefused (the check failed: nothing changes) or InvalidState."""
        d = self._daemon
        if d.stopping:
            raise InvalidState("pubmon is stopping: upgrade refused")
        if not d.ready.is_set() or d.supervisor is None:
            raise InvalidState("pubmon is still starting: upgrade refused, retry once it is ready")
        if self._busy:
            raise InvalidState("an upgrade is already under way")
        self._busy = True
        self._track()  # its answer goes out before the exec
        try:
            self._same_config()
            new_version = await self._check()
        except UpgradeRefused as exc:
            self._busy = False
            self.failures += 1
            self.last_error = str(exc)
            logger.error("upgrade refused: %s; still running pubmon %s", exc, __version__)
            raise
        except BaseException:
            self._busy = False
            raise
        sup = d.supervisor
        carried = sum(p.child is not None for p in sup.publishers.values())
        logger.info(
            "upgrade: pubmon %s on disk accepts the state (format %d); re-executing "
            "(%d publishers)",
            new_version,
            self.state_version,
            carried,
        )
        asyncio.get_running_loop().call_later(delay, self._go, time.monotonic() + SPAWN_WAIT)
        return UpgradeAccepted(__version__, new_version, carried, self.upgrades)

    # --- calls in flight, for the handler ---------------------------------------------------

    def admit(self) -> None:
        """At the start of every async RPC call: InvalidState("pubmon is upgrading: retry")
        once the upgrade has begun (nothing of the call was done: a retry is safe, and is
        answered by the new image); else the call's task is tracked until its reply went out."""
        if self.under_way:
            raise InvalidState(UPGRADING_RETRY)
        self._track()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None and task not in self._calls:
            self._calls.add(task)
            # Runs after the server's own done-callback (added when it made the task), which
            # writes the reply: once the task leaves the set, its answer is in the socket.
            task.add_done_callback(self._calls.discard)

    @contextlib.asynccontextmanager
    async def cuttable(self, accepted: str | None) -> AsyncIterator[None]:
        """A wait that an upgrade cuts short: the block is cancelled when the calls in flight
        are answered. `accepted` None: the block just ends (a long poll answers what it has);
        else InvalidState("pubmon is upgrading: <accepted>"), for a request already handed to
        its publisher (the exec waits until every publisher took its requests): it goes on,
        and the answer says so and that its outcome was not awaited."""
        try:
            async with asyncio.timeout(None) as cm:
                self._cuttable[cm] = accepted
                try:
                    if self._cut_at is not None:
                        cm.reschedule(-1)
                    yield
                finally:
                    del self._cuttable[cm]
        except TimeoutError:
            if not cm.expired():
                raise
            if accepted is not None:
                raise InvalidState(f"{UPGRADING}: {accepted}") from None

    def _cut(self) -> None:
        """The upgrade begins: refuse new calls, cut every cuttable wait short."""
        if self._cut_at is not None:
            return
        self.under_way = True
        self._cut_at = time.monotonic()
        for cm in self._cuttable:
            cm.reschedule(-1)

    def _uncut(self) -> None:
        self.under_way = False
        self._cut_at = None
        self._held.clear()
        self._release_forks()

    def _abandon(self, why: str) -> None:
        self._busy = False
        self._uncut()
        self.failures += 1
        self.last_error = why
        logger.error("upgrade abandoned: %s", why)

    def _hold_forks(self, now: float) -> None:
        """Take the loop's turn to fork (`fork_turn`) and keep it: no spawn begins from then
        on (those due wait for it, in their state, and are carried over as due). Taken when
        it is free; queued for only after FORK_PATIENCE (behind a queue of spawns on a loaded
        host, that is seconds in which nothing else could spawn)."""
        from pubmon.core import process

        if self._fork_hold is not None:
            return
        turn = process._turns.get(asyncio.get_running_loop())
        if turn is not None and turn.locked() and now < (self._cut_at or now) + FORK_PATIENCE:
            return
        self._fork_hold = asyncio.get_running_loop().create_task(self._keep_forks())

    def _release_forks(self) -> None:
        if self._fork_hold is not None:
            self._fork_hold.cancel()
            self._fork_hold = None
        self._forks_held = False

    async def _keep_forks(self) -> None:
        from pubmon.core.process import fork_turn

        async with fork_turn():
            self._forks_held = True
            await asyncio.get_running_loop().create_future()  # until cancelled

    def _calls_pending(self, now: float) -> bool:
        """Calls whose answer is not out yet, within CALLS_BOUND of the last time something
        else held the exec back (after that their connections drop: the clients retry)."""
        return bool(self._calls) and now < max(self._cut_at or now, self._blocked_at) + CALLS_BOUND

    def _same_config(self) -> None:
        """The new image reads the config file: refuse when it is not what runs now, or the
        upgrade would apply an edit that no reload applied (and a later reload would find
        nothing to do)."""
        from pubmon.config.diff import diff_configs
        from pubmon.config.load import load_config
        from pubmon.errors import ConfigError

        running = self._daemon.config
        try:
            on_disk = load_config(running.path)
        except ConfigError as exc:
            raise UpgradeRefused(f"the config file cannot be used: {exc}") from None
        if on_disk == running:
            return
        what = [f"[{s}]" for s in ("daemon", "control", "monitor", "http")]
        what = [w for w in what if getattr(on_disk, w[1:-1]) != getattr(running, w[1:-1])]
        what += [
            f"{c.name} ({c.change})"
            for c in diff_configs(running, on_disk).changes
            if c.change != "unchanged"
        ]
        raise UpgradeRefused(
            f"{running.path} changed since it was last loaded ({', '.join(what) or 'order'}): "
            "apply it first (pubmon reload) or put it back, then upgrade"
        )

    async def _check(self) -> str:
        """The code on disk's version, once it accepted the newest state format both read
        (it may be older than this code: an operator going back)."""
        for version in sorted(SUPPORTED_STATE_VERSIONS, reverse=True):
            try:
                got = await self._check_one(version)
            except UpgradeRefused as exc:
                if f"cannot read state format {version} " in str(exc) and version > 1:
                    continue
                raise
            self.state_version = version
            return got
        raise AssertionError("unreachable: format 1 is always tried last")

    async def _check_one(self, version: int) -> str:
        d = self._daemon
        assert d.supervisor is not None
        argv = [
            *_command_prefix(),
            "upgrade-check",
            "--state-version",
            str(version),
            "--config",
            d.config.path,
        ]
        reaper = d.reaper
        reaper.spawning += 1  # asyncio reaps the check: no sweep may take its status
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            except OSError as exc:
                raise UpgradeRefused(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    out, err = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise UpgradeRefused(
                    f"`{' '.join(argv)}` did not answer within {CHECK_TIMEOUT:g} s"
                ) from None
        finally:
            reaper.spawn_done()
        why = err.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise UpgradeRefused(
                f"the new code refused: {why or f'exit status {proc.returncode}'} "
                f"(`{' '.join(argv)}`)"
            )
        try:
            return str(json.loads(out)["version"])
        except (ValueError, KeyError, TypeError):
            raise UpgradeRefused(
                f"`{' '.join(argv)}` answered {out[:200]!r}, not the expected JSON"
            ) from None

    def _go(self, deadline: float) -> None:
        d = self._daemon
        sup = d.supervisor
        if sup is None or d.stopping:
            self._busy = False
            self._uncut()
            logger.warning("upgrade abandoned: pubmon is stopping")
            return
        self._cut()
        now = time.monotonic()
        held = _held_back(d)
        # With publishers restarting all the time a moment with no spawn in flight is not
        # enough: one may begin between here and `_exec`. So the loop's turn to fork is held
        # from here on; but not while a reload or a request waits (either may wait for a
        # spawn: it would never come).
        if held in ("", "a spawn"):
            self._hold_forks(now)
        else:
            self._release_forks()
        if held:
            self._blocked_at = now
        elif self._calls_pending(now):
            held = f"the answers to {len(self._calls)} call(s) in flight"
        elif not self._forks_held:
            held = "the turn to fork"
        if held:
            self._held[held.split(" to ")[0]] += 1
            if now < deadline:
                asyncio.get_running_loop().call_later(0.005, self._go, deadline)
                return
            self._abandon(f"{held} still under way after {SPAWN_WAIT:g} s; retry")
            return
        # Quiesce: no pipe is read from now on. A chunk asyncio read from a subprocess pipe
        # reaches its protocol through call_soon: those already queued run before `_exec`.
        t0 = time.monotonic()
        paused = _pause_pipes(sup)
        asyncio.get_running_loop().call_soon(self._exec, deadline, t0, paused)

    def _exec(self, deadline: float, t0: float, paused: list[Callable[[], None]]) -> None:
        d = self._daemon
        assert d.supervisor is not None
        if _held_back(d) or d.stopping:  # began meanwhile (a reload queued by SIGHUP)
            _resume_pipes(paused)
            self._go(deadline)
            return
        waited = t0 - (self._cut_at or t0)
        if waited >= 0.5:  # say what kept the exec waiting (calls were refused meanwhile)
            logger.info(
                "upgrade: the exec waited %.1f s for %s",
                waited,
                ", ".join(f"{what} ({n * 5} ms)" for what, n in self._held.most_common(3)),
            )
        try:
            _exec(d, self, t0)
        except Exception as exc:  # the exec failed: nothing was handed over
            _resume_pipes(paused)
            self._busy = False
            self._uncut()
            self.failures += 1
            self.last_error = f"exec failed: {exc}"
            logger.error("upgrade failed, still running pubmon %s: %s", __version__, exc)
            d.notifier.ready(d.status_details())


def _held_back(d: DaemonState) -> str:
    """What the exec must wait for ("": nothing): a forked child not yet recorded would be
    orphaned; a reload under way or queued (SIGHUP), or a request a publisher has not taken
    yet, lost."""
    from pubmon.core.publisher import _Request

    sup = d.supervisor
    assert sup is not None
    if d.reaper.spawning:
        return "a spawn"
    if d.reload_busy or d.reload_queued:
        return "a reload"
    for pub in sup.publishers.values():
        queued = getattr(pub._runner.inbox, "_queue", ())  # asyncio.Queue's deque
        if any(isinstance(m, _Request) for m in queued):
            return f"a request to {pub.name}"
    return ""


def _pause_pipes(sup: Supervisor) -> list[Callable[[], None]]:
    """Stop reading every child's pipes; returns how to resume each."""
    out: list[Callable[[], None]] = []
    for pub in sup.publishers.values():
        child = pub.child
        if child is None:
            continue
        if isinstance(child, AdoptedChild):
            out += [p.resume for p in child.pause_reading()]
            continue
        for s in (1, 2):
            pipe = child._transport.get_pipe_transport(s)
            if isinstance(pipe, asyncio.ReadTransport) and not pipe.is_closing():
                pipe.pause_reading()
                out.append(pipe.resume_reading)
    return out


def _resume_pipes(paused: list[Callable[[], None]]) -> None:
    for resume in paused:
        resume()


def _exec(d: DaemonState, up: Upgrader, t0: float) -> None:
    """Serialize, clear O_CLOEXEC on what is handed over, execve. Returns only by raising."""
    d.notifier.reloading()
    assert d.supervisor is not None
    for pub in d.supervisor.publishers.values():
        # Lines queued for the log writer threads must reach the files before the exec (the
        # new image only reopens them); a writer stuck on its storage refuses the upgrade.
        if not pub.output.sync(SYNC_BOUND):
            raise UpgradeRefused(
                f"{pub.name}: its log file {pub.output.path} does not take writes within "
                f"{SYNC_BOUND:g} s; retry once its storage answers"
            )
    _drain_stdout()
    header, data, fds = _collect(d, up, t0)
    corrupt = os.environ.get("PUBMON_TEST_UPGRADE_CORRUPT", "")  # test hook: a bad state
    if corrupt == "blob":
        raw = _MAGIC + b"{not json"
    else:
        if corrupt.startswith("publisher:"):
            for entry in header["publishers"]:
                if entry["name"] == corrupt.split(":", 1)[1]:
                    entry["state"] = "BOGUS"
        head = json.dumps(header).encode()
        raw = _MAGIC + len(head).to_bytes(8, "big") + head
    memfd = os.memfd_create("pubmon-upgrade", 0)  # no MFD_CLOEXEC: the new image reads it
    try:
        _write_all(memfd, [raw, *data])
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[ENV_FD] = str(memfd)
        env[ENV_FDS] = ",".join(map(str, fds))
        for handler in logging.getLogger().handlers:
            handler.flush()
        env[ENV_EXEC_AT] = repr(time.monotonic())
        # Blocked across the exec (the mask survives it): a SIGTERM, SIGHUP or SIGUSR2 sent
        # before the new image has its handlers stays pending instead of killing it.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        kill = os.environ.get("PUBMON_TEST_UPGRADE_KILL")  # test hook: exits between images
        if kill and d.supervisor is not None and kill in d.supervisor.publishers:
            pid = d.supervisor.publishers[kill].pid
            if pid is not None:
                os.killpg(pid, signal.SIGKILL)
        os.execve(sys.executable, _exec_argv(), env)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        os.close(memfd)
        raise


def _drain_stdout() -> None:
    """`[daemon] log_stdout`: let its writer thread write what is buffered (the exec ends the
    thread). Bounded: a stdout nobody reads drops lines anyway, counted, as it does always."""
    from pubmon.core import stdout as _stdout

    sink = _stdout.sink
    if sink is None:
        return
    deadline = time.monotonic() + SYNC_BOUND
    while sink._size and time.monotonic() < deadline:
        time.sleep(0.001)
    if sink._size:
        logger.warning("upgrade: stdout is not being read; its buffered publisher lines are lost")


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Every part, in order, by writev (no joined copy of what may be many MiB of rings)."""
    pending = deque(memoryview(p) for p in parts if p)
    while pending:
        batch = list(itertools.islice(pending, 512))
        done = os.writev(fd, batch)
        while done:
            head = pending[0]
            if done >= len(head):
                done -= len(head)
                pending.popleft()
            else:
                pending[0] = head[done:]
                done = 0


class _Blob:
    """The raw bytes behind the JSON header: ring blocks and partial lines, by offset."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        at = self.size
        self.parts.append(data)
        self.size += len(data)
        return [at, len(data)]


def _collect(
    d: DaemonState, up: Upgrader, t0: float
) -> tuple[dict[str, Any], list[bytes], list[int]]:
    sup = d.supervisor
    assert sup is not None and d.lock is not None and d.lock.fd is not None
    blob = _Blob()
    fds = [d.lock.fd]
    sockets = _listening_fds(d)
    fds += sockets.values()
    pubs = []
    loop = asyncio.get_running_loop()
    for pub in sup.publishers.values():
        entry = _publisher_state(pub, blob, loop)
        pubs.append(entry)
        child = entry["child"]
        if child is not None:
            fds += child["pipes"].values()
    header = {
        "version": up.state_version,
        "from": __version__,
        "pid": os.getpid(),
        "t0": t0,
        "daemon": {
            "started_at": d.started_at,
            "reloads": d.reloads,
            "reload_failures": d.reload_failures,
            "last_reload_error": d.last_reload_error,
            "upgrades": up.upgrades,
            "upgrade_failures": up.failures,
        },
        "lock": {"fd": d.lock.fd, "path": d.lock.path},
        "sockets": sockets,
        "publishers": pubs,
    }
    if up.state_version >= 2 and d.http is not None:
        log = d.http.exits
        header["http_exits"] = {
            "seen": log.seen,
            "exits": {name: list(kept) for name, kept in log.exits.items()},
        }
    return header, blob.parts, fds


def _listening_fds(d: DaemonState) -> dict[str, int]:
    """key -> fd of every listening socket: "unix:<path>", "tcp:<host>:<port as configured>",
    "http:<host>:<port as configured>"."""
    out: dict[str, int] = {}
    ls = d.listeners
    if ls is not None:
        for name, what in ls.server._where.items():
            if name.startswith("unix:") and isinstance(what, asyncio.Server):
                out[name] = what.sockets[0].fileno()
            elif (
                name == ls._tcp
                and ls.config.monitor.address() is not None
                and isinstance(what, list)
            ):
                host, port = ls.config.monitor.address()  # type: ignore[misc]
                for i, sock in enumerate(what):
                    out[f"tcp:{host}:{port}" + (f"#{i}" if i else "")] = sock.fileno()
    http = d.http
    if http is not None and http._site is not None:
        site_server = http._site._server
        address = http.config.address()
        if isinstance(site_server, asyncio.Server) and site_server.sockets and address:
            out[f"http:{address[0]}:{address[1]}"] = site_server.sockets[0].fileno()
    return out


def _sinks_of(child: Child) -> dict[int, StreamSink]:
    if isinstance(child, AdoptedChild):
        return {s: p.sink for s, p in child._pipes.items()}  # type: ignore[misc]
    return dict(child._proto._sinks)  # type: ignore[arg-type]


def _returncode(child: Child) -> int | None:
    """Its exit status, also when asyncio's watcher reaped it and the news is still queued
    for the next loop pass (the transport knows at once): the new image could not learn it
    again (the pid is gone), and would report the status lost."""
    if child.returncode is not None or isinstance(child, AdoptedChild):
        return child.returncode
    got: int | None = child._transport.get_returncode()
    return got


def _pipe_fds(child: Child) -> dict[int, int]:
    if isinstance(child, AdoptedChild):
        return child.pipe_fds()
    out = {}
    for stream in (1, 2):
        pipe = child._transport.get_pipe_transport(stream)
        if pipe is None or pipe.is_closing():
            continue
        try:
            out[stream] = pipe.get_extra_info("pipe").fileno()
        except (AttributeError, ValueError):
            continue
    return out


def _publisher_state(
    pub: Publisher, blob: _Blob, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    timer = None
    pending = pub._runner.pending_timer()
    if pending is not None:
        timer = {"kind": pending[0], "when": pending[1]}
    child = None
    if pub.child is not None:
        c = pub.child
        sinks = _sinks_of(c)
        child = {
            "pid": c.pid,
            "pgid": c.pgid,
            "started": c.started,
            "returncode": _returncode(c),
            "pipes": {str(s): fd for s, fd in _pipe_fds(c).items()},
            "tails": {str(s): blob.add(bytes(k._tail)) for s, k in sinks.items()},
        }
    out = pub.output
    ring = out._ring
    entries = []
    for e in ring._entries:
        block = e.prefix + e.data[: e.end] if e.prefix else bytes(e.data[: e.end])
        entries.append([e.first_seq, e.nlines, e.time, e.stream, *blob.add(block), e.cut])
    return {
        "name": pub.name,
        "state": str(pub.state),
        "health": str(pub.health),
        "details": pub.details,
        "restarts": pub.restarts,
        "exits": pub.exits,
        "probe_failures": pub.probe_failures,
        "probe_kills": pub.probe_kills,
        "memory_restarts": pub.memory_restarts,
        "cpu_base": pub._cpu_base,
        "oom_base": pub._oom_base,
        "stop_reason": pub._stop_reason,
        "above_since": pub._above_since,
        "stuck_stops": pub.stuck_stops,
        "last_exit": pub.last_exit,
        "last_exit_reason": pub.last_exit_reason,
        "exit_reasons": dict(pub.exit_reasons),
        "started_wall": pub.started_wall,
        "state_since": pub.state_since,
        "backoff_until": pub.backoff_until,
        "start_times": list(pub.start_times),
        "stuck": pub.stuck,
        "wanted": pub._wanted,
        "due": pub._due,
        "then_start": pub._then_start,
        "stop_ends": pub._stop_ends,
        "fail_why": pub._fail_why,
        "closed": pub._closed,
        "runs": pub._runs,
        "failures": pub._failures,
        "crash_times": list(pub._crashes._times),
        "running_since": pub._running_since,
        "run_started": pub._run_started,
        "timer": timer,
        "child": child,
        "output": {
            "lines": out.lines,
            "bytes": out.bytes,
            "dropped": out.dropped,
            "dropped_bytes": out.dropped_bytes,
            "last_seq": ring.last_seq,
            "cleared": ring.cleared,  # `pubmon clear`: not "missed" for a follower
            "ring": entries,
        },
    }


# --- the new image --------------------------------------------------------------------------------


class Handover:
    """What the old image handed over; see the module docstring. `from_environ()` is None when
    this image was not started by an upgrade."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = set(fds)  # every fd the old image handed over; those not taken get closed
        self.header: dict[str, Any] | None = None
        self.data: bytes = b""
        self.problems: list[str] = []
        self.adopted = 0
        self.lost = 0
        self._lock: DaemonLock | None = None
        self._strays: set[int] = set()  # children of ours to stop: not adopted, after a problem
        self._marks: list[tuple[str, float]] = [("exec and imports", time.monotonic())]
        self._served = False  # `serving()` was called: the pause ended before READY=1

    @classmethod
    def from_environ(cls) -> Handover | None:
        raw_fd = os.environ.pop(ENV_FD, None)
        raw_fds = os.environ.pop(ENV_FDS, "")
        exec_at = os.environ.pop(ENV_EXEC_AT, "")
        if raw_fd is None:
            return None
        hold = os.environ.get("PUBMON_TEST_UPGRADE_HOLD")  # test hook: a long pause
        while hold and os.path.exists(hold):
            time.sleep(0.01)
        fds = [int(x) for x in raw_fds.split(",") if x.isdigit()]
        self = cls(fds)
        with contextlib.suppress(ValueError):
            self._marks.insert(0, ("handover", float(exec_at)))
        try:
            self._read(int(raw_fd))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.header = None
            self.problems.append(f"the handed-over state cannot be read: {exc}")
            logger.error("upgrade: %s", self.problems[-1])
            # Which fd is the lock is unknown: close them all now, or the lock taken anew
            # would be refused by the one this process still holds.
            for fd in self.fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fds.clear()
        if self.header is not None:
            self._take_sockets()
        return self

    def _read(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                raw = bytes(m)
        finally:
            os.close(fd)
        if not raw.startswith(_MAGIC):
            raise ValueError("no pubmon upgrade state in it")
        head_len = int.from_bytes(raw[8:16], "big")
        header = json.loads(raw[16 : 16 + head_len])
        if not isinstance(header, dict) or header.get("version") not in SUPPORTED_STATE_VERSIONS:
            raise ValueError(f"state format {header.get('version')!r} is not one this code reads")
        self.data = raw[16 + head_len :]
        self.header = header
        lock = header["lock"]
        self._lock = DaemonLock(self._take(int(lock["fd"])), str(lock["path"]))

    def _take(self, fd: int) -> int:
        if fd not in self.fds:
            raise ValueError(f"fd {fd} was not handed over")
        self.fds.discard(fd)
        os.set_inheritable(fd, False)
        return fd

    def _take_sockets(self) -> None:
        assert self.header is not None
        for key, fd in self.header["sockets"].items():
            try:
                sock = socket.socket(fileno=self._take(int(fd)))
            except (OSError, ValueError) as exc:
                self.problems.append(f"listening socket {key}: {exc}")
                continue
            sock.setblocking(False)
            offer(key, sock)

    def lock(self) -> DaemonLock | None:
        """The daemon lock, still held (None: the state was unreadable; take it anew)."""
        return self._lock

    @property
    def from_version(self) -> str:
        return str(self.header.get("from", "?")) if self.header else "?"

    def restore_daemon(self, d: DaemonState, up: Upgrader) -> None:
        if self.header is None:
            return
        saved = self.header["daemon"]
        d.started_at = float(saved["started_at"])
        d.reloads = int(saved["reloads"])
        d.reload_failures = int(saved["reload_failures"])
        d.last_reload_error = str(saved["last_reload_error"])
        up.upgrades = int(saved["upgrades"])
        up.failures = int(saved["upgrade_failures"])

    def restore(self, sup: Supervisor) -> list[tuple[Publisher, AdoptedChild]]:
        """Give each publisher its saved state and child. Synchronous, and called before the
        runners first run (right after the supervisor made them): a runner that saw a fresh
        publisher would spawn it. Returns the children whose pipes `connect()` must read."""
        out: list[tuple[Publisher, AdoptedChild]] = []
        if self.header is None:
            self._strays = children_of(os.getpid())
            return out
        loop = asyncio.get_running_loop()
        for entry in self.header["publishers"]:
            name = str(entry.get("name"))
            pub = sup.publishers.get(name)
            if pub is None:
                self.problems.append(f"{name}: not in the config any more; stopped")
                continue
            try:
                child = _restore_publisher(pub, entry, self, loop)
            except (KeyError, ValueError, TypeError, OSError) as exc:
                self.problems.append(f"{name}: its saved state cannot be used ({exc!r}); stopped")
                _reset_publisher(pub)
                continue
            if child is not None:
                if sup.reaper is not None:  # the daemon's (pubmon.daemon.reaping)
                    sup.reaper.track(child)
                self.adopted += 1
                out.append((pub, child))
        self._marks.append(("listeners and publishers", time.monotonic()))
        if self.problems:  # now, before any runner ran: a fresh spawn is not a stray
            self._strays = children_of(os.getpid()) - {c.pid for _, c in out}
        return out

    async def connect(self, adopted: list[tuple[Publisher, AdoptedChild]]) -> None:
        """Read the adopted children's pipes; stop every child of ours not adopted when
        anything went wrong; close what was handed over and not taken; log the outcome."""
        for _, child in adopted:
            child.connect()
        if self._strays:
            self.lost += await _stop_strays(self._strays)
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        for problem in self.problems:
            logger.error("upgrade: %s", problem)
        self._marks.append(("adoption", time.monotonic()))

    def serving(self) -> None:
        """The listeners answer again (and `connect` made the pipes read): the pause ends."""
        self._marks.append(("listeners", time.monotonic()))
        self._served = True

    def finish(self, up: Upgrader) -> None:
        """READY=1 went out: count the upgrade and say how it went."""
        for key, sock in unclaimed().items():  # the config no longer listens there
            logger.info("upgrade: closing the handed-over listener %s (not in the config)", key)
            sock.close()
        self._restore_http_exits(up)
        up.upgrades += 1
        up.last_adopted = self.adopted
        up.last_lost = self.lost
        t0 = float(self.header["t0"]) if self.header else None
        now = time.monotonic()
        # The pause: from the old image's last pipe read until the listeners answer again
        # (RPC served, pipes read); the first round up to READY=1 is reported after it.
        end = self._marks[-1][1] if self._served else now
        up.last_pause_ms = int((end - t0) * 1000) if t0 is not None else 0
        if not self._served:
            self._marks.append(("first round", now))
        steps, last = [], t0
        for what, when in self._marks:
            if last is not None:
                steps.append(f"{what} {(when - last) * 1000:.0f}")
            last = when
        if self.problems:
            up.failures += 1
            up.last_error = "; ".join(self.problems)
        logger.info(
            "upgraded from pubmon %s to %s in place: paused %d ms (%s), READY=1 %d ms later, "
            "%d publishers carried over%s",
            self.from_version,
            __version__,
            up.last_pause_ms,
            ", ".join(steps),
            int((now - end) * 1000),
            self.adopted,
            f", {len(self.problems)} problem(s) (see above)" if self.problems else "",
        )

    def _restore_http_exits(self, up: Upgrader) -> None:
        """The dashboard's recent exits (state format 2), for the publishers still there.
        Right after READY=1, before the dashboard's recorder first looks: exits counted while
        between the images are recorded then, against the `seen` counts handed over."""
        http = up._daemon.http
        saved = self.header.get("http_exits") if self.header else None
        if http is None or not isinstance(saved, dict):
            return
        sup = up._daemon.supervisor
        names = set(sup.publishers) if sup is not None else set()
        log = http.exits
        try:
            for name, count in saved["seen"].items():
                if name in names:
                    log.seen[name] = int(count)
            for name, kept in saved["exits"].items():
                if name in names:
                    log.exits[name] = deque((dict(x) for x in kept), maxlen=log.kept)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("upgrade: the dashboard's recent exits are not carried over: %r", exc)


def _reset_publisher(pub: Publisher) -> None:
    """Back to what the constructor made, for a publisher whose state was unusable."""
    pub.state = S.STOPPED
    pub.child = None
    pub._wanted = pub._due = pub.spec.autostart


def _restore_publisher(
    pub: Publisher, e: dict[str, Any], h: Handover, loop: asyncio.AbstractEventLoop
) -> AdoptedChild | None:
    state = S(e["state"])  # ValueError first: nothing is changed for an unusable entry
    health = Health(e["health"])
    c = e["child"]
    child: AdoptedChild | None = None
    if c is not None:
        pipes = {int(s): h._take(int(fd)) for s, fd in c["pipes"].items()}
        rc = c["returncode"]
        child = AdoptedChild(
            pub.name,
            int(c["pid"]),
            int(c["pgid"]),
            float(c["started"]),
            pipes=pipes,
            returncode=None if rc is None else int(rc),
        )
    out: OutputLog = pub.output
    _restore_ring(out._ring, e["output"], h.data)
    out.lines = int(e["output"]["lines"])
    out.bytes = int(e["output"]["bytes"])
    # What the old image's files did not take, counted on as lost before this file object.
    out._lost_before = (int(e["output"]["dropped_bytes"]), int(e["output"]["dropped"]))
    pub.state = state
    pub.health = health
    pub.details = str(e["details"])
    for name in ("restarts", "exits", "probe_failures", "probe_kills", "stuck_stops"):
        setattr(pub, name, int(e[name]))
    pub.memory_restarts = int(e["memory_restarts"])
    pub._cpu_base = float(e["cpu_base"])
    pub._oom_base = int(e.get("oom_base", 0))  # an older image's hand-off has none
    pub._stop_reason = e["stop_reason"] if e["stop_reason"] in EXIT_REASONS else None
    pub._above_since = e["above_since"]
    pub.last_exit = e["last_exit"]
    pub.last_exit_reason = str(e["last_exit_reason"])
    for reason, n in e["exit_reasons"].items():
        if reason in pub.exit_reasons:
            pub.exit_reasons[reason] = int(n)
    pub.started_wall = e["started_wall"]
    pub.state_since = float(e.get("state_since", pub.state_since))  # not in format 1
    pub.backoff_until = e["backoff_until"]
    pub.start_times.extend(float(t) for t in e["start_times"])
    pub.stuck = bool(e["stuck"])
    pub._wanted = bool(e["wanted"])
    pub._due = bool(e["due"])
    pub._then_start = bool(e["then_start"])
    pub._stop_ends = "failed" if e["stop_ends"] == "failed" else "stopped"
    pub._fail_why = str(e["fail_why"])
    pub._closed = bool(e["closed"])
    pub._runs = int(e["runs"])
    pub._failures = int(e["failures"])
    pub._crashes._times = deque(float(t) for t in e["crash_times"])
    pub._running_since = e["running_since"]
    pub._run_started = e["run_started"]
    if child is None and state in (S.STARTING, S.RUNNING, S.PAUSED, S.STOPPING):
        # A spawn had not happened yet (or its child was not recorded): not live, and due
        # again if it is wanted.
        pub.state = S.STOPPED
        pub._due = pub._wanted
        pub._then_start = False
    timer = e["timer"]
    if timer is not None and timer["kind"] in ("backoff", "kill", "stuck"):
        pub._runner.set_timer(timer["kind"], float(timer["when"]) - loop.time())
    if child is not None:
        sinks = {1: out.open_stream("stdout"), 2: out.open_stream("stderr")}
        for s, (at, size) in c["tails"].items():
            tail = h.data[at : at + size]
            sinks[int(s)]._tail = bytearray(tail) if tail else b""
        child.sinks = dict(sinks)
        pub.child = child
        post = pub._runner.post
        from pubmon.core.publisher import _Exited

        child.exited.add_done_callback(lambda _: post(_Exited(child)))
        child.watch()
    return child


def _restore_ring(ring: Ring, saved: dict[str, Any], data: bytes) -> None:
    total_lines = total_bytes = 0
    entries: deque[_Entry] = deque()
    for first, nlines, when, stream, at, size, cut in saved["ring"]:
        block = data[at : at + size]
        entry = _Entry(int(first), int(nlines), float(when), str(stream), b"", block, size, cut)
        entries.append(entry)
        total_lines += entry.nlines
        total_bytes += entry.size
    ring._entries = entries
    ring._lines = total_lines
    ring._bytes = total_bytes
    ring.last_seq = int(saved["last_seq"])
    ring.cleared = int(saved.get("cleared", 0))  # absent in the state of an older pubmon
    ring.trim()


async def _stop_strays(strays: set[int]) -> int:
    """SIGTERM the group of each of `strays`, SIGKILL after STOP_BOUND, reap. (Every
    publisher leads its own process group, named after its pid.)"""
    logger.error(
        "upgrade: stopping %d process(es) that could not be adopted: %s",
        len(strays),
        ", ".join(map(str, sorted(strays))),
    )
    for pid in strays:
        _signal_group(pid, signal.SIGTERM)
        _signal_group(pid, signal.SIGCONT)
    deadline = time.monotonic() + STOP_BOUND
    left = set(strays)
    while left:
        for pid in list(left):
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: never blocks
            except ChildProcessError:
                got = pid
            if got:
                _signal_group(pid, signal.SIGKILL)  # what remains of its group
                left.discard(pid)
        if left and time.monotonic() >= deadline:
            for pid in left:
                _signal_group(pid, signal.SIGKILL)
            deadline = float("inf")
        if left:
            await asyncio.sleep(0.01)
    return len(strays)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

"""One publisher instance: a state machine driven by requests, run by one task.

Everything that can change a publisher is a message in its inbox, handled one at a time, in
order, by its runner task (`run()`): the operator's requests (start, stop, restart), a reload's
update, the supervisor's shutdown and kill, the child's exit, the probe's verdicts, and timers
(backoff, the stop's SIGKILL escalation, the bound after SIGKILL). The runner is the only writer
of the publisher's state; nothing else reads a flag to decide what to do. A caller posts a
request and awaits its answer, which always comes: done, refused with the reason (InvalidState),
or superseded by a later request (a stop that overtook a start).

Three modules: this one is the state machine (its state, the requests and messages, what each
does to the state); pubmon.core.runner the mechanics that carry it out (the inbox loop, the
timer, the watch task, the process steps of a spawn and a stop); pubmon.core.watch the health
watch, a task that only posts verdicts. Neither imports this module: each takes what it needs
(callables, a Protocol).

Why one inbox instead of flags: the first design kept the operator's wish in `_wanted`,
`_restart_requested` and `_kick`, read by the restart loop and the watcher. A stop that raced
the child's own exit let the exit branch consume the kick, and the stop waited for ever. Here
the exit is a message like the stop: whichever comes first is handled first, and the second
finds the state the first left.

Stops: the stop signal (with SIGCONT) to the group, `stop_timeout` later SIGKILL to the group,
and `KILL_BOUND` after that, if the child has still not exited (D state on hung storage), the
publisher stays STOPPING with the pid and its /proc state in `details` and `stuck` set, so a
shutdown can give up on it and say so. Once the leader is gone, the rest of its group is killed
at once (systemd's KillMode=mixed) and the pipes are drained (bounded) before the state moves.

With a cgroup (pubmon.core.cgroup), the tree is the cgroup, not the group: once the leader is gone,
`cgroup.kill` takes what is left, escapees included, and the state moves only once the cgroup
is empty (bounded by CGROUP_EMPTY_BOUND); a spawn refuses a cgroup still populated by an
earlier run. PAUSED is the cgroup frozen (`pause()`/`resume()`), with the health watch off.
The memory sweep (the supervisor's, once a second) posts a verdict when the tree stayed above
`memory_restart`: the runner restarts it, reason "memory". A run the kernel's OOM killer ended
(SIGKILL, and its cgroup's memory.events `oom_kill` went up during the run) is counted under
"memory" too, with one log line naming the OOM kill (pubmon_publisher_oom_kills_total tells the
two apart).

Every state change goes through `_transition()`, which checks the table in `lifecycle.py` and
logs one line with the name, pid and reason.
"""

from __future__ import annotations

__all__ = ["KILL_BOUND", "Outcome", "Publisher", "PublisherSnapshot", "Pulse"]

import asyncio
import enum
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypeVar

from pubmon.config.model import PublisherSpec
from pubmon.core.cgroup import Cgroup, rlimits
from pubmon.core.lifecycle import Health, PublisherState, check_transition
from pubmon.core.output import OutputLog
from pubmon.core.policy import CrashWindow, next_delay, should_restart
from pubmon.core.process import Child, OrphanReaper, SpawnRequest, describe_exit, fork_turn, spawn
from pubmon.core.procstats import ProcFigures
from pubmon.core.runner import Runner, Timer, finish_run, kill_tree, prepare_cgroup, send_stop
from pubmon.core.stats import EXIT_REASONS, ExitReason, Histogram
from pubmon.core.usage import EMPTY_USAGE, Usage, UsageReader
from pubmon.core.watch import Verdict, watch
from pubmon.errors import InvalidState, SpawnError

logger = logging.getLogger(__name__)

S = PublisherState
_T = TypeVar("_T")
KILL_BOUND = 10.0  # after SIGKILL, how long before a child that has not exited is reported stuck
FREEZE_BOUND = 2.0  # how long a pause waits for cgroup.events to say frozen
USAGE_TTL = 1.0  # accounting read at most once a second per publisher
_LIVE = (S.STARTING, S.RUNNING)
_ACTIVE = (*_LIVE, S.PAUSED)  # a process to stop (a paused one is thawed first)
_IDLE = (S.STOPPED, S.EXITED, S.FATAL)


class Pulse:
    """A broadcast 'something changed': waiters re-check their own condition after each fire.

    Not an asyncio.Condition: that needs a lock taken around every wait and notify, and a
    wait_for over 1000 publishers would re-run every waiter's predicate on each fire; here
    `wait_for_each` looks at one item per fire (the first round of 1000 settles in O(N)).
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.fires = 0  # how many so far: a cache of something derived is good while unchanged

    def fire(self) -> None:
        self.fires += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self) -> None:
        """Wait for the next fire."""
        await self._event.wait()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while True:
            event = self._event
            if predicate():
                return
            await event.wait()

    async def wait_for_each(self, items: Iterable[_T], done: Callable[[_T], bool]) -> None:
        """Wait until `done(item)` has held for every item, in order: each fire looks only at
        the first item still pending (a scan of all on every fire is O(N^2) at 1000)."""
        pending = deque(items)

        def all_done() -> bool:
            while pending and done(pending[0]):
                pending.popleft()
            return not pending

        await self.wait_for(all_done)


class PublisherSnapshot(NamedTuple):
    """One publisher as the API shows it. A tuple: cheap to build 1000 of, and `snap[:-1]`
    (all but the uptime) tells whether anything else changed."""

    name: str
    program: str
    state: PublisherState
    pid: int | None
    health: Health
    restarts: int
    exits: int
    last_exit: int | None
    last_exit_reason: str
    port: int | None
    details: str  # why it is in this state (fatal reason, probe error, waiting for ...)
    uptime: float  # seconds in the current run (0 when not running); last, see above


class Outcome(enum.StrEnum):
    """How a request ended, when it was not refused."""

    DONE = "done"
    SUPERSEDED = "superseded"  # a later request changed the goal before this one was reached


RequestKind = Literal["start", "stop", "restart", "shutdown", "kill", "update", "pause", "resume"]


@dataclass(eq=False, slots=True)
class _Request:
    kind: RequestKind
    answer: asyncio.Future[Outcome]
    spec: PublisherSpec | None = None  # update: the new spec
    fields: frozenset[str] = frozenset()  # update: the top-level fields that differ
    restart: bool = False  # update: spawn settings changed
    quiet: bool = False  # shutdown: its STOPPING line at DEBUG (the supervisor said it once)


@dataclass(eq=False, slots=True)
class _Exited:
    child: Child


@dataclass(eq=False, slots=True)
class _Nudge:
    """Something outside changed (a dependency's state): re-check whether a spawn is due."""


@dataclass(eq=False, slots=True)
class _MemoryHigh:
    """The memory sweep's verdict: run `run` stayed above memory_restart."""

    run: int
    used: int


# What is posted to a publisher's inbox: requests, its child's exit, its watch's verdicts, the
# memory sweep's, dependencies' changes; and the runner's own Timer.
_Message = _Request | _Exited | Verdict | _Nudge | _MemoryHigh


@dataclass(eq=False, slots=True)
class _Waiter:
    done: Callable[[], bool]
    superseded: Callable[[], bool]
    answer: asyncio.Future[Outcome] = field(repr=False)


class Publisher:
    """One publisher instance. See the module docstring.

    Others read its state, snapshot and counters; they change it only through `start()`,
    `stop()`, `restart()`, `update()`, `shutdown()` and `kill()`, all of which post to the
    inbox of the runner, `run()`, a task the supervisor owns.
    """

    def __init__(
        self,
        spec: PublisherSpec,
        *,
        log_dir: str | None,
        changed: Pulse,
        deps_ready: Callable[[PublisherSpec], bool],
        on_transition: Callable[[Publisher], None] = lambda _: None,
        reaper: OrphanReaper | None = None,
        cgroup: Cgroup | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.output = OutputLog(spec.name, spec.log, log_dir)
        self.state = S.STOPPED
        self.health = Health.UNKNOWN
        self.details = ""
        self.restarts = 0  # automatic restarts (spawns after a failure), not the operator's
        self.exits = 0
        self.probe_failures = 0
        self.probe_kills = 0  # runs ended because the probe gave up on them
        self.stuck_stops = 0  # children that outlived SIGKILL by KILL_BOUND
        self.last_exit: int | None = None
        self.last_exit_reason = ""
        # For metrics: exits by reason (a closed set), probe round-trip times, wall-clock start.
        self.exit_reasons: dict[ExitReason, int] = dict.fromkeys(EXIT_REASONS, 0)
        self.probe_seconds = Histogram()
        self.started_wall: float | None = None  # time.time() when the current process started
        self.backoff_until: float | None = None  # time.time() of the next automatic start
        self.state_since = time.time()  # of the last state change (the CLI's "since")
        self.start_times: deque[float] = deque(maxlen=256)  # clock() of each spawn
        self.child: Child | None = None
        self.stuck = False  # STOPPING, and the child outlived SIGKILL by KILL_BOUND
        self.cgroup = cgroup  # its own cgroup (pubmon.core.cgroup), or None: process groups only
        self.memory_restarts = 0
        self._usage: tuple[float, Usage] | None = None  # (clock(), figures): see usage()
        self._cpu_base = 0.0  # the cgroup's CPU seconds before this run (it is reused)
        self._oom_base = 0  # its memory.events oom_kill before this run
        self._above_since: float | None = None  # the memory sweep's: over memory_restart since
        self._reader: UsageReader | None = None  # the current run's figures (files held open)
        self._changed = changed  # shared by every publisher (dependencies, daemon status)
        self._pulse = Pulse()  # this publisher's own changes
        self._deps_ready = deps_ready
        self._on_transition = on_transition
        self._reaper = reaper
        self._clock = clock
        # None: the random module's shared generator. A Random each cost 10 µs and 2.9 KB of
        # state per publisher (seeded from os.urandom; 2.9 MB at 1000, by tracemalloc).
        self._rng = rng
        self._runner: Runner[_Message] = Runner(spec.name)  # its inbox, timer, watch task
        self._waiters: list[_Waiter] = []
        # The runner's own bookkeeping: written and read by the runner task only.
        self._wanted = spec.autostart  # the operator's intent: run it (or not)
        self._due = spec.autostart  # a spawn should happen as soon as dependencies allow
        self._then_start = False  # STOPPING: spawn again once stopped (restart)
        self._quiet_stop = False  # a mass shutdown: its STOPPING line at DEBUG (_transition)
        self._stop_ends: Literal["stopped", "failed"] = "stopped"
        self._stop_reason: ExitReason | None = None  # counted instead (a memory restart)
        self._fail_why = ""  # why a stop that ends in a failure began (the probe's verdict)
        self._closed = False  # shutdown began: start and restart are refused
        self._runs = 0  # spawns so far (a request waits for a run later than the current)
        self._failures = 0  # failures in a row, for the backoff delay
        self._crashes = CrashWindow(
            max_restarts=spec.crash_loop.max_restarts, window=spec.crash_loop.window
        )
        self._running_since: float | None = None  # clock() when it last became RUNNING
        self._run_started: float | None = None  # clock() when the current process started

    def __repr__(self) -> str:
        pid = self.child.pid if self.child else None
        return f"<Publisher {self.name!r} pid={pid} {self.state} restarts={self.restarts}>"

    # --- what others read -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and self.child.returncode is None else None

    @property
    def wanted(self) -> bool:
        """Whether the operator (or autostart) wants it running."""
        return self._wanted

    @property
    def run_started(self) -> float | None:
        """clock() when the current process started (None between runs)."""
        return self._run_started

    def uptime(self) -> float:
        if self._run_started is None or self.pid is None:
            return 0.0
        return self._clock() - self._run_started

    def snapshot(self) -> PublisherSnapshot:
        # Positional: listPublishers builds one per publisher per call.
        spec = self.spec
        return PublisherSnapshot(
            self.name,
            spec.program,
            self.state,
            self.pid,
            self.health,
            self.restarts,
            self.exits,
            self.last_exit,
            self.last_exit_reason,
            spec.port,
            self.details,
            self.uptime(),
        )

    def counters(self) -> dict[str, int]:
        p = f"publisher.{self.name}."
        return {
            p + "restarts": self.restarts,
            p + "exits": self.exits,
            p + "probe_failures": self.probe_failures,
            p + "probe_kills": self.probe_kills,
            p + "stuck_stops": self.stuck_stops,
            p + "uptime_s": int(self.uptime()),
            p + "log_lines": self.output.lines,
            p + "log_bytes": self.output.bytes,
            p + "log_dropped": self.output.dropped,  # lines that never reached the file
            p + "log_dropped_bytes": self.output.dropped_bytes,  # logio: the same in bytes
            p + "memory_restarts": self.memory_restarts,
            **self._usage_counters(p),
        }

    def _usage_counters(self, p: str) -> dict[str, int]:
        u = self.usage()
        return {
            p + "cpu_ms": int(u.cpu_seconds * 1000),
            p + "memory_bytes": u.memory_bytes,
            p + "tasks": u.tasks,
        }

    def usage(self) -> Usage:
        """CPU seconds of the current run, memory and processes now: from its cgroup, else its
        process tree in /proc. Read at most once per USAGE_TTL (getCounters at 1000)."""
        now = self._clock()
        if self._usage is not None and now - self._usage[0] < USAGE_TTL:
            return self._usage[1]
        reader = self._usage_reader()
        if reader is None:
            u = EMPTY_USAGE
        else:
            u = reader.usage()
            if self.cgroup is not None:  # the cgroup outlives runs: this run's share
                u = u._replace(cpu_seconds=max(0.0, u.cpu_seconds - self._cpu_base))
        self._usage = (now, u)
        return u

    def figures(self, walk: ProcFigures | None) -> ProcFigures | None:
        """Its figures while it runs, the one source for status, getPublisher, counters, the
        metrics and the dashboard: with a cgroup, the cgroup's (`usage()`: cpu.stat, then
        memory.current or the RSS of cgroup.procs), which count a setsid'd escapee the walk
        from the leader misses; open fds stay the walk's (`walk`, pubmon.core.procstats; 0
        when it has none). Without a cgroup, or when it cannot be read: `walk`."""
        if self.child is None:
            return None
        if self.cgroup is not None:
            u = self.usage()
            if u.source != "none":
                fds = 0 if walk is None else walk.open_fds
                return ProcFigures(u.cpu_seconds, u.memory_bytes, fds, u.tasks)
        return walk

    def _usage_reader(self) -> UsageReader | None:
        """The current run's reader (made on first use, closed when the run ends)."""
        child = self.child
        if child is None or child.returncode is not None:
            return None
        if self._reader is None or self._reader.pid != child.pid:
            self._close_usage_reader()
            self._reader = UsageReader(child.pid, self.cgroup)
        return self._reader

    def check_memory(self, now: float) -> int | None:
        """The memory sweep's visit (about once a second): post a verdict to the runner once
        the memory stayed above memory_restart for memory_restart_after seconds. Reads one
        file (memory.current) or the RSS of its processes, and only when memory_restart is
        set and it runs. Returns the bytes read, None when it did not read."""
        spec = self.spec
        if spec.memory_restart is None or self.state not in _LIVE:
            self._above_since = None
            return None
        reader = self._usage_reader()
        if reader is None:
            self._above_since = None
            return None
        used = reader.memory()
        if used <= spec.memory_restart:
            self._above_since = None
            return used
        if self._above_since is None:
            self._above_since = now
        if now - self._above_since >= spec.memory_restart_after:
            self._above_since = None
            self._runner.post(_MemoryHigh(self._runs, used))
        return used

    def halted(self) -> bool:
        """Not running, and not about to be: no child, idle, no spawn due."""
        return self.child is None and self.state in _IDLE and not (self._wanted and self._due)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; re-checked after each change of this publisher."""
        await self._pulse.wait_for(predicate)

    # --- requests -----------------------------------------------------------------------------

    async def start(self) -> Outcome:
        """Start it; answers once the new run left STARTING (RUNNING, or failed)."""
        return await self._request("start")

    async def stop(self) -> Outcome:
        """Stop it; answers once it is STOPPED. Nothing restarts it until a start."""
        return await self._request("stop")

    async def restart(self) -> Outcome:
        """Stop it if it runs, start it again; answers once the new run left STARTING."""
        return await self._request("restart")

    def update(
        self, spec: PublisherSpec, fields: frozenset[str], *, restart: bool
    ) -> asyncio.Future[Outcome]:
        """A reload changed its settings (posted now): `restart` when spawn settings changed
        (answered once the new run left STARTING, if it runs), else applied live (at once)."""
        return self._post("update", spec, fields, restart)

    def shutdown(self, *, quiet: bool = False) -> asyncio.Future[Outcome]:
        """The daemon stops: stop it, and refuse start and restart from now on. `quiet`: the
        RUNNING -> STOPPING line at DEBUG (a mass stop, which the supervisor logs once)."""
        return self._post("shutdown", quiet=quiet)

    def kill(self) -> None:
        """SIGKILL its whole group now (a second SIGTERM to the daemon), and stop it."""
        self._post("kill")

    async def pause(self) -> Outcome:
        """Freeze its whole tree (cgroup.freeze): RUNNING -> PAUSED. InvalidState without a
        cgroup, or when it is not RUNNING."""
        return await self._request("pause")

    async def resume(self) -> Outcome:
        """Thaw it: PAUSED -> RUNNING, and its health watch starts again."""
        return await self._request("resume")

    def nudge(self) -> None:
        """A dependency changed state: a spawn waiting for it may be due."""
        self._runner.post(_Nudge())

    async def _request(self, kind: RequestKind) -> Outcome:
        # Shielded: a caller that stops waiting (its RPC timed out) does not withdraw the
        # request, which stays in force, as an operator expects of a stop.
        return await asyncio.shield(self._post(kind))

    def _post(
        self,
        kind: RequestKind,
        spec: PublisherSpec | None = None,
        fields: frozenset[str] = frozenset(),
        restart: bool = False,
        quiet: bool = False,
    ) -> asyncio.Future[Outcome]:
        answer: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._runner.post(_Request(kind, answer, spec, fields, restart, quiet))
        return answer

    # --- the runner ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Handle the inbox until cancelled (the publisher was removed or the daemon ends)."""
        await self._runner.run(
            begin=self._begin,
            handle=self._handle,
            spawn_due=self._spawn_due,
            spawn=self._spawn_and_settle,
            end=self._end,
        )

    def _begin(self) -> None:
        if self.child is not None and self.state in _LIVE:  # adopted by an upgrade
            self._start_watch(announce=self.state == S.STARTING)

    async def _spawn_and_settle(self) -> None:
        await self._spawn()
        self._settle_waiters()  # a spawn that failed at once answers now

    def _end(self, unhandled: list[_Message | Timer]) -> None:
        """The runner ends (its timer cancelled): nothing is left behind, every caller is
        answered."""
        if self.child is not None:  # cancelled mid-run: never leave it behind
            kill_tree(self.name, self.child, self.cgroup)
            self.child.close()
        self._close_usage_reader()
        for w in self._waiters:
            if not w.answer.done():
                w.answer.set_result(Outcome.SUPERSEDED)
        for msg in unhandled:
            if isinstance(msg, _Request) and not msg.answer.done():
                msg.answer.set_result(Outcome.SUPERSEDED)

    async def _handle(self, msg: _Message | Timer) -> None:
        if isinstance(msg, _Request):
            try:
                if msg.kind in ("pause", "resume"):
                    await self._on_freeze(msg)
                else:
                    self._on_request(msg)
            except InvalidState as exc:
                if not msg.answer.done():
                    msg.answer.set_exception(exc)
        elif isinstance(msg, _Exited):
            if msg.child is self.child:
                await self._on_exit(msg.child)
        elif isinstance(msg, Verdict):
            if self._runner.current_watch(msg.watch) and self.child is not None:
                self._on_verdict(msg)
        elif isinstance(msg, Timer) and self._runner.fired(msg):
            self._on_timer(msg)
        elif isinstance(msg, _MemoryHigh) and msg.run == self._runs and self.state in _LIVE:
            self._on_memory_high(msg.used)
        self._settle_waiters()

    def _spawn_due(self) -> bool:
        if not (self._wanted and self._due and self.child is None):
            return False
        if self.state not in (*_IDLE, S.BACKOFF):
            return False
        if not self._deps_ready(self.spec):
            waiting = "waiting for " + ", ".join(self.spec.depends_on)
            if self.details != waiting:
                self.details = waiting
                self._fire()
            return False
        return True

    # --- requests, as the runner handles them ---------------------------------------------------

    def _on_request(self, req: _Request) -> None:
        kind = req.kind
        if kind in ("start", "restart") and self._closed:
            raise InvalidState(f"{self.name}: pubmon is stopping; {kind} refused")
        if kind == "start":
            if self.state in _ACTIVE or (self.state == S.STOPPING and self._then_start):
                raise InvalidState(f"{self.name} is already {self.state}")
            self._want_run()
            self._await_next_run(req.answer)
        elif kind == "restart":
            self._want_run()
            self._await_next_run(req.answer)
        elif kind in ("stop", "shutdown"):
            if kind == "stop" and self.state == S.STOPPED and not self._wanted:
                raise InvalidState(f"{self.name} is already STOPPED")
            self._closed = self._closed or kind == "shutdown"
            self._quiet_stop = self._quiet_stop or req.quiet
            self._stop_request("stopped by operator" if kind == "stop" else "pubmon is stopping")
            # Done once STOPPED, or once the child is reported stuck after its SIGKILL (the
            # answer, STOPPING, names its pid and /proc state): waiting longer tells nothing.
            self._await(
                req.answer, lambda: self.state == S.STOPPED or self.stuck, lambda: self._wanted
            )
        elif kind == "kill":
            self._closed = True
            self._stop_request("killed: pubmon is stopping now")
            if self.child is not None:
                kill_tree(self.name, self.child, self.cgroup)
                self._runner.set_timer("stuck", KILL_BOUND)
            req.answer.set_result(Outcome.DONE)
        else:
            assert kind == "update" and req.spec is not None
            self._on_update(req)

    def _want_run(self) -> None:
        """start / restart: a fresh run as soon as possible, failures forgiven."""
        self._wanted = True
        self._failures = 0
        self._crashes.reset()
        if self.state in _ACTIVE:
            self._begin_stop("restart requested", then_start=True)
        elif self.state == S.STOPPING:
            self._then_start = True
            self._stop_ends = "stopped"
        else:
            self._runner.cancel_timer()
            self.backoff_until = None
            self._due = True

    def _stop_request(self, why: str) -> None:
        self._wanted = False
        self._due = False
        self._then_start = False
        if self.state in _ACTIVE:
            self._begin_stop(why)
        elif self.state == S.STOPPING:
            self._stop_ends = "stopped"
        elif self.state in (S.BACKOFF, S.EXITED, S.FATAL):
            self._runner.cancel_timer()
            self.backoff_until = None
            self._transition(S.STOPPED, why)
        else:  # STOPPED already: nothing moves, but whoever waits for it to halt must look
            if self.details.startswith("waiting for "):
                self.details = ""
            self._fire()

    def _on_update(self, req: _Request) -> None:
        spec = req.spec
        assert spec is not None
        old, self.spec = self.spec, spec
        self._crashes.max_restarts = spec.crash_loop.max_restarts
        self._crashes.window = spec.crash_loop.window
        if spec.log != old.log:
            self.output.reconfigure(spec.log)
        if req.restart:
            if self.state in _ACTIVE:
                self._begin_stop("config changed: " + ", ".join(sorted(req.fields)), True)
            elif self.state == S.BACKOFF:  # the new settings may be the fix: try them now
                self._runner.cancel_timer()
                self.backoff_until = None
                self._due = True
            if self._wanted:
                self._await_next_run(req.answer)
                return
        elif (
            spec.probe != old.probe or spec.data_source != old.data_source
        ) and self.state in _LIVE:
            assert self.child is not None
            # A new probe at once, in the phase the run is in; a new data source is handed
            # over by the new probe once it finds the child healthy.
            self._start_watch(announce=spec.data_source != old.data_source)
            logger.info("%s: probe rebuilt (%s)", self.name, ", ".join(sorted(req.fields)))
        req.answer.set_result(Outcome.DONE)

    def _await_next_run(self, answer: asyncio.Future[Outcome]) -> None:
        """Answer once a run later than the current one has left STARTING (or failed)."""
        runs = self._runs
        self._await(
            answer,
            lambda: self._runs > runs and self.state not in (S.STARTING, S.STOPPING),
            lambda: not self._wanted and self._runs == runs,
        )

    def _await(
        self,
        answer: asyncio.Future[Outcome],
        done: Callable[[], bool],
        superseded: Callable[[], bool],
    ) -> None:
        self._waiters.append(_Waiter(done, superseded, answer))

    def _settle_waiters(self) -> None:
        if not self._waiters:
            return
        keep = []
        for w in self._waiters:
            if w.answer.done():
                continue
            if w.done():
                w.answer.set_result(Outcome.DONE)
            elif w.superseded():
                w.answer.set_result(Outcome.SUPERSEDED)
            else:
                keep.append(w)
        self._waiters = keep

    # --- spawning -------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        async with fork_turn():  # many due at once (the first round): one fork per loop pass
            if not self._runner.inbox.empty():
                return  # requests came while it waited for its turn: they go first
            spec = self.spec
            self._due = False
            self._runs += 1
            self.backoff_until = None
            self._transition(S.STARTING, "spawning " + spec.command[0])
            self.health = Health.UNKNOWN
            self.start_times.append(self._clock())
            try:
                req = SpawnRequest(
                    name=spec.name,
                    argv=spec.command,
                    directory=spec.directory,
                    environment=spec.environment,
                    user=spec.user,
                    cgroup_procs=await self._prepare_cgroup(),
                    rlimits=rlimits(spec.limits),
                )
                child = await spawn(
                    req,
                    self.output.open_stream("stdout"),
                    self.output.open_stream("stderr"),
                    reaper=self._reaper,
                )
            except SpawnError as exc:
                self.last_exit_reason = exc.why
                if exc.permanent:
                    self._go_terminal(S.FATAL, f"cannot start: {exc.why}")
                else:
                    self._after_failure("spawn failed", exc.why)
                return
        self.child = child
        self._run_started = self._clock()
        self.started_wall = time.time()
        self._stop_ends = "stopped"
        logger.info("%s spawned pid %d: %s", spec.name, child.pid, " ".join(spec.command))
        post = self._runner.post
        child.exited.add_done_callback(lambda _: post(_Exited(child)))
        self._start_watch(announce=True)
        self._fire()

    # --- stopping and exits ---------------------------------------------------------------------

    async def _prepare_cgroup(self) -> str | None:
        """Its cgroup, ready for the spawn to join (the cgroup.procs to write), or None."""
        cg = self.cgroup
        if cg is None:
            return None
        self._cpu_base = await prepare_cgroup(self.name, cg, self.spec.limits)
        self._oom_base = self._oom_kills()
        return cg.procs

    def _oom_kills(self) -> int:
        """Its cgroup's memory.events oom_kill (0 without the memory controller)."""
        cg = self.cgroup
        return 0 if cg is None else cg.limit_events().get("memory.events:oom_kill", 0)

    def _close_usage_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _on_memory_high(self, used: int) -> None:
        spec = self.spec
        assert self.child is not None and spec.memory_restart is not None
        why = (
            f"memory {_mib(used)} above memory_restart {_mib(spec.memory_restart)} for "
            f"{spec.memory_restart_after:g} s"
        )
        logger.warning("%s pid %d: %s; restarting it", self.name, self.child.pid, why)
        self.memory_restarts += 1
        self.restarts += 1
        self._begin_stop(why, then_start=True, reason="memory")

    async def _on_freeze(self, req: _Request) -> None:
        """pause / resume: cgroup.freeze of its whole tree; the health watch (probes, memory)
        is off while it is frozen."""
        pause = req.kind == "pause"
        cg = self.cgroup
        if cg is None:
            raise InvalidState(
                f"{self.name} has no cgroup, and pause/resume freeze one: give pubmon a cgroup "
                "([daemon] cgroup, or Delegate=yes in its systemd unit)"
            )
        if self.state != (S.RUNNING if pause else S.PAUSED) or self.child is None:
            raise InvalidState(
                f"{self.name} is {self.state}: only a "
                f"{'RUNNING publisher can be paused' if pause else 'PAUSED one can be resumed'}"
            )
        try:
            cg.freeze(pause)
        except OSError as exc:
            raise InvalidState(f"{self.name}: cannot write {cg.path}/cgroup.freeze: {exc}") from exc
        if pause:
            self._runner.stop_watch()
            if not await cg.wait_frozen(FREEZE_BOUND):
                logger.warning("%s: cgroup %s not frozen after %g s", self.name, cg.path,
                               FREEZE_BOUND)  # fmt: skip
            self._transition(S.PAUSED, "paused by operator")
        else:
            self._transition(S.RUNNING, "resumed by operator")
            self._start_watch(announce=False)
        req.answer.set_result(Outcome.DONE)

    def _begin_stop(
        self,
        why: str,
        then_start: bool = False,
        *,
        failed: bool = False,
        reason: ExitReason | None = None,
    ) -> None:
        """STARTING/RUNNING/PAUSED -> STOPPING: the stop signal now, SIGKILL after
        stop_timeout. `reason` counts the exit under that reason (memory)."""
        child = self.child
        assert child is not None
        self._then_start = then_start
        self._stop_ends = "failed" if failed else "stopped"
        self._stop_reason = reason
        self._runner.stop_watch()
        spec = self.spec  # a reload's stop settings apply to every stop that starts after it
        if self.state == S.PAUSED and self.cgroup is not None:
            try:
                self.cgroup.freeze(False)  # a frozen process cannot act on the stop signal
            except OSError as exc:  # then SIGKILL after stop_timeout (it works on frozen ones)
                logger.error("%s: cannot thaw cgroup %s: %s", self.name, self.cgroup.path, exc)
        self._transition(S.STOPPING, why)
        send_stop(child, spec.stop_signal)
        self._runner.set_timer("kill", spec.stop_timeout)

    async def _on_exit(self, child: Child) -> None:
        self._runner.stop_watch()
        self._runner.cancel_timer()
        await finish_run(self.name, child, self.cgroup)
        stopping = self.state == S.STOPPING
        if stopping and self._stop_reason is not None:
            reason: ExitReason = self._stop_reason
        elif stopping:
            reason = "operator" if self._stop_ends == "stopped" else "unhealthy"
        else:
            reason = "signal" if (child.returncode or 0) < 0 else "exit"
        if child.returncode == -signal.SIGKILL and self._oom_kills() > self._oom_base:
            reason = "memory"
            logger.warning(
                "%s pid %d: killed by the OOM killer (its cgroup %s memory.events oom_kill %d)",
                self.name,
                child.pid,
                self.cgroup.path if self.cgroup is not None else "",
                self._oom_kills(),
            )
        self.exit_reasons[reason] += 1
        self.exits += 1
        self.last_exit = child.returncode
        self.last_exit_reason = describe_exit(child.returncode)
        logger.debug("%s pid %d %s", self.name, child.pid, self.last_exit_reason)
        self.child = None
        self._close_usage_reader()
        self._run_started = None
        self.started_wall = None
        self.stuck = False
        if stopping and self._stop_ends == "stopped":
            self.health = Health.UNKNOWN
            self._transition(S.STOPPED, f"stopped ({self.last_exit_reason})")
            if self._then_start:
                self._then_start = False
                self._due = True
        elif stopping:
            self._after_failure("unhealthy", self._fail_why)
        else:
            self._after_failure("exited", self.last_exit_reason)

    def _after_failure(self, what: str, why: str) -> None:
        """The child exited, was killed as unhealthy, or could not be spawned: restart it
        after a backoff delay, or not (restart policy, crash loop)."""
        spec = self.spec
        now = self._clock()
        self.health = Health.UNKNOWN
        if what == "exited":
            restart = should_restart(spec.restart, self.last_exit, spec.success_exit_codes)
        else:
            restart = spec.restart != "never" or what == "spawn failed"
        if not restart:
            self._go_terminal(S.EXITED, why)
            return
        # A long healthy run forgives earlier failures: the delay starts again from nothing.
        if (
            self._running_since is not None
            and now - self._running_since >= spec.backoff.reset_after
        ):
            self._failures = 0
        self._running_since = None
        if not self._crashes.allow(now):
            self._go_terminal(
                S.FATAL,
                f"crash loop: {spec.crash_loop.max_restarts} restarts within "
                f"{spec.crash_loop.window:g} s, last {why}",
            )
            return
        b = spec.backoff
        delay = next_delay(
            self._failures,
            initial=b.initial,
            factor=b.factor,
            maximum=b.max,
            jitter=b.jitter,
            rng=self._rng,
        )
        self._failures += 1
        self.backoff_until = time.time() + delay
        self._transition(S.BACKOFF, f"{what}: {why}; restart in {delay:.3g} s")
        self._runner.set_timer("backoff", delay)

    def _go_terminal(self, state: Literal[S.EXITED, S.FATAL], why: str) -> None:
        self._wanted = False
        self._due = False
        if state == S.FATAL:
            logger.error("%s is FATAL: %s", self.name, why)
        self._transition(state, why)

    # --- timers ---------------------------------------------------------------------------------

    def _on_timer(self, msg: Timer) -> None:
        if msg.kind == "backoff" and self.state == S.BACKOFF:
            self.restarts += 1
            self._due = True
        elif msg.kind == "kill" and self.state == S.STOPPING and self.child is not None:
            logger.warning(
                "%s pid %d ignored %s for %g s; sending SIGKILL to its process group",
                self.name,
                self.child.pid,
                self.spec.stop_signal.name,
                self.spec.stop_timeout,
            )
            kill_tree(self.name, self.child, self.cgroup)
            self._runner.set_timer("stuck", KILL_BOUND)
        elif msg.kind == "stuck" and self.state == S.STOPPING and self.child is not None:
            pid = self.child.pid
            self.stuck = True
            self.stuck_stops += 1
            self.details = (
                f"pid {pid} has not exited {KILL_BOUND:g} s after SIGKILL "
                f"(/proc state: {_proc_state(pid)})"
            )
            logger.error("%s: %s", self.name, self.details)
            self._fire()

    # --- health ---------------------------------------------------------------------------------

    def _start_watch(self, *, announce: bool) -> None:
        """A new health watch (pubmon.core.watch) for the current run, replacing the last."""
        post, reaper, clock = self._runner.post, self._reaper, self._clock
        self._runner.start_watch(
            lambda number: watch(self, number, announce, post=post, reaper=reaper, clock=clock)
        )

    def _on_verdict(self, v: Verdict) -> None:
        if v.kind == "up" and self.state == S.STARTING:
            self._set_health(v.health)
            self._running_since = self._clock()
            self._transition(S.RUNNING, v.details)
        elif v.kind == "health" and self.state == S.RUNNING:
            if v.health == Health.UNHEALTHY:
                self.probe_failures += 1
            self._set_health(v.health)
            self.details = v.details
            self._fire()
        elif v.kind in ("start-timeout", "unhealthy") and self.state in _LIVE:
            self.probe_failures += 1
            self.probe_kills += 1
            assert self.child is not None
            logger.warning(
                "%s pid %d is unhealthy: %s; killing it", self.name, self.child.pid, v.details
            )
            self._set_health(v.health)
            self._fail_why = v.details
            self._begin_stop(v.details, failed=True)

    # --- state ----------------------------------------------------------------------------------

    def _transition(self, new: PublisherState, why: str) -> None:
        old = self.state
        check_transition(self.name, old, new)
        self.state = new
        self.state_since = time.time()
        self.details = why
        # A mass stop (shutdown(quiet=True)) has its STOPPING lines at DEBUG: the supervisor
        # said "stopping N publishers" once. Two INFO lines per publisher were a fifth of
        # stopping 1000; the STOPPED line, with how each one ended, stays at INFO.
        level = logging.DEBUG if new == S.STOPPING and self._quiet_stop else logging.INFO
        logger.log(level, "%s pid %s: %s -> %s (%s)", self.name, self.pid, old, new, why)
        self._fire()
        self._on_transition(self)

    def _fire(self) -> None:
        self._pulse.fire()
        self._changed.fire()

    def _set_health(self, health: Health) -> None:
        if health != self.health:
            logger.info("%s health %s -> %s", self.name, self.health, health)
            self.health = health
            self._fire()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _proc_state(pid: int) -> str:
    """The `State:` line of /proc/<pid>/status (e.g. "D (disk sleep)"), or why not."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split(":", 1)[1].strip()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return "unknown"

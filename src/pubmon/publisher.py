"""One publisher's runner: spawn, watch, stop escalation, restart loop.

A `Publisher` lives as long as its name is in the config. Its `run()` task (owned by the
supervisor's TaskGroup) loops: wait until the publisher is wanted and its dependencies are
RUNNING, spawn it, watch it until it exits, turns unhealthy or is told to stop, then decide what
comes next from its restart policy (`policy.py`). The operator's wish (`_wanted`) is the only
thing that decides whether it runs; the loop never undoes an operator's stop.

Every state change goes through `_transition()`, which checks the table in `lifecycle.py` and
logs one line with the name, pid and reason.
"""

from __future__ import annotations

__all__ = ["Publisher", "PublisherSnapshot", "StopFunc", "stop_child"]

import asyncio
import logging
import random
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, NamedTuple, TypeVar

from ._stats import EXIT_REASONS as EXIT_REASONS_ALL
from ._stats import ExitReason, Histogram
from .config import PublisherSpec
from .errors import InvalidState, SpawnError
from .lifecycle import Health, PublisherState, check_transition
from .output import OutputLog
from .policy import CrashWindow, next_delay, should_restart
from .probe import Probe, make_probe
from .spawn import Child, OrphanReaper, SpawnRequest, describe_exit, fork_turn, spawn

logger = logging.getLogger(__name__)

S = PublisherState
_T = TypeVar("_T")
DRAIN_TIMEOUT = 2.0  # after the group is gone, how long pipes may stay open (an escaped holder)
_STARTING_POLL_FIRST = 0.02  # the first probe while STARTING; doubles up to the interval


class Pulse:
    """A broadcast 'something changed': waiters re-check their own condition after each fire."""

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


StopFunc = Callable[[Child, signal.Signals, float, str], Awaitable[None]]


async def stop_child(child: Child, sig: signal.Signals, timeout: float, name: str) -> None:
    """Stop a child and its group: `sig`, up to `timeout` seconds, then SIGKILL; drain the pipes.

    Safe to call on a child that already exited: the rest of its group is still killed.
    """
    if child.returncode is None:
        child.signal(sig)
        if sig not in (signal.SIGKILL, signal.SIGCONT):
            # A stopped (SIGSTOP, SIGTSTP) process would keep `sig` pending until the SIGKILL;
            # continue the group so it can act on it, as systemd does.
            child.signal(signal.SIGCONT)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(child.exited)
        except TimeoutError:
            logger.warning(
                "%s pid %d ignored %s for %g s; sending SIGKILL to its process group",
                name,
                child.pid,
                sig.name,
                timeout,
            )
    # Once the leader is gone, what remains of its group (grandchildren) is killed at once, as
    # systemd's KillMode=mixed does; a SIGKILL'd process cannot refuse.
    child.signal(signal.SIGKILL)
    await asyncio.shield(child.exited)
    if not await child.drain(DRAIN_TIMEOUT):
        logger.warning(
            "%s pid %d: its output pipes are still held open by a process outside its group "
            "after %g s; closing them",
            name,
            child.pid,
            DRAIN_TIMEOUT,
        )
    child.close()


Outcome = Literal["exited", "unhealthy", "stop", "restart", "spawn-failed"]


class Publisher:
    """The runner of one publisher instance. See the module docstring."""

    def __init__(
        self,
        spec: PublisherSpec,
        *,
        log_dir: str | None,
        changed: Pulse,
        deps_ready: Callable[[PublisherSpec], bool],
        reaper: OrphanReaper | None = None,
        stop: StopFunc = stop_child,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.output = OutputLog(spec.name, spec.log, log_dir)
        self.state = S.STOPPED
        self.health = Health.UNKNOWN
        self.details = ""
        self.restarts = 0  # automatic restarts (not the operator's)
        self.exits = 0
        self.probe_failures = 0
        self.probe_kills = 0  # runs ended because the probe gave up on them
        self.last_exit: int | None = None
        self.last_exit_reason = ""
        # For metrics: exits by reason (a closed set), probe round-trip times, wall-clock start.
        self.exit_reasons: dict[ExitReason, int] = dict.fromkeys(EXIT_REASONS_ALL, 0)
        self.probe_seconds = Histogram()
        self.started_wall: float | None = None  # time.time() when the current process started
        self.start_times: deque[float] = deque(maxlen=256)  # clock() of each spawn
        self.child: Child | None = None
        self._changed = changed  # shared by every publisher (dependencies, daemon status)
        self._pulse = Pulse()  # this publisher's own changes (operators waiting on it)
        self.settled = asyncio.Event()  # set once it first ran or failed (sd_notify READY)
        self._deps_ready = deps_ready
        self._reaper = reaper
        self._stop = stop
        self._clock = clock
        self._rng = rng or random.Random()
        self._wanted = spec.autostart
        self._restart_requested = False
        self._kick = asyncio.Event()
        self._failures = 0  # failures in a row, for the backoff delay
        self._crashes = CrashWindow(
            max_restarts=spec.crash_loop.max_restarts, window=spec.crash_loop.window
        )
        self._running_since: float | None = None  # clock() when it last became RUNNING
        self._run_started: float | None = None  # clock() when the current process started
        self._spawn_error: SpawnError | None = None

    def __repr__(self) -> str:
        pid = self.child.pid if self.child else None
        return f"<Publisher {self.name!r} pid={pid} {self.state} restarts={self.restarts}>"

    # --- what others read -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child and self.child.returncode is None else None

    @property
    def wanted(self) -> bool:
        return self._wanted

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
            p + "uptime_s": int(self.uptime()),
            p + "log_lines": self.output.lines,
            p + "log_bytes": self.output.bytes,
            p + "log_dropped": self.output.dropped,
        }

    # --- operator's requests ----------------------------------------------------------------

    async def start(self) -> None:
        """Start a publisher that is not running; returns once it left STARTING."""
        if self.state in (S.STARTING, S.RUNNING) and self._wanted:
            raise InvalidState(f"{self.name} is already {self.state}")
        # Asks the runner for a fresh process as soon as it can (this also cuts a backoff delay
        # short); the runner clears it when it spawns, which is what _wait_started waits for.
        self._restart_requested = True
        self._wanted = True
        self._reset_failures()
        self._kick.set()
        await self._wait_started()

    async def stop(self) -> None:
        """Stop a publisher; returns once it is STOPPED. Nothing restarts it until start()."""
        if self.state == S.STOPPED and not self._wanted:
            raise InvalidState(f"{self.name} is already STOPPED")
        self._wanted = False
        self._kick.set()
        if self.state in (S.EXITED, S.FATAL):
            # The runner is idle in these states: the move is ours to make.
            self._transition(S.STOPPED, "stopped by operator")
        await self._pulse.wait_for(lambda: self.state == S.STOPPED)

    async def restart(self) -> None:
        """Stop (if running) and start again at once, whatever its state."""
        self._wanted = True
        self._restart_requested = True
        self._reset_failures()
        self._kick.set()
        await self._wait_started()

    def stop_soon(self) -> None:
        """Ask for a stop without waiting (shutdown)."""
        self._wanted = False
        self._kick.set()

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (a second SIGTERM to the daemon)."""
        self._wanted = False
        if self.child is not None:
            self.child.signal(signal.SIGKILL)
        self._kick.set()

    def update_policy(self, spec: PublisherSpec) -> None:
        """A reload changed only policy settings: apply them to the running publisher."""
        assert spec.spawn_key() == self.spec.spawn_key()
        self.spec = spec
        self._crashes.max_restarts = spec.crash_loop.max_restarts
        self._crashes.window = spec.crash_loop.window
        self.output.reconfigure(spec.log)
        self._kick.set()  # the watcher re-reads probe settings on its next round

    async def wait_started_if_wanted(self) -> None:
        if self._wanted:
            await self._wait_started()

    async def _wait_started(self) -> None:
        # The runner clears _restart_requested once it acted on it; then wait for a verdict.
        await self._pulse.wait_for(
            lambda: (
                not self._restart_requested
                and self.state not in (S.STARTING, S.STOPPING)
                and (self.state != S.STOPPED or not self._wanted)
            )
        )

    def halted(self) -> bool:
        """Not running, and not about to be: no child, and not wanted."""
        return (
            self.child is None and not self._wanted and self.state not in (S.STARTING, S.STOPPING)
        )

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; re-checked after each change of this publisher."""
        await self._pulse.wait_for(predicate)

    def _reset_failures(self) -> None:
        self._failures = 0
        self._crashes.reset()

    # --- the runner ---------------------------------------------------------------------------

    def _transition(self, new: PublisherState, why: str) -> None:
        old = self.state
        check_transition(self.name, old, new)
        self.state = new
        self.details = why
        if new == S.RUNNING:
            self._running_since = self._clock()
        logger.info("%s pid %s: %s -> %s (%s)", self.name, self.pid, old, new, why)
        if new in (S.RUNNING, S.BACKOFF, S.EXITED, S.FATAL):
            self.settled.set()
        self._fire()

    def _fire(self) -> None:
        self._pulse.fire()
        self._changed.fire()

    def _set_health(self, health: Health, why: str = "") -> None:
        if health != self.health:
            logger.info("%s health %s -> %s %s", self.name, self.health, health, why)
            self.health = health
            self._fire()

    async def run(self) -> None:
        """The restart loop. Runs until cancelled (the publisher was removed or the daemon ends)."""
        try:
            while True:
                self._kick.clear()
                if not self._wanted:
                    self._restart_requested = False
                    if self.state == S.BACKOFF:
                        self._transition(S.STOPPED, "stopped by operator during backoff")
                    await self._kick.wait()
                    continue
                if not self._deps_ready(self.spec):
                    self.details = "waiting for " + ", ".join(self.spec.depends_on)
                    await self._wait_kick_or(self._changed.wait_for(self._deps_ok_or_kicked))
                    continue
                self._restart_requested = False
                outcome = await self._run_once()
                if outcome in ("stop", "restart"):
                    continue
                await self._after_failure(outcome)
        finally:
            if self.child is not None:  # cancelled mid-run: never leave it behind
                self.child.signal(signal.SIGKILL)
                self.child.close()

    def _deps_ok_or_kicked(self) -> bool:
        return self._kick.is_set() or self._deps_ready(self.spec)

    async def _wait_kick_or(self, aw: Awaitable[None]) -> None:
        kick = asyncio.ensure_future(self._kick.wait())
        other = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({kick, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (kick, other):
                t.cancel()
            await asyncio.gather(kick, other, return_exceptions=True)

    async def _run_once(self) -> Outcome:
        """Spawn, watch until it ends or must end, and stop it. Returns why it ended."""
        async with fork_turn():  # many due at once (the first round): one fork per loop pass
            if not self._wanted:  # stopped while it waited for its turn: nothing to undo
                return "stop"
            spec = self.spec
            self._transition(S.STARTING, "spawning " + spec.command[0])
            self.health = Health.UNKNOWN
            self.start_times.append(self._clock())
            req = SpawnRequest(
                name=spec.name,
                argv=spec.command,
                directory=spec.directory,
                environment=spec.environment,
                user=spec.user,
            )
            try:
                child = await spawn(
                    req,
                    self.output.open_stream("stdout"),
                    self.output.open_stream("stderr"),
                    reaper=self._reaper,
                )
            except SpawnError as exc:
                self._spawn_error = exc
                return "spawn-failed"
        self.child = child
        self._run_started = self._clock()
        self.started_wall = time.time()
        logger.info("%s spawned pid %d: %s", spec.name, child.pid, " ".join(spec.command))
        self._fire()
        outcome: Outcome
        watcher = asyncio.ensure_future(self._watch(child))
        kicked = asyncio.ensure_future(self._wait_for_request())
        try:
            waits: set[asyncio.Future[object]] = {child.exited, watcher, kicked}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if child.exited.done():
                outcome = "exited"
            elif watcher in done:
                watcher.result()  # a bug in the watcher must surface, not look like unhealthy
                outcome = "unhealthy"
            else:
                outcome = "restart" if self._restart_requested and self._wanted else "stop"
        finally:
            for t in (watcher, kicked):
                t.cancel()
            await asyncio.gather(watcher, kicked, return_exceptions=True)
        if outcome in ("stop", "restart"):
            self._transition(S.STOPPING, "stop requested" if outcome == "stop" else "restart")
        elif outcome == "unhealthy":
            self.probe_kills += 1
            logger.warning(
                "%s pid %d is unhealthy: %s; killing it", self.name, child.pid, self.details
            )
        await self._stop(child, spec.stop_signal, spec.stop_timeout, spec.name)
        reasons: dict[Outcome, ExitReason] = {
            "stop": "operator",
            "restart": "operator",
            "unhealthy": "unhealthy",
        }
        self._record_exit(child, reasons.get(outcome))
        self.child = None
        self._run_started = None
        self.started_wall = None
        if outcome in ("stop", "restart"):
            self.health = Health.UNKNOWN
            self._transition(S.STOPPED, f"stopped ({self.last_exit_reason})")
        return outcome

    def _record_exit(self, child: Child, reason: ExitReason | None) -> None:
        # `reason` None: the child ended by itself, so its status says which.
        if reason is not None:
            self.exit_reasons[reason] += 1
        elif not (child.returncode or 0) < 0:
            self.exit_reasons["exit"] += 1
        else:
            self.exit_reasons["signal"] += 1
        self.exits += 1
        self.last_exit = child.returncode
        self.last_exit_reason = describe_exit(child.returncode)
        # No line of its own: the transition that follows names the reason.
        logger.debug("%s pid %d %s", self.name, child.pid, self.last_exit_reason)

    async def _wait_for_request(self) -> None:
        """Returns when the operator asks for a stop or a restart of the running child."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self._wanted or self._restart_requested:
                return

    async def _after_failure(self, outcome: Outcome) -> None:
        """The child exited, turned unhealthy or could not be spawned: restart, or not."""
        spec = self.spec
        now = self._clock()
        if outcome == "spawn-failed":
            exc = self._spawn_error
            assert exc is not None
            self.last_exit_reason = exc.why
            if exc.permanent:
                self._go_terminal(S.FATAL, f"cannot start: {exc.why}")
                return
            restart = True
        elif outcome == "unhealthy":
            restart = spec.restart != "never"
        else:
            restart = should_restart(spec.restart, self.last_exit, spec.success_exit_codes)
        self.health = Health.UNKNOWN
        if not restart:
            self._go_terminal(S.EXITED, self.last_exit_reason)
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
                f"{spec.crash_loop.window:g} s, last {self.last_exit_reason}",
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
        self.restarts += 1
        self._transition(S.BACKOFF, f"{outcome}: {self.last_exit_reason}; restart in {delay:.3g} s")
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await self._wait_for_request()
            except TimeoutError:
                pass

    def _go_terminal(self, state: Literal[S.EXITED, S.FATAL], why: str) -> None:
        self._wanted = False
        if state == S.FATAL:
            logger.error("%s is FATAL: %s", self.name, why)
        self._transition(state, why)

    async def _watch(self, child: Child) -> None:
        """Returns when the child must be killed: unhealthy, or not healthy by start_timeout."""
        spec = self.spec
        probe = make_probe(spec, reaper=self._reaper)
        if probe is None:
            if spec.start_timeout > 0:
                await asyncio.sleep(spec.start_timeout)
            self._transition(S.RUNNING, f"survived {spec.start_timeout:g} s")
            await asyncio.Future()  # nothing more to watch: wait to be cancelled
        assert probe is not None
        try:
            await self._probe_loop(probe)
        finally:
            await probe.close()

    async def _probe_loop(self, probe: Probe) -> None:
        deadline = self._clock() + self.spec.start_timeout
        delay = _STARTING_POLL_FIRST
        failures = 0
        while True:
            p = self.spec.probe  # re-read each round: a reload may change it
            began = self._clock()
            health = await probe.check()
            self.probe_seconds.observe(self._clock() - began)
            if self.state == S.STARTING:
                if health in (Health.HEALTHY, Health.DEGRADED):
                    self._set_health(health, probe.details)
                    self._transition(S.RUNNING, f"probe says {health}")
                    await self._on_first_healthy(probe)
                elif self._clock() >= deadline:
                    self.probe_failures += 1
                    self.details = (
                        f"not healthy within start_timeout {self.spec.start_timeout:g} s: "
                        f"{probe.last_error or health}"
                    )
                    return
                else:
                    await asyncio.sleep(min(delay, max(0.0, deadline - self._clock())))
                    delay = min(delay * 2, p.interval)
                    continue
            elif health == Health.UNHEALTHY:
                failures += 1
                self.probe_failures += 1
                self._set_health(Health.UNHEALTHY, probe.last_error)
                self.details = f"probe failed {failures}/{p.failure_threshold}: {probe.last_error}"
                self._fire()
                if failures >= p.failure_threshold:
                    return
            else:
                failures = 0
                self._set_health(health, probe.details)
                self.details = probe.details
            # Rounds start every `interval`, however long the check took (a hung child's
            # check takes the whole timeout): detection is interval * threshold + timeout.
            await asyncio.sleep(max(0.0, p.interval - (self._clock() - began)))

    async def _on_first_healthy(self, probe: Probe) -> None:
        hook = getattr(probe, "on_first_healthy", None)
        if hook is not None:
            await hook()

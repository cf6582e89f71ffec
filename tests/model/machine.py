"""The state machine: rules that act on a real daemon, and the checks after every step."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from procs import alive, descendants, in_group, proc_stat

from .harness import (
    BROKEN,
    BROKEN_TEXTS,
    GRACE,
    KILL_BOUND,
    NOBODY,
    PUBMON,
    SHUTDOWN_TIMEOUT,
    STOP_TIMEOUT,
    Answer,
    Loop,
    ModelConfig,
    Notifications,
    Ports,
    PubSpec,
    _rpc,
    catches,
    cli,
    render,
    wait_for,
)
from .model import (
    LOOSE,
    NAMES,
    SKIP,
    Pub,
    apply_ops,
    ops,
    pubspecs,
    restarts_after,
    shutdown_ops,
    started,
    vias,
    who,
)
from .stuckfs import StuckFS


class DaemonModel(RuleBasedStateMachine):
    """The operator's model of one pubmon daemon and its publishers.

    Publishers `a`..`d` run `model_child.py` (prints three lines, listens on its port, exits 0 on
    SIGUSR1 and 3 on SIGUSR2, optionally ignores SIGTERM for a while); `noint` runs a `#!`
    script whose interpreter is missing. Where issue 10 says what must happen, that is the model;
    where it is silent, the model expects what an operator of a production supervisor would:

    - start of a RUNNING publisher is refused (InvalidState); of anything else it ends RUNNING
      (FATAL for `noint` and for a publisher whose probe can never pass: DEAD_CRASH_LOOP).
    - stop ends STOPPED and the answer says STOPPED, also when the child was exiting at that
      very moment. A stop of a STOPPED, EXITED or FATAL publisher may be done or refused with
      InvalidState (both are fair answers); the model reads which and goes on from there.
    - restart ends RUNNING with a new process whatever the state was.
    - an exit by itself or a SIGKILL restarts or not by the restart policy (on-failure: not
      after exit 0); every end of a process counts one `exits`, every automatic restart one
      `restarts`; operator calls count no restart.
    - a reload applies the file: added publishers start, removed ones stop and vanish, a spawn
      change (environment, command) restarts a running publisher and leaves a stopped one
      stopped, a probe change applies to the running process at once without a restart (a
      probe that fails kills it within interval * threshold + timeout), `[control] allow_uids`
      applies to the next call (a uid added can connect, a uid removed is refused), and the
      reload's answer names every publisher whose settings changed as changed.
    - an invalid file is refused (ConfigError over RPC; counted in daemon.reload_failures) and
      the old config keeps running untouched.
    - `tail -n N` prints the last N lines (none for N = 0).
    - SIGUSR1 reopens log files (a log file moved away is created again) and touches nothing.
    - SIGTERM, at any point (also with a reload, stop or restart in flight), ends the daemon
      with status 0 within shutdown_timeout + grace, and leaves no process behind; a call in
      flight is answered (done or refused), or its connection closes as the daemon exits.
    - sd_notify: READY=1 once, only after the first round settled (no autostart publisher still
      in its first STARTING); RELOADING=1 then READY=1 around a reload while running; after
      STOPPING=1 only STATUS= and EXTEND_TIMEOUT_USEC=.
    - every call is answered within the publisher's start_timeout + stop_timeout + GRACE (a
      reload: twice that, the longest over its publishers), never left hanging.
    """

    max_steps_seen: ClassVar[int] = 0
    total_steps: ClassVar[int] = 0  # over every example of this process: "found after N steps"
    first_failure: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix="pubmon-model-"))
        self.work.chmod(0o755)  # `nobody` must reach the control socket
        script = self.work / "noint.sh"
        script.write_text("#!/nonexistent/interpreter\necho unreachable\n")
        script.chmod(0o755)
        self.marks = self.work / "marks"  # see model_child.py
        self.marks.mkdir()
        self.killed: set[int] = set()  # pids the test itself SIGKILLed (or left stuck)
        self.ports = Ports(list(NAMES))
        self.loop = Loop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Any = None
        self.cfg = ModelConfig(publishers=(), broken="broken" not in SKIP)
        self.pubs: dict[str, Pub] = {}
        self.reloads = (0, 0)
        self.reload_failures = (0, 0)
        self.notes: Notifications | None = None
        self.ready_problems: list[str] = []
        self.baseline = descendants(os.getpid())
        self.seen: set[int] = set()  # every publisher pid seen: none may outlive the daemon
        self.steps = 0
        self.boots = 0
        self.stuck_here = 0
        self.stuck_allowed = False

    # --- plumbing --------------------------------------------------------------------------

    @property
    def sock(self) -> Path:
        return self.work / "pubmon.sock"

    @property
    def alive(self) -> bool:
        return self.proc is not None

    def rpc(self, bound: float, method: str, *args: object) -> Answer:
        try:
            answer: Answer = self.loop.run(_rpc(self.sock, bound, method, *args), bound + 5)
        except TimeoutError:
            return Answer("hang", reason=method, seconds=bound + 5)
        return answer

    def call_bound(self, name: str) -> float:
        pub = self.pubs.get(name)
        start = pub.spec.start_timeout if pub and pub.spec else 0.0
        return start + STOP_TIMEOUT + KILL_BOUND + GRACE  # a stuck stop is named past KILL_BOUND

    def reload_bound(self, *cfgs: ModelConfig) -> float:
        start = max((p.start_timeout for c in cfgs for p in c.publishers), default=0.0)
        return 2 * (start + STOP_TIMEOUT) + GRACE

    def write_config(self, cfg: ModelConfig) -> None:
        path = self.work / "pubmon.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render(cfg, self.work, self.ports))
        tmp.replace(path)

    def write_text(self, text: str) -> None:
        tmp = self.work / "pubmon.tmp"
        tmp.write_text(text)
        tmp.replace(self.work / "pubmon.toml")

    def stderr(self) -> str:
        try:
            return (self.work / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""

    def fail(self, what: str) -> None:
        tail = "\n".join(self.stderr().splitlines()[-40:])
        if not DaemonModel.first_failure:  # before shrinking replays it: "found after N steps"
            DaemonModel.first_failure = f"{DaemonModel.total_steps} steps: {what}"
            print(f"model: first failure after {DaemonModel.first_failure}", flush=True)
        raise AssertionError(
            f"step {self.steps} ({DaemonModel.total_steps} in all): {what}\n"
            f"--- daemon log (last lines) ---\n{tail}"
        )

    def note(self, text: str) -> None:
        self.steps += 1
        DaemonModel.total_steps += 1
        if os.environ.get("PUBMON_MODEL_VERBOSE"):
            print(f"model {self.boots}.{self.steps} {time.strftime('%T')}: {text}", flush=True)

    # --- the daemon ------------------------------------------------------------------------

    def boot(self, cfg: ModelConfig, hup_delay: float | None) -> None:
        for path in self.marks.iterdir():  # the last daemon's children were judged at its end
            path.unlink()
        self.cfg = cfg
        self.write_config(cfg)
        self.notes = Notifications(self.work / "notify.sock", on_ready=self._on_ready)
        self.ready_problems = []
        self.loop.run(self.notes.open(), 5)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notes.path), PYTHONDONTWRITEBYTECODE="1")
        self.log = open(self.work / "daemon.log", "ab")  # noqa: SIM115 - closed at its exit
        self.proc = subprocess.Popen(
            [PUBMON, "daemon", "--config", str(self.work / "pubmon.toml")],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            env=env,
        )
        self.boots += 1
        self.reloads = (0, 0)
        self.reload_failures = (0, 0)
        self.pubs = {}
        for spec in cfg.publishers:
            loose = LOOSE if spec.probe == "dead" else 0
            self.pubs[spec.name] = Pub(spec, started(spec), (0, loose), (0, loose))
        if cfg.broken:
            self.pubs[BROKEN] = Pub(None, started(None), (0, 0), (0, 0))
        if hup_delay is not None:
            # A SIGHUP before its handler is installed would kill the daemon: wait for it.
            pid = self.proc.pid
            wait_for(lambda: catches(pid, signal.SIGHUP), "daemon handles SIGHUP", GRACE)
            time.sleep(hup_delay)
            os.kill(pid, signal.SIGHUP)
            # The file did not change; a SIGHUP this early may be applied or not (the model
            # cannot tell whether the daemon was far enough along), so reloads is 0 or 1.
            self.reloads = (0, 1)
        bound = max((p.start_timeout for p in cfg.publishers), default=0) + 2 * GRACE
        wait_for(self.ready_seen, "READY=1 from the daemon", bound)
        self.settle("boot")

    def ready_seen(self) -> bool:
        assert self.notes is not None
        if self.proc is not None and self.proc.poll() is not None:
            self.fail(f"the daemon exited with {self.proc.returncode} while starting")
        return any("READY=1" in m for _, m in self.notes.messages)

    async def _on_ready(self) -> None:
        """At READY=1: no autostart publisher may still be in its first STARTING."""
        if "ready" in SKIP or self.notes is None:
            return
        if sum("READY=1" in m for _, m in self.notes.messages) > 1:
            return  # after a reload; the protocol check judges those
        got = await _rpc(self.sock, GRACE, "listPublishers")
        counters = await _rpc(self.sock, GRACE, "getCounters")
        if got.kind != "ok" or counters.kind != "ok":
            self.ready_problems.append(f"cannot read the publishers at READY=1: {got} {counters}")
            return
        for info in got.value:
            exits = counters.value.get(f"publisher.{info.name}.exits", 0)
            if info.state == "STARTING" and exits == 0:
                self.ready_problems.append(
                    f"READY=1 while {info.name} is still in its first STARTING"
                )

    def check_notify(self, final: bool = False) -> None:
        """The sd_notify protocol, over every message so far."""
        if self.notes is None:
            return
        problems = list(self.ready_problems)
        phase = "booting"
        for _, fields in list(self.notes.messages):
            for f in fields:
                key = f.split("=", 1)[0]
                if phase == "stopped":
                    if key not in ("STATUS", "EXTEND_TIMEOUT_USEC"):
                        problems.append(f"{f} after STOPPING=1")
                elif f == "STOPPING=1":
                    phase = "stopped"
                elif f == "RELOADING=1":
                    phase = "reloading" if phase != "booting" else phase
                elif f == "READY=1":
                    if phase == "running":
                        problems.append("READY=1 twice without a RELOADING=1 between")
                    phase = "running"
        if final and phase != "stopped":
            problems.append(f"the daemon exited without STOPPING=1 (phase {phase})")
        if problems and "ready" not in SKIP:
            self.fail("sd_notify: " + "; ".join(problems))

    # --- settling and the invariants -------------------------------------------------------

    def snapshot(self) -> tuple[list[Any], dict[str, int]]:
        infos = self.rpc(GRACE, "listPublishers")
        counters = self.rpc(GRACE, "getCounters")
        if infos.kind != "ok" or counters.kind != "ok":
            self.fail(f"the daemon does not answer: listPublishers {infos}, getCounters {counters}")
        return list(infos.value), dict(counters.value)

    def problems(self, infos: list[Any], counters: dict[str, int]) -> list[str]:
        """What still differs from the model (empty once settled as the model says)."""
        assert self.proc is not None
        out: list[str] = []
        now = time.monotonic()
        seen = {i.name: i for i in infos}
        if set(seen) != set(self.pubs):
            out.append(f"publishers {sorted(seen)}, the model has {sorted(self.pubs)}")
        for name, pub in self.pubs.items():
            info = seen.get(name)
            if info is None:
                continue
            if info.pid:
                self.seen.add(info.pid)
            if (
                pub.probe_deadline
                and now > pub.probe_deadline
                and info.pid == pub.probe_pid
                and alive(pub.probe_pid)
            ):
                self.fail(
                    f"{name}: its probe was changed to one that fails, yet pid {info.pid} is "
                    f"still {info.state} ({info.health}) {GRACE:g} s after the reload"
                )
            if info.state not in pub.expect:
                out.append(f"{name} is {info.state}, expected {sorted(pub.expect)}")
                continue
            if info.state == "RUNNING":
                # The child itself must be up (its handlers in place): a "slow to stop" child
                # is only slow once it handles SIGTERM, and the next step may stop it.
                if pub.spec is not None and not (self.marks / f"{info.pid}.start").exists():
                    out.append(f"{name} pid {info.pid} has not set up its signal handlers yet")
                if pub.new_pid and info.pid == pub.pid:
                    out.append(f"{name} still runs pid {info.pid}: expected a new process")
                if pub.same_pid and info.pid != pub.pid:
                    self.fail(f"{name}: pid {pub.pid} was replaced by {info.pid}: no restart due")
            for what, (lo, hi) in (("exits", pub.exits), ("restarts", pub.restarts)):
                got = counters.get(f"publisher.{name}.{what}", -1)
                if not lo <= got <= hi:
                    out.append(f"{name}: {what} = {got}, the model says {lo}..{hi}")
            out.extend(self.proc_problems(info))
        for what, (lo, hi) in (
            ("reloads", self.reloads),
            ("reload_failures", self.reload_failures),
        ):
            got = counters.get(f"daemon.{what}", -1)
            if not lo <= got <= hi:
                out.append(f"daemon.{what} = {got}, the model says {lo}..{hi}")
        # No orphan, no zombie: the daemon's descendants are exactly its live publishers.
        live = {i.pid for i in infos if i.state in ("STARTING", "RUNNING", "STOPPING")}
        for pid in descendants(self.proc.pid):
            st = proc_stat(pid)
            if st is None:
                continue
            if st[0] == "Z":
                out.append(f"zombie {pid} under the daemon")
            elif pid not in live and st[2] not in live:
                out.append(f"pid {pid} (group {st[2]}) under the daemon belongs to no publisher")
        return out

    def proc_problems(self, info: Any) -> list[str]:
        assert self.proc is not None
        if info.state in ("STARTING", "RUNNING", "STOPPING"):
            st = proc_stat(info.pid) if info.pid else None
            if st is None or st[0] == "Z":
                return [f"{info.name} is {info.state} but pid {info.pid} is not alive"]
            if st[1] != self.proc.pid or st[2] != info.pid:
                return [f"{info.name} pid {info.pid}: ppid {st[1]} pgid {st[2]}, not ours"]
            return []
        if info.pid:
            return [f"{info.name} is {info.state} with pid {info.pid}"]
        pub = self.pubs[info.name]
        if pub.pid and in_group(pub.pid):
            return [f"{info.name} is {info.state} but group {pub.pid} still has processes"]
        return []

    def settle(self, what: str, bound: float | None = None) -> None:
        """Wait (bounded) until the daemon agrees with the model, then take its state."""
        bound = bound or max((self.call_bound(n) for n in self.pubs), default=GRACE)
        deadline = time.monotonic() + bound
        while True:
            self.check_notify()
            infos, counters = self.snapshot()
            got = self.problems(infos, counters)
            if not got:
                break
            if time.monotonic() > deadline:
                self.fail(f"after {what}, not settled within {bound:g} s: " + "; ".join(got))
            time.sleep(0.05)
        for info in infos:
            pub = self.pubs[info.name]
            pub.state, pub.pid = info.state, info.pid
            pub.expect = frozenset({info.state})
            pub.new_pid = pub.same_pid = False
            c = counters
            e, r = c[f"publisher.{info.name}.exits"], c[f"publisher.{info.name}.restarts"]
            pub.exits, pub.restarts = (e, e), (r, r)
            if info.state != "RUNNING" or info.pid != pub.probe_pid:
                pub.probe_deadline, pub.probe_pid = 0.0, 0
        self.reloads = (counters["daemon.reloads"],) * 2
        self.reload_failures = (counters["daemon.reload_failures"],) * 2

    def shutdown(self, bound: float, stuck: int = 0, mark: int = 0) -> None:
        """The daemon was sent SIGTERM: it must exit 0 in time and leave nothing behind; with a
        `stuck` child (one that SIGKILL cannot end), exit non-zero in time, naming it."""
        assert self.proc is not None
        proc, self.proc = self.proc, None
        try:
            code = proc.wait(bound)
        except subprocess.TimeoutExpired:
            self.proc = proc  # teardown kills it
            self.fail(f"the daemon did not exit within {bound:g} s of SIGTERM")
        self.log.close()
        log = self.stderr()
        if stuck:
            if code == 0 or str(stuck) not in log[mark:]:
                self.fail(f"with pid {stuck} stuck, the daemon exited {code} and did not name it")
            return
        if code != 0:
            self.fail(f"the daemon exited with {code} after SIGTERM")
        tracebacks = log.count("Traceback")
        if "refusal" in SKIP:  # the known one: InvalidState that reloadConfig does not declare
            tracebacks -= log.count("pubmon_thrift.InvalidState: ")
        if tracebacks > 0 or "never awaited" in log:
            self.fail("the daemon's log has a traceback or a coroutine never awaited")
        self.after_exit()

    def after_exit(self) -> None:
        # What the daemon started must be gone once it exited (it is re-parented to us if not).
        left: set[int] = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            left = {p for p in descendants(os.getpid()) - self.baseline if alive(p)}
            left |= {p for p in self.seen if alive(p)}
            if not left:
                break
            time.sleep(0.02)
        if left:
            self.fail(f"processes left behind by the daemon: {sorted(left)}")
        self.check_ordered_stops()
        self.check_notify(final=True)
        self.pubs = {}
        self.close_notify()

    def check_ordered_stops(self) -> None:
        """Every child that ended was told to exit, SIGKILLed by the test, or sent its stop
        signal by the daemon first: the daemon never just SIGKILLs (a publisher added by a
        reload racing the shutdown must get the ordered stop too)."""
        names = {p.name for p in self.marks.iterdir()}
        for entry in sorted(names):
            pid, _, what = entry.partition(".")
            if what != "start" or int(pid) in self.killed:
                continue
            if f"{pid}.term" not in names and f"{pid}.exit" not in names:
                self.fail(f"pid {pid} ended without its stop signal (SIGKILLed without one)")

    def close_notify(self) -> None:
        if self.notes is not None:
            self.loop.run(self.notes.close(), 5)
            self.notes = None

    # --- rules -----------------------------------------------------------------------------

    @initialize(
        first=st.lists(pubspecs(), min_size=1, max_size=3, unique_by=lambda p: p.name),
        nobody=st.booleans(),
        stuck=st.integers(0, 1),
    )
    def start_daemon(self, first: list[PubSpec], nobody: bool, stuck: int) -> None:
        self.stuck_allowed = stuck == 0  # one example in two may have a stuck child
        cfg = apply_ops(replace(self.cfg, allow_nobody=nobody), [("add", p) for p in first])
        self.note("boot")
        self.boot(cfg, None)

    @precondition(lambda self: not self.alive)
    @rule(hup=st.sampled_from([None, None, 0.1, 0.3]))
    def boot_again(self, hup: float | None) -> None:
        """A new daemon on the last good config; maybe a SIGHUP during its first round."""
        self.note("boot" + (f" with SIGHUP after {hup} s" if hup is not None else ""))
        self.boot(self.cfg, hup)

    @precondition(lambda self: self.alive)
    @rule(
        who=who,
        action=st.sampled_from(["start", "stop", "restart"]),
        via=vias,
    )
    def operator(self, who: int, action: str, via: str) -> None:
        name = self.known(who)
        self.note(f"{action} {name} via {via}")
        pub = self.pubs.get(name)
        bound = self.call_bound(name)
        method = {"start": "startPublisher", "stop": "stopPublisher"}
        answer = self.request(via, bound, action, method.get(action, "restartPublisher"), name)
        answer = self.as_operator_expects(via, action, answer)
        if answer.kind == "hang" or answer.kind not in ("ok", "refused"):
            self.fail(f"{action} {name} via {via}: {answer} (bound {bound:g} s)")
        if pub is None:
            if "UnknownPublisher" not in answer.reason:
                self.fail(f"{action} of unknown {name}: {answer}")
            return
        was = pub.state
        if answer.kind == "refused":
            # Refusals the model accepts: start of a RUNNING one; stop of one already down.
            fair = (action == "start" and was == "RUNNING") or (
                action == "stop" and was in ("STOPPED", "EXITED", "FATAL")
            )
            if not fair or "InvalidState" not in answer.reason:
                self.fail(f"{action} {name} ({was}) via {via} refused: {answer}")
            self.settle(f"refused {action} {name}")
            return
        if action == "start" and was == "RUNNING":
            self.fail(f"start of RUNNING {name} via {via} was not refused: {answer}")
        if action == "stop":
            got = self.answered_state(via, answer)
            if got != "STOPPED":
                self.fail(f"stop {name} ({was}) via {via} answered {got}: {answer}")
            pub.expect = frozenset({"STOPPED"})
            if was == "RUNNING":
                pub.bump(exits=(1, 1))
        else:
            pub.expect = started(pub.spec)
            if was == "RUNNING":
                pub.bump(exits=(1, 1))
                pub.new_pid = True
            if pub.spec is not None and pub.spec.probe == "dead":
                pub.bump(exits=(0, LOOSE), restarts=(0, LOOSE))
        self.settle(f"{action} {name}")

    @staticmethod
    def as_operator_expects(via: str, action: str, answer: Answer) -> Answer:
        """The CLI speaks systemctl's habits: a start or stop with nothing to do is exit 0
        "already RUNNING/STOPPED" (the daemon's InvalidState, which RPC sees), and a start or
        restart that ended in a failure state is exit 1 naming it (the request was answered)."""
        if via != "cli" or answer.kind not in ("ok", "error"):
            return answer
        code, out, err = answer.value
        if answer.kind == "ok" and "already " in out + err:
            return Answer("refused", answer.value, reason="InvalidState", seconds=answer.seconds)
        failed = re.search(r": (FATAL|BACKOFF|EXITED)\b", out + err)
        if answer.kind == "error" and action != "stop" and code == 1 and failed:
            state = f"{out}{err}".strip().splitlines()[-1]
            return Answer("ok", (0, state, ""), seconds=answer.seconds)
        return answer

    def request(self, via: str, bound: float, action: str, method: str, name: str) -> Answer:
        if via == "rpc":
            return self.rpc(bound, method, name)
        return cli(self.sock, bound, action, name)

    @staticmethod
    def answered_state(via: str, answer: Answer) -> str:
        if via == "rpc":
            return str(answer.value.state)
        out = answer.value[1].strip()  # "name: STATE pid N (details)"
        return out.split(": ", 1)[1].split()[0] if ": " in out else out

    def known(self, who: int) -> str:
        """Mostly a publisher of the running config; now and then any name (maybe unknown)."""
        present = sorted(self.pubs)
        if who < 13 and present:
            return present[who % len(present)]
        return (*NAMES, BROKEN)[who % 5]

    def running_one(self, who: int) -> tuple[str, Pub | None]:
        """One of the RUNNING publishers (child programs), or None if there is none."""
        up = [n for n in sorted(self.pubs) if self.running(n)]
        if not up:
            return "", None
        return up[who % len(up)], self.running(up[who % len(up)])

    def running(self, name: str) -> Pub | None:
        pub = self.pubs.get(name)
        if pub is None or pub.spec is None or pub.state != "RUNNING" or not pub.pid:
            return None
        return pub

    def wait_commandable(self, pub: Pub) -> None:
        pid = pub.pid
        wait_for(
            lambda: catches(pid, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH) or not alive(pid),
            f"pid {pid} ready for commands",
            GRACE,
        )

    @precondition(lambda self: self.alive)
    @rule(who=who)
    def kill_child(self, who: int) -> None:
        """SIGKILL a running child: a failure, so it restarts unless restart = never."""
        name, pub = self.running_one(who)
        if pub is None:
            return
        assert pub.spec is not None
        self.note(f"SIGKILL {name}")
        self.killed.add(pub.pid)
        os.kill(pub.pid, signal.SIGKILL)
        self.after_own_exit(pub, pub.spec.restart != "never")
        self.settle(f"SIGKILL of {name}")

    def after_own_exit(self, pub: Pub, restart: bool) -> None:
        assert pub.spec is not None
        pub.bump(exits=(1, 1))
        if restart:
            pub.bump(restarts=(1, 1))
            pub.expect = started(pub.spec)
            pub.new_pid = True
        else:
            pub.expect = frozenset({"EXITED"})
        if pub.spec.probe == "dead":
            pub.bump(exits=(0, LOOSE), restarts=(0, LOOSE))

    @precondition(lambda self: self.alive)
    @rule(who=who, code=st.sampled_from([0, 3]))
    def child_exits(self, who: int, code: int) -> None:
        """A running child exits by itself with status 0 or 3."""
        name, pub = self.running_one(who)
        if pub is None:
            return
        assert pub.spec is not None
        self.note(f"{name} exits {code}")
        self.wait_commandable(pub)
        os.kill(pub.pid, signal.SIGUSR1 if code == 0 else signal.SIGUSR2)
        self.after_own_exit(pub, restarts_after(pub.spec, code))
        self.settle(f"{name} exiting with {code}")

    @precondition(lambda self: self.alive and "race" not in SKIP)
    @rule(who=who, code=st.sampled_from([0, 3]), delay=st.sampled_from([0, 0.0005, 0.002]))
    def stop_while_exiting(self, who: int, code: int, delay: float) -> None:
        """A child exits and the operator's stop arrives as the daemon learns of it: the stop
        must still end STOPPED, answered at once, and nothing may restart it."""
        name, pub = self.running_one(who)
        if pub is None:
            return
        assert pub.spec is not None
        self.note(f"{name} exits {code} racing a stop")
        self.wait_commandable(pub)
        pid = pub.pid
        bound = self.call_bound(name)
        os.kill(pid, signal.SIGUSR1 if code == 0 else signal.SIGUSR2)
        wait_for(lambda: not alive(pid), f"pid {pid} exiting", GRACE, 0)
        if delay:
            time.sleep(delay)
        answer = self.rpc(bound, "stopPublisher", name)
        if answer.kind != "ok" or answer.value.state != "STOPPED":
            self.fail(f"stop of {name} racing its exit {code}: {answer} (bound {bound:g} s)")
        # Whether the daemon saw the exit before the stop is a real race: if it did, a policy
        # that restarts may have entered BACKOFF (one restart counted) and even spawned again
        # (that process then counts one more exit); both are legitimate.
        again = restarts_after(pub.spec, code)
        pub.bump(exits=(1, 2 if again else 1), restarts=(0, 1 if again else 0))
        pub.expect = frozenset({"STOPPED"})
        self.settle(f"stop racing the exit of {name}")

    @precondition(lambda self: self.alive)
    @rule(todo=st.lists(ops, max_size=3), via=st.sampled_from(["sighup", "rpc"]))
    def reload(self, todo: list[tuple[Any, ...]], via: str) -> None:
        new = apply_ops(self.cfg, todo)
        self.note(f"reload via {via}: {todo}")
        bound = self.reload_bound(self.cfg, new)
        self.write_config(new)
        if via == "rpc":
            answer = self.rpc(bound, "reloadConfig")
            if answer.kind != "ok":
                self.fail(f"reloadConfig: {answer} (bound {bound:g} s)")
            self.check_reload_answer(new, answer.value)
        else:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGHUP)
            want = self.reloads[0] + 1
            wait_for(lambda: self.counter("daemon.reloads") >= want, "SIGHUP reload", bound)
        self.reloads = (self.reloads[0] + 1, self.reloads[1] + 1)
        self.apply_reload(new)
        self.settle(f"reload {todo}")

    def counter(self, key: str) -> int:
        got = self.rpc(GRACE, "getCounters")
        if got.kind != "ok":
            self.fail(f"getCounters: {got}")
        return int(got.value.get(key, 0))

    def check_reload_answer(self, new: ModelConfig, result: Any) -> None:
        old = {p.name: p for p in self.cfg.publishers}
        now = {p.name: p for p in new.publishers}
        added = sorted(set(now) - set(old))
        removed = sorted(set(old) - set(now))
        changed = sorted(n for n in set(now) & set(old) if now[n].settings() != old[n].settings())
        if sorted(result.added) != added or sorted(result.removed) != removed:
            self.fail(f"reloadConfig answered {result}; the model added {added}, removed {removed}")
        if result.publishers is None or "answer" in SKIP:
            return
        said = {c.name: c.change for c in result.publishers}
        # The IDL: `changed` lists the restarted ones; `publishers` says what became of each.
        restarted = sorted(n for n, change in said.items() if change == "restarted")
        if sorted(result.changed) != restarted and "changed-list" not in SKIP:
            self.fail(f"reloadConfig's changed is not its restarted publishers: {result}")
        for name in sorted(set(now) | set(old)):
            want = {"added"} if name in added else {"removed"} if name in removed else None
            if want is None:
                want = {"restarted", "updated"} if name in changed else {"unchanged"}
            if said.get(name) not in want:
                self.fail(f"reloadConfig calls {name} {said.get(name)}, not {want}: {result}")

    def apply_reload(self, new: ModelConfig) -> None:
        old = {p.name: p for p in self.cfg.publishers}
        self.cfg = new
        for name in list(old):
            if new.get(name) is None:
                del self.pubs[name]  # its pid stays in self.seen: it must be gone
        for spec in new.publishers:
            pub = self.pubs.get(spec.name)
            if pub is None:
                loose = LOOSE if spec.probe == "dead" else 0
                self.pubs[spec.name] = Pub(spec, started(spec), (0, loose), (0, loose))
                continue
            was = old[spec.name]
            pub.spec = spec
            running = pub.state == "RUNNING"
            if spec.spawn_key() != was.spawn_key() and running:
                pub.bump(exits=(1, 1))
                pub.new_pid = True
                pub.expect = started(spec)
            elif spec.probe != was.probe and running:
                if spec.probe == "dead":
                    pub.probe_deadline = time.monotonic() + 2 * 0.3 + 0.3 + GRACE
                    pub.probe_pid = pub.pid
                else:
                    pub.same_pid = True
            if spec.probe == "dead" and running:
                pub.expect = started(spec)
                pub.bump(exits=(0, LOOSE), restarts=(0, LOOSE))

    @precondition(lambda self: self.alive)
    @rule(text=st.sampled_from(BROKEN_TEXTS), via=st.sampled_from(["sighup", "rpc"]))
    def broken_reload(self, text: str, via: str) -> None:
        """An invalid file: refused, counted, and the old config keeps running untouched."""
        self.note(f"broken reload via {via}")
        self.write_text(text)
        bound = self.reload_bound(self.cfg)
        if via == "rpc":
            answer = self.rpc(bound, "reloadConfig")
            if answer.kind != "refused" or "ConfigError" not in answer.reason:
                self.fail(f"reloadConfig of an invalid file: {answer}")
        else:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGHUP)
            want = self.reload_failures[0] + 1
            wait_for(lambda: self.counter("daemon.reload_failures") >= want, "failed reload", bound)
        self.reload_failures = (self.reload_failures[0] + 1, self.reload_failures[1] + 1)
        for pub in self.pubs.values():
            if pub.state == "RUNNING":
                pub.same_pid = True
        self.settle("a broken reload")
        self.write_config(self.cfg)  # the file again says what runs

    @precondition(lambda self: self.alive)
    @rule(who=who)
    def sigusr1(self, who: int) -> None:
        """SIGUSR1 reopens the log files: one moved away is created again; nothing else moves."""
        assert self.proc is not None
        name = self.known(who)
        self.note("SIGUSR1")
        log = self.work / "logs" / f"{name}.log"
        moved = False
        if name in self.pubs and log.exists():
            log.rename(log.with_suffix(".moved"))
            moved = True
        os.kill(self.proc.pid, signal.SIGUSR1)
        if moved:
            wait_for(log.exists, f"{log} reopened after SIGUSR1", GRACE)
        for pub in self.pubs.values():
            if pub.state == "RUNNING":
                pub.same_pid = True
        self.settle("SIGUSR1")

    @precondition(lambda self: self.alive)
    @rule(who=who, n=st.sampled_from([0, 1, 2, 5]))
    def tail(self, who: int, n: int) -> None:
        """`pubmon tail NAME -n N` prints the last N lines: none for 0."""
        name = self.known(who)
        if "tail0" in SKIP and n == 0:
            return
        self.note(f"tail {name} -n {n}")
        before = self.counter(f"publisher.{name}.log_lines")
        answer = cli(self.sock, GRACE, "tail", name, "-n", str(n))
        if name not in self.pubs:
            if "UnknownPublisher" not in answer.reason:
                self.fail(f"tail of unknown {name}: {answer}")
            return
        if answer.kind != "ok":
            self.fail(f"tail {name} -n {n}: {answer}")
        lines = answer.value[1].splitlines()
        if not min(n, before) <= len(lines) <= n:
            self.fail(f"tail {name} -n {n} printed {len(lines)} lines ({before} logged)")

    @precondition(lambda self: self.alive and "uids" not in SKIP)
    @rule()
    def status_as_nobody(self) -> None:
        """uid 65534 may use the control socket exactly while allow_uids lists it."""
        self.note("status as nobody")
        answer = cli(self.sock, GRACE, "status", user=NOBODY)
        if self.cfg.allow_nobody and answer.kind != "ok":
            self.fail(f"nobody is in allow_uids, yet `pubmon status` got {answer}")
        if not self.cfg.allow_nobody and answer.kind == "ok":
            self.fail("nobody is not in allow_uids, yet `pubmon status` worked")
        if answer.kind == "hang":
            self.fail(f"status as nobody: {answer}")

    @precondition(lambda self: self.alive)
    @rule(
        inflight=st.sampled_from(["none", "stop", "restart"]),
        who=who,
        delay=st.sampled_from([0, 0.1, 0.5]),
    )
    def sigterm(self, inflight: str, who: int, delay: float) -> None:
        """SIGTERM, maybe while a stop or a restart is in flight."""
        name = self.known(who)
        if "inflight" in SKIP:
            inflight = "none"
        self.note(f"SIGTERM with {inflight} {name} in flight")
        bound = self.reload_bound(self.cfg) + SHUTDOWN_TIMEOUT
        pending = None
        if inflight in ("stop", "restart") and name in self.pubs:
            method = "stopPublisher" if inflight == "stop" else "restartPublisher"
            pending = self.loop.submit(_rpc(self.sock, bound, method, name))
        self.terminate(pending, delay, bound, inflight)

    @precondition(lambda self: self.alive and "inflight" not in SKIP)
    @rule(
        todo=st.lists(shutdown_ops, min_size=1, max_size=3),
        delay=st.sampled_from([0, 0.1, 0.5]),
        via=st.sampled_from(["sighup", "rpc"]),
    )
    def sigterm_during_reload(self, todo: list[tuple[Any, ...]], delay: float, via: str) -> None:
        """SIGTERM while a reload (by SIGHUP or RPC) stops and starts publishers."""
        assert self.proc is not None
        self.note(f"SIGTERM {delay} s after a reload via {via}: {todo}")
        bound = self.reload_bound(self.cfg) + SHUTDOWN_TIMEOUT
        new = apply_ops(self.cfg, todo)
        self.write_config(new)
        self.cfg = new  # what the next daemon starts with, whether this reload ran or not
        pending = None
        if via == "sighup":
            os.kill(self.proc.pid, signal.SIGHUP)
        else:
            pending = self.loop.submit(_rpc(self.sock, bound, "reloadConfig"))
        began = time.time()
        added = {p.name for p in new.publishers} - set(self.pubs)
        answer = self.terminate(pending, delay, bound, "reload")
        if answer is not None and answer.kind == "refused" and "refused-start" not in SKIP:
            # Refused means not done: none of the publishers it would add may have started.
            for path in self.marks.glob("*.start"):
                if path.read_text() in added and path.stat().st_mtime >= began:
                    self.fail(
                        f"the reload was refused ({answer}), yet it started {path.read_text()}"
                    )

    def terminate(self, pending: Any, delay: float, bound: float, what: str) -> Answer | None:
        assert self.proc is not None
        if delay:
            time.sleep(delay)
        os.kill(self.proc.pid, signal.SIGTERM)
        self.shutdown(SHUTDOWN_TIMEOUT + STOP_TIMEOUT + GRACE)
        if pending is not None:
            answer: Answer = pending.result(bound + 5)
            # Done, refused (InvalidState: the daemon is stopping), or the connection closed
            # as the daemon exited: all answers; a hang is not.
            # (with PUBMON_MODEL_SKIP=refusal, the internal error of the known undeclared
            # InvalidState: the daemon's log, checked above, shows it was that one)
            known = "refusal" in SKIP and answer.kind == "error"
            if answer.kind not in ("ok", "refused", "closed") and not known:
                self.fail(f"{what} in flight at SIGTERM: {answer}")
            if answer.kind == "refused" and "InvalidState" not in answer.reason:
                self.fail(f"{what} in flight at SIGTERM refused for another reason: {answer}")
            return answer
        return None

    @precondition(lambda self: self.alive and self.stuck_budget() and "stuck" not in SKIP)
    @rule(who=who, how=st.sampled_from(["stop", "sigterm"]))
    def stuck_child(self, who: int, how: str) -> None:
        """A child stuck in the kernel (hung storage) that SIGKILL cannot end: a stop of it,
        or the daemon's shutdown, must still end within its bound and say what is left."""
        name, pub = self.running_one(who)
        if pub is None:
            return
        assert self.proc is not None
        self.note(f"{name} stuck in the kernel, then {how}")
        self.stuck_here += 1
        self.wait_commandable(pub)
        pid = pub.pid
        self.killed.add(pid)  # its SIGTERM handler cannot run while it is stuck
        with StuckFS(self.work / "stuck") as fs:
            os.kill(pid, signal.SIGWINCH)
            fs.wait_stuck(GRACE)
            if how == "stop":
                bound = STOP_TIMEOUT + KILL_BOUND + GRACE
                answer = self.rpc(bound, "stopPublisher", name)
                if answer.kind != "ok":
                    self.fail(f"stop of {name} stuck in the kernel: {answer} (bound {bound:g} s)")
                info = answer.value
                named = str(pid) in info.statusDetails or "stuck-answer" in SKIP
                if info.state != "STOPPING" or not named:
                    self.fail(
                        f"stop of {name} stuck in the kernel answered {info}: expected "
                        f"STOPPING with details naming pid {pid}"
                    )
            else:
                mark = len(self.stderr())
                os.kill(self.proc.pid, signal.SIGTERM)
                bound = SHUTDOWN_TIMEOUT + STOP_TIMEOUT + KILL_BOUND + GRACE
                self.shutdown(bound, stuck=pid, mark=mark)
        # The file system is gone: the lookup failed and the pending SIGKILL took the child.
        if how == "stop":
            pub.expect = frozenset({"STOPPED"})
            pub.bump(exits=(1, 1))
            self.settle(f"the end of stuck {name}")
        else:
            self.after_exit()

    def stuck_budget(self) -> bool:
        # A stuck child costs KILL_BOUND s or more: at most once, in the examples whose first
        # draw allowed it (a precondition may depend only on the example's own steps, or
        # Hypothesis cannot replay it).
        return self.stuck_allowed and self.stuck_here == 0

    # --- after every step and at the end ---------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.shutdown(SHUTDOWN_TIMEOUT + STOP_TIMEOUT + GRACE)
        finally:
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
            for pid in descendants(os.getpid()) - self.baseline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.log is not None:
                self.log.close()
            self.loop.close()
            self.ports.close()
            DaemonModel.max_steps_seen = max(DaemonModel.max_steps_seen, self.steps)
            shutil.rmtree(self.work, ignore_errors=True)

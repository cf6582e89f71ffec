"""The chaos driver: faults, operator actions, reloads, status bursts and log followers.

Each lane draws from its own `random.Random(f"{seed}/{lane}")`, so a seed replays the same plan
(which publisher, which fault, which parameters, when); what a pick finds depends on timing, and
a pick whose target is not in the state it needs is skipped and counted.

Every action holds its publisher (`Pub.busy`) from the pick until its consequence is seen (the
daemon reports the new state) or a deadline passes (a problem), so the driver's count of what
it did is exact and can be compared with the daemon's counters at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from chaos_model import FAULTABLE, LINE_KINDS, Env, Pub, render_config, write_config

from pubmon.errors import RpcError
from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient

_HEAD = re.compile(r"C (\d+\.\d+) ([oe]) (\d+) ")
_READY_BIT = 1 << (signal.SIGUSR2 - 1)  # in SigIgn: the chaos child takes commands
SETTLE = 30.0  # seconds an action may take to show its consequence
# A status call on the TCP listener: its peer (127.0.0.1, every burst's client) is rate-limited
# to 0.1 s of handler time a second, and a burst of 30 clients on a loaded host, or one that
# meets an upgrade's pause and reconnects, waits for its turn well beyond 10 s.
STATUS_TIMEOUT = 30.0
UPGRADING = "pubmon is upgrading"  # answers cut short by an upgrade (pubmon.daemon.upgrade)
RETRY = f"{UPGRADING}: retry"  # ... refused: nothing was done


def _svc() -> Any:
    return idl.pubmon().PubmonService


class Driver:
    def __init__(
        self,
        env: Env,
        seed: int,
        pubs: list[Pub],
        daemon_pid: int,
        *,
        demo_ports: list[int],
        scale: float = 1.0,
    ) -> None:
        self.env = env
        self.seed = seed
        self.pubs: dict[str, Pub] = {p.name: p for p in pubs}  # in the config now, file order
        # Every name that ever was configured, for the log checks.
        self.ever: set[str] = {p.name for p in pubs if p.kind in LINE_KINDS}
        self.ever_demo: set[str] = {p.name for p in pubs if p.kind == "demo"}
        self.daemon_pid = daemon_pid
        self.demo_ports = demo_ports
        self.scale = scale  # rates multiplier
        self.stats: Counter[str] = Counter()
        self.problems: list[str] = []
        self.reloads = 0
        self.reload_failures = 0
        self.last_exits: Counter[tuple[str, int]] = Counter()  # (fault, lastExit) seen
        self.retired: Counter[str] = Counter()  # restarts and exits of removed publishers
        self.status_max_latency = 0.0
        self._added = 0
        self._removed_line_pubs: list[str] = []
        self._tg: asyncio.TaskGroup | None = None
        self._rng = {
            lane: random.Random(f"{seed}/{lane}")
            for lane in ("faults", "ops", "reloads", "status", "upgrades")
        }
        self._followers_done = asyncio.Event()
        # Upgrades: the config file must be what runs when one is asked for (else refused), so
        # a reload holds this from writing the file until the daemon applied it.
        self._config_lock = asyncio.Lock()
        self.upgrades = 0  # accepted and counted by the new image
        self.upgrading = 0  # upgrades under way now
        self.upgrades_begun = 0  # a connection made before one began may be closed by it
        self.reloading = 0  # reloads under way (for "upgrade during a reload")
        self.last_burst = 0.0  # loop time of the last burst or spew fault (a flood)

    # --- helpers --------------------------------------------------------------------------------

    def problem(self, text: str) -> None:
        self.problems.append(text)

    @asynccontextmanager
    async def client(self, timeout: float = 60) -> AsyncIterator[Any]:
        """A connection to the control socket of its own (calls on one connection queue),
        which survives upgrades (see `Conn`)."""
        conn = Conn(self, lambda: ThriftClient.connect(
            _svc(), unix_socket=str(self.env.socket), timeout=timeout
        ))  # fmt: skip
        try:
            yield conn
        finally:
            await conn.close()

    def retriable(self, exc: Exception, since: int) -> bool:
        """A call an upgrade refused ("pubmon is upgrading: retry": nothing was done), or one
        on a connection made before an upgrade began (`since`: `upgrades_begun` then) that
        the exec closed (its call had not been taken: calls taken are answered before the
        exec): make it again. Any other dropped connection is a failure."""
        text = getattr(exc, "message", None) or str(exc)
        if RETRY in text:
            self.stats["upgrade.refused_calls"] += 1
            return True
        upgraded = since < self.upgrades_begun
        if isinstance(exc, RpcError) and upgraded and "no reply within" not in text:
            self.stats["upgrade.dropped_calls"] += 1
            return True
        return False

    def _spawn(self, coro: Any) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)

    def _idle(self, kinds: Iterable[str] | None = None) -> list[Pub]:
        allowed = set(kinds) if kinds is not None else None
        return [
            p for p in self.pubs.values() if not p.busy and (allowed is None or p.kind in allowed)
        ]

    async def _wait(
        self, c: Any, name: str, ok: Callable[[Any], bool], what: str, timeout: float = SETTLE
    ) -> Any:
        info = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        upgrades = self.upgrades_begun
        try:
            while True:
                info = await c.call("getPublisher", name)
                if ok(info):
                    return info
                if self.upgrades_begun != upgrades:  # it held spawns back: one more `timeout`
                    upgrades = self.upgrades_begun
                    deadline = max(deadline, loop.time() + timeout)
                if loop.time() >= deadline:
                    raise TimeoutError
                await asyncio.sleep(0.05)
        except TimeoutError:
            seen = f"{info.state} pid {info.pid} restarts {info.restarts}" if info else "nothing"
            why = f" ({info.statusDetails}; last exit: {info.lastExitReason})" if info else ""
            self.problem(f"{name}: {what} not seen within {timeout:g} s; saw {seen}{why}")
            return info

    def _open_pidfd(self, pid: int, name: str) -> int | None:
        """A pidfd for `pid` if it still is `name`'s child of our daemon (not a recycled pid)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            os.close(fd)
            return None
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid != self.daemon_pid or f"PUBMON_PUBLISHER={name}".encode() not in env:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _takes_commands(pid: int) -> bool:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & _READY_BIT)
        except OSError:
            pass
        return False

    def _command(self, pub: Pub, pid: int, text: str) -> None:
        folder = self.env.state / pub.name
        tmp = folder / f"{pid}.cmd.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / f"{pid}.cmd")

    # --- phases ---------------------------------------------------------------------------------

    async def run_phase(self, seconds: float) -> None:
        """Run every lane for `seconds`; return once the actions they started are all done."""
        until = asyncio.get_running_loop().time() + seconds
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._lane(until, 6.0, self._rng["faults"], self._pick_fault))
            tg.create_task(self._lane(until, 2.0, self._rng["ops"], self._pick_op))
            tg.create_task(self._reload_lane(until))
            tg.create_task(self._status_lane(until))
            tg.create_task(self._upgrade_lane(until))
        self._tg = None

    async def _lane(
        self, until: float, rate: float, rng: random.Random, pick: Callable[[], None]
    ) -> None:
        while await _pace(until, rng.expovariate(rate * self.scale)):
            pick()

    async def settle(self, timeout: float = SETTLE) -> float:
        """Wait until every publisher is in the state the driver expects; report those that are
        not by the deadline. Returns the seconds it took."""
        infos: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            async with self.client() as c, asyncio.timeout(timeout):
                while True:
                    infos = {i.name: i for i in await c.call("listPublishers")}
                    if not self._mismatches(infos):
                        break
                    await asyncio.sleep(0.1)
        except TimeoutError:
            for text in self._mismatches(infos):
                self.problem(f"final state: {text}")
        return loop.time() - t0

    def _mismatches(self, infos: dict[str, Any]) -> list[str]:
        out = []
        for name in sorted(set(infos) - set(self.pubs)):
            out.append(f"{name} is configured but the driver removed it")
        for name, pub in self.pubs.items():
            info = infos.get(name)
            if info is None:
                out.append(f"{name} is missing")
            elif info.state != pub.expect or (pub.expect == "RUNNING" and not info.pid):
                out.append(
                    f"{name} ({pub.kind}) is {info.state}, expected {pub.expect} "
                    f"({info.statusDetails}; last exit: {info.lastExitReason}; faults {pub.faults})"
                )
        return out

    # --- faults ---------------------------------------------------------------------------------

    _LINE_FAULTS = (("kill", 3), ("segv", 2), ("exit", 2), ("fork", 2), ("burst", 3))
    _DEMO_FAULTS = (("kill", 2), ("segv", 1), ("stop", 3), ("exit", 1), ("hang", 1), ("spew", 1))

    def _pick_fault(self) -> None:
        rng = self._rng["faults"]
        idle = [p for p in self._idle(FAULTABLE) if p.expect == "RUNNING"]
        if not idle:
            self.stats["skipped.fault"] += 1
            return
        pub = rng.choice(idle)
        table = self._DEMO_FAULTS if pub.kind == "demo" else self._LINE_FAULTS
        kind = rng.choices([k for k, _ in table], [w for _, w in table])[0]
        params: dict[str, Any] = {}
        if kind == "exit":
            if pub.kind == "demo":
                params["crash"] = rng.choice(["3", "SEGV", "ABRT"])
            else:
                params["code"] = rng.choice([0, 1, 2, 3, 42, 127, 255, rng.randint(0, 255)])
        elif kind == "fork":
            params["code"] = rng.choice([0, 1, 7])
            specs = []
            for _ in range(rng.randint(1, 3)):
                flags = rng.choice(["", "", "q", "s", "sq"])
                seconds = rng.choice(["0.2", "1", "3", "30"])
                if "s" in flags and rng.random() < 0.1:
                    seconds = "3600"  # an escaped grandchild only the final sweep can end
                specs.append(f"{seconds}:{flags}" if flags else seconds)
            params["specs"] = specs
        elif kind == "burst":
            params["short"] = rng.randint(100, 3000)
            params["long"] = rng.randint(0, 3)
            params["long_len"] = rng.choice([20_000, 70_000, 200_000])
            params["bad"] = rng.randint(0, 20)
        elif kind == "spew":
            params["count"] = rng.randint(1000, 20000)
        self._busy(pub, f"fault {kind}", lambda c: self._fault_on(c, pub, kind, params))

    def _busy(self, pub: Pub, what: str, act: Callable[[Any], Awaitable[None]]) -> None:
        """Run `act(control client)` in the background with `pub` marked busy meanwhile."""
        pub.busy = True
        pub.actions += 1

        async def run() -> None:
            try:
                async with self.client() as c:
                    await act(c)
            except RpcError as exc:
                self.problem(f"{pub.name}: {what}: control call failed: {exc}")
            finally:
                pub.busy = False

        self._spawn(run())

    async def _fault_on(self, c: Any, pub: Pub, kind: str, params: dict[str, Any]) -> None:
        info = await c.call("getPublisher", pub.name)
        pid = info.pid
        if info.state != "RUNNING" or not pid:
            gone = " with its process gone" if info.state == "RUNNING" else ""
            self.problem(f"{pub.name}: idle and expected RUNNING, but {info.state}{gone}")
            return
        commanded = pub.kind in LINE_KINDS and kind in ("exit", "fork", "burst")
        if commanded and not self._takes_commands(pid):
            self.stats["skipped.fault"] += 1  # still starting: it cannot take commands yet
            return
        fd = self._open_pidfd(pid, pub.name)
        if fd is None:
            self.problem(f"{pub.name}: RUNNING pid {pid} is not its child")
            return
        code: int | None = None  # the exit status the fault causes, when it is known
        try:
            if kind in ("kill", "segv", "stop"):
                sig = {"kill": signal.SIGKILL, "segv": signal.SIGSEGV, "stop": signal.SIGSTOP}
                signal.pidfd_send_signal(fd, sig[kind])
                code = {"kill": -9, "segv": -11}.get(kind)
            elif pub.kind == "demo":
                await self._demo_option(pub, kind, params)
                if kind == "exit":
                    code = {"3": 3, "SEGV": -11, "ABRT": -6}[params["crash"]]
            else:
                if kind == "exit":
                    code = params["code"]
                    text = f"exit {code}"
                elif kind == "fork":
                    code = params["code"]
                    text = f"fork {code} " + " ".join(params["specs"])
                else:
                    text = "burst {short} {long} {long_len} {bad}".format(**params)
                self._command(pub, pid, text)
                signal.pidfd_send_signal(fd, signal.SIGUSR1)
        finally:
            os.close(fd)
        self.stats[f"fault.{kind}"] += 1
        pub.faults.append(kind)
        if kind in ("burst", "spew"):
            self.last_burst = asyncio.get_running_loop().time()
            return  # no exit: only lines, checked at the end
        unhealthy = kind in ("stop", "hang")
        if unhealthy:
            restart = pub.restart != "never"
        elif pub.restart == "always":
            restart = True
        elif pub.restart == "never":
            restart = False
        else:
            assert code is not None
            restart = code != 0
        pub.exits += 1
        if restart:
            pub.restarts += 1
            got = await self._wait(
                c,
                pub.name,
                lambda i: (
                    i.restarts == info.restarts + 1
                    and i.state == "RUNNING"
                    and i.pid not in (0, pid)
                ),
                f"restart after {kind}",
            )
        else:
            pub.wanted = False
            pub.expect = "EXITED"
            got = await self._wait(
                c, pub.name, lambda i: i.state == "EXITED", f"EXITED after {kind}"
            )
        if got is None:
            return
        self.last_exits[kind, got.lastExit] += 1
        if code is not None and got.lastExit != code:
            self.problem(f"{pub.name}: {kind} should end with status {code}, got {got.lastExit}")

    async def _demo_option(self, pub: Pub, kind: str, params: dict[str, Any]) -> None:
        key, value = {
            "exit": ("crash", params.get("crash", "")),
            "hang": ("hang", "1"),
            "spew": ("spew", str(params.get("count", 0))),
        }[kind]
        assert pub.port is not None
        service = idl.publisher().PublisherService
        async with await ThriftClient.connect(
            service, host="127.0.0.1", port=pub.port, timeout=5
        ) as demo:
            await demo.call("setOption", key, value)

    # --- operator actions -----------------------------------------------------------------------

    def _pick_op(self) -> None:
        rng = self._rng["ops"]
        idle = self._idle()
        if not idle:
            self.stats["skipped.op"] += 1
            return
        pub = rng.choice(idle)
        if pub.expect == "RUNNING":
            action = rng.choice(["stop", "restart"])
        elif pub.expect == "STOPPED":
            action = rng.choice(["start", "start", "restart"])
        else:  # EXITED, FATAL
            action = rng.choice(["start", "restart", "stop"])
        via_cli = rng.random() < 0.05
        self._busy(pub, action, lambda c: self._op_on(c, pub, action, via_cli))

    async def _op_on(self, c: Any, pub: Pub, action: str, via_cli: bool) -> None:
        before = await c.call("getPublisher", pub.name)
        if before.state != pub.expect:
            self.problem(f"{pub.name}: idle and expected {pub.expect}, but {before.state}")
            return
        method = {"start": "startPublisher", "stop": "stopPublisher", "restart": "restartPublisher"}
        cut = False
        if via_cli:
            self.stats["op.cli"] += 1
            while True:
                since = self.upgrades_begun - self.upgrading
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pubmon", action, pub.name,
                    "--socket", str(self.env.socket),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await proc.communicate()
                if proc.returncode == 4 and since < self.upgrades_begun:  # closed by an exec
                    self.stats["upgrade.dropped_calls"] += 1
                    continue
                if proc.returncode == 9 and UPGRADING.encode() in err:  # taken, then cut short
                    self.stats["upgrade.cut_requests"] += 1
                    cut = True
                elif proc.returncode == 1 and action != "stop" and pub.expect != "RUNNING":
                    pass  # a doomed one: the CLI says it did not reach RUNNING
                elif proc.returncode != 0:
                    self.problem(f"pubmon {action} {pub.name} exited {proc.returncode}: {err!r}")
                break
        else:
            try:
                await c.call(method[action], pub.name)
            except (idl.pubmon().InvalidState, idl.pubmon().UnknownPublisher) as exc:
                if exc.message.startswith(UPGRADING):  # taken, then cut short: it goes on
                    self.stats["upgrade.cut_requests"] += 1
                    cut = True
                else:
                    self.problem(f"{pub.name}: {action} from {before.state}: {exc.message}")
                    return
        self.stats[f"op.{action}"] += 1
        if cut:  # answered before its publisher acted on it: wait for that first
            await self._wait(
                c,
                pub.name,
                lambda i: i.stateSince != before.stateSince,
                f"{action} taken after an upgrade cut its call short",
            )
        if before.state == "RUNNING" and action in ("stop", "restart"):
            pub.exits += 1
        if action == "stop":
            pub.wanted = False
            pub.expect = "STOPPED"
            await self._wait(c, pub.name, lambda i: i.state == "STOPPED", "STOPPED after stop")
            return
        pub.started()
        if pub.expect == "RUNNING":
            await self._wait(
                c,
                pub.name,
                lambda i: i.state == "RUNNING" and i.pid not in (0, before.pid),
                f"RUNNING after {action}",
            )
        else:
            await self._wait(
                c, pub.name, lambda i: i.state == pub.expect, f"{pub.expect} after {action}"
            )

    # --- reloads --------------------------------------------------------------------------------

    async def _reload_lane(self, until: float) -> None:
        rng = self._rng["reloads"]
        while await _pace(until, rng.uniform(3, 8) / self.scale):
            if rng.random() < 0.1:
                await self._broken_reload()
            else:
                await self._reload(rng)

    async def _counter(self, c: Any, key: str) -> int:
        value: int = await c.call("getCounter", key)
        return value

    async def _wait_counter(self, c: Any, key: str, value: int, what: str) -> bool:
        try:
            async with asyncio.timeout(60):
                while await self._counter(c, key) < value:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            self.problem(f"{what}: {key} did not reach {value} within 60 s")
            return False
        return True

    async def _broken_reload(self) -> None:
        async with self._config_lock:
            good = render_config(self.env, list(self.pubs.values()))
            write_config(self.env, good + "[publisher.broken]\ncommand = 42\n")
            async with self.client() as c:
                os.kill(self.daemon_pid, signal.SIGHUP)
                self.reload_failures += 1
                self.stats["reload.broken"] += 1
                await self._wait_counter(
                    c, "daemon.reload_failures", self.reload_failures, "broken reload"
                )
            write_config(self.env, good)

    async def _reload(self, rng: random.Random) -> None:
        idle = self._idle()
        removable = [p for p in idle if not p.stable]
        removed = rng.sample(removable, min(len(removable), rng.randint(0, 3)))
        rest = [p for p in idle if p not in removed]
        changeable = [p for p in rest if p.kind in FAULTABLE]
        changed = rng.sample(changeable, min(len(changeable), rng.randint(0, 3)))
        rest = [p for p in rest if p not in changed]
        policy = rng.sample(rest, min(len(rest), rng.randint(0, 3)))
        added = [self._new_pub(rng) for _ in range(rng.randint(0, 3))]
        touched = [*removed, *changed, *policy, *added]
        for p in touched:
            p.busy = True
            p.actions += 1
        self.reloading += 1
        try:
            async with self.client() as c:
                await self._apply_reload(c, rng, removed, changed, policy, added)
        except RpcError as exc:
            self.problem(f"reload: control call failed: {exc}")
        finally:
            self.reloading -= 1
            for p in touched:
                p.busy = False

    def _new_pub(self, rng: random.Random) -> Pub:
        kinds = ["plain", "plain", "plain", "stubborn"]
        if self.demo_ports:
            kinds.append("demo")
        kind = rng.choice(kinds)
        # A removed name comes back now and then: its log files go on, its counters start at 0.
        if kind in LINE_KINDS and self._removed_line_pubs and rng.random() < 0.3:
            name = self._removed_line_pubs.pop(rng.randrange(len(self._removed_line_pubs)))
        else:
            self._added += 1
            name = f"new{self._added:03d}"
        port = self.demo_ports.pop() if kind == "demo" else None
        return Pub(
            name=name,
            kind=kind,
            restart=rng.choice(["always", "always", "on-failure"]),
            rate=round(rng.uniform(2, 8), 1),
            stop_timeout=round(rng.uniform(0.3, 1.0), 2),
            autostart=rng.random() < 0.85,
            port=port,
        )

    async def _apply_reload(
        self,
        c: Any,
        rng: random.Random,
        removed: list[Pub],
        changed: list[Pub],
        policy: list[Pub],
        added: list[Pub],
    ) -> None:
        pids = {p.name: (await c.call("getPublisher", p.name)).pid for p in changed}
        for p in removed:
            del self.pubs[p.name]
            self.retired.update(restarts=p.restarts, exits=p.exits)
            if p.kind in LINE_KINDS:
                self._removed_line_pubs.append(p.name)
            elif p.kind == "demo" and p.port is not None:
                self.demo_ports.insert(0, p.port)
        for p in changed:
            p.tag += 1
        for p in policy:
            p.stop_timeout = 1.25 if p.stop_timeout != 1.25 else 0.75
        for p in added:
            self.pubs[p.name] = p
            if p.kind in LINE_KINDS:
                self.ever.add(p.name)
            elif p.kind == "demo":
                self.ever_demo.add(p.name)
        async with self._config_lock:  # until the daemon runs what the file says
            write_config(self.env, render_config(self.env, list(self.pubs.values())))
            self.reloads += 1
            if rng.random() < 0.3:
                self.stats["reload.rpc"] += 1
                result = await c.call("reloadConfig")
                want = (
                    sorted(p.name for p in added),
                    sorted(p.name for p in removed),
                    sorted(p.name for p in changed),
                )
                got = (sorted(result.added), sorted(result.removed), sorted(result.changed))
                if got != want:
                    self.problem(f"reloadConfig answered {got}, expected {want}")
            else:
                self.stats["reload.sighup"] += 1
                os.kill(self.daemon_pid, signal.SIGHUP)
                if not await self._wait_counter(c, "daemon.reloads", self.reloads, "SIGHUP reload"):
                    return
        self.stats["reload.added"] += len(added)
        self.stats["reload.removed"] += len(removed)
        self.stats["reload.changed"] += len(changed)
        waits = []
        for p in changed:
            if p.expect == "RUNNING":
                p.exits += 1
                old = pids[p.name]
                waits.append(
                    self._wait(
                        c,
                        p.name,
                        lambda i, old=old: i.state == "RUNNING" and i.pid not in (0, old),
                        "restart after a changed command",
                    )
                )
        for p in added:
            if p.expect == "RUNNING":
                waits.append(
                    self._wait(
                        c, p.name, lambda i: i.state == "RUNNING" and i.pid != 0, "start when added"
                    )
                )
        for w in waits:
            await w

    # --- in-place upgrades -----------------------------------------------------------------------

    _MOMENTS = ("any", "reload", "stopping", "backoff", "flood")

    async def _upgrade_lane(self, until: float) -> None:
        rng = self._rng["upgrades"]
        # 2-4 in a 60 s run: each costs the host a check and a new interpreter (~0.5 s of CPU
        # each on a loaded 2-core host) and holds spawns back while it waits for its moment.
        while await _pace(until, rng.uniform(10, 20) / self.scale):
            await self._upgrade(rng.choice(self._MOMENTS))

    async def _moment(self, c: Any, moment: str) -> bool:
        """Wait (up to 3 s) for a moment of this kind: a reload under way, a publisher
        STOPPING or in BACKOFF, a flood of lines just injected. True if it came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while loop.time() < deadline:
            if moment == "any":
                return True
            if moment == "reload" and self.reloading:
                return True
            if moment == "flood" and loop.time() - self.last_burst < 0.5:
                return True
            if moment in ("stopping", "backoff"):
                state = moment.upper()
                if any(i.state == state for i in await c.call("listPublishers")):
                    return True
            await asyncio.sleep(0.02)
        return False

    async def _upgrade(self, moment: str) -> None:
        """One `upgrade` at a moment of the kind asked for; then the books: the new image
        counted it, carried every publisher over (none lost), and every publisher the driver
        did not touch meanwhile kept its pid and its run (lines across the seam are checked
        with the log files and by the followers)."""
        async with self.client() as c:
            met = await self._moment(c, moment)
            async with self._config_lock:  # the file is what runs: else refused as edited
                before = {i.name: i for i in await c.call("listPublishers")}
                actions = {p.name: p.actions for p in self.pubs.values() if not p.busy}
                self.upgrading += 1
                self.upgrades_begun += 1
                try:
                    try:
                        r = await c.call("upgrade")
                    except idl.pubmon().UpgradeRefused as exc:
                        self.problem(f"upgrade ({moment}) refused: {exc.message}")
                        return
                    got = await self._upgraded(c, r.upgradesBefore)
                finally:
                    self.upgrading -= 1
            after = {i.name: i for i in await c.call("listPublishers")}
        self.upgrades += 1
        self.stats[f"upgrade.{moment if met else 'any'}"] += 1
        if got is None:
            return
        self.stats["upgrade.adopted"] += got.get("daemon.last_upgrade_adopted", 0)
        if got.get("daemon.last_upgrade_lost"):
            self.problem(f"upgrade: {got['daemon.last_upgrade_lost']} publishers not carried over")
        for name, pub in self.pubs.items():
            a, b = before.get(name), after.get(name)
            if a is None or b is None or pub.actions != actions.get(name) or pub.busy:
                continue
            if pub.kind not in LINE_KINDS:  # a probe may kill a demo one under load
                continue
            if a.state == "RUNNING" and a.pid and (b.pid, b.startedAt) != (a.pid, a.startedAt):
                self.problem(
                    f"{name}: untouched across an upgrade, yet pid {a.pid} -> {b.pid} "
                    f"({b.state}; last exit: {b.lastExitReason})"
                )
            else:
                self.stats["upgrade.pids_checked"] += bool(a.pid)

    async def _upgraded(self, c: Any, before: int) -> dict[str, int] | None:
        """The new image's counters once it counted the upgrade."""
        try:
            async with asyncio.timeout(60):
                while True:
                    got: dict[str, int] = await c.call("getCounters")
                    if got.get("daemon.upgrades", 0) > before:
                        return got
                    await asyncio.sleep(0.02)
        except TimeoutError:
            self.problem("upgrade: the new image did not count it within 60 s")
            return None

    # --- status bursts on the TCP listener ------------------------------------------------------

    async def _status_lane(self, until: float) -> None:
        rng = self._rng["status"]
        while await _pace(until, rng.uniform(0.5, 2.5) / self.scale):
            n = rng.randint(5, 30)
            self.stats["status.bursts"] += 1
            await asyncio.gather(*(self._status_client(i == 0) for i in range(n)))

    async def _status_client(self, try_mutating: bool) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        c = Conn(self, lambda: ThriftClient.connect(
            _svc(), host="127.0.0.1", port=self.env.monitor_port, timeout=STATUS_TIMEOUT
        ))  # fmt: skip
        try:
            await c.call("getStatus")
            await c.call("listPublishers")
            await c.call("getCounters")
            await c.call("getStatusDetails")
            self.stats["status.calls"] += 4
            if try_mutating:
                try:
                    await c.call("stopPublisher", next(iter(self.pubs)))
                except idl.pubmon().PermissionDenied:
                    self.stats["status.denied"] += 1
                else:
                    self.problem("stopPublisher was allowed on the TCP monitor listener")
        except RpcError as exc:
            self.problem(f"status burst: {exc}")
        finally:
            await c.close()
        self.status_max_latency = max(self.status_max_latency, loop.time() - t0)

    # --- followers ------------------------------------------------------------------------------

    async def follow(self, name: str) -> None:
        """tail -f over tailLog until stop_followers(): seqs contiguous (or `missed`), and each
        child run's lines in order."""
        cursor = 0
        last: dict[tuple[str, str], int] = {}
        async with self.client() as c:
            while not self._followers_done.is_set():
                chunk = await c.call("tailLog", name, cursor, 1000)
                self.stats["follow.calls"] += 1
                lines = chunk.lines
                if not lines:
                    continue
                if lines[0].seq != cursor + 1 + chunk.missed:
                    self.problem(
                        f"follow {name}: after {cursor} with {chunk.missed} missed "
                        f"came seq {lines[0].seq}"
                    )
                for a, b in itertools.pairwise(lines):
                    if b.seq != a.seq + 1:
                        self.problem(f"follow {name}: seq {b.seq} after {a.seq}")
                if chunk.nextSeq != lines[-1].seq:
                    self.problem(f"follow {name}: nextSeq {chunk.nextSeq} != {lines[-1].seq}")
                if chunk.missed:
                    self.stats["follow.missed"] += chunk.missed
                    last.clear()
                for line in lines:
                    m = _HEAD.match(line.text)
                    if m is None:
                        continue
                    key, seq = (m.group(1), m.group(2)), int(m.group(3))
                    if key in last and seq != last[key] + 1:
                        self.problem(f"follow {name}: {key} line {seq} after {last[key]}")
                    last[key] = seq
                    self.stats["follow.lines"] += 1
                cursor = chunk.nextSeq

    def stop_followers(self) -> None:
        self._followers_done.set()


class Conn:
    """A control connection that is made again when an upgrade refuses a call or closes it
    (`Driver.retriable`); the call is then made again on the new one."""

    def __init__(self, driver: Driver, connect: Callable[[], Awaitable[Any]]) -> None:
        self._driver = driver
        self._connect = connect
        self._client: Any = None
        self._since = 0  # driver.upgrades_begun when it connected

    async def call(self, method: str, *args: Any) -> Any:
        while True:
            try:
                if self._client is None:
                    # Made while one is under way: the exec of that one may close it too.
                    self._since = self._driver.upgrades_begun - self._driver.upgrading
                    self._client = await self._connect()
                return await self._client.call(method, *args)
            except (RpcError, idl.pubmon().InvalidState) as exc:
                if not self._driver.retriable(exc, self._since):
                    raise
            await self.close()
            await asyncio.sleep(0.02)  # the new image answers once it has taken over

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def _pace(until: float, delay: float) -> bool:
    """Sleep `delay` (a lane's pacing, not a wait for anything); False once `until` is reached."""
    loop = asyncio.get_running_loop()
    left = until - loop.time()
    await asyncio.sleep(max(0.0, min(delay, left)))
    return delay < left


def check_cli_follower(text: str) -> tuple[int, list[str]]:
    """Lines of `pubmon tail -f` output: (numbered lines, problems). Each run's lines must come
    in order, without repeats (gaps: lines the ring dropped before the follower read them)."""
    last: dict[tuple[str, str], int] = {}
    problems = []
    count = 0
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m is None:
            continue
        key, seq = (m.group(1), m.group(2)), int(m.group(3))
        if key in last and seq <= last[key]:
            problems.append(f"pubmon tail -f: {key} line {seq} after {last[key]}")
        last[key] = seq
        count += 1
    return count, problems[:10]

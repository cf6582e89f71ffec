"""The supervision core in-process: real children, real signals, real pipes."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from children import (
    EXIT0,
    EXIT1,
    GRANDCHILD,
    IGNORE_TERM,
    ORPHANER,
    SLEEP,
    config,
    numbered,
    py,
    spec,
)
from procs import alive, children, in_group, state, wait_gone
from pubmon.config.model import Backoff, CrashLoop, ProbeSpec, PublisherSpec
from pubmon.core import process as spawn_module
from pubmon.core.lifecycle import PublisherState
from pubmon.core.publisher import Publisher
from pubmon.core.reaper import OrphanReaper
from pubmon.core.supervisor import Supervisor
from pubmon.errors import InvalidState, UnknownPublisher
from supervising import supervising

S = PublisherState


@asynccontextmanager
async def running(*specs: PublisherSpec, log_dir: Path | None = None) -> AsyncIterator[Supervisor]:
    async with supervising(config(*specs, log_dir=str(log_dir) if log_dir else None)) as sup:
        yield sup


async def until(pub: Publisher, predicate: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        await pub.wait_until(predicate)


async def lines_seen(pub: Publisher, n: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while pub.output.last_seq < n:
            await pub.output.wait_beyond(pub.output.last_seq)


async def in_state(pub: Publisher, *states: S, timeout: float = 10) -> None:
    await until(pub, lambda: pub.state in states, timeout)


async def test_autostart_runs_and_stop_all_leaves_nothing() -> None:
    async with running(spec("a"), spec("b"), spec("c", autostart=False)) as sup:
        a, b, c = (sup.get(n) for n in "abc")
        await in_state(a, S.RUNNING)
        await in_state(b, S.RUNNING)
        assert c.state == S.STOPPED and c.pid is None
        pids = [a.pid, b.pid]
        assert all(p and alive(p) for p in pids)
        # each publisher leads its own process group
        assert a.pid is not None and os.getpgid(a.pid) == a.pid
    assert not any(alive(p) for p in pids if p)


async def test_operator_stop_is_never_undone_and_start_brings_it_back() -> None:
    async with running(spec("a")) as sup:
        pub = sup.get("a")
        await in_state(pub, S.RUNNING)
        first = pub.pid
        snap = await sup.stop("a")
        assert snap.state == S.STOPPED and snap.pid is None
        assert first is not None and not alive(first)
        with pytest.raises(InvalidState, match="already STOPPED"):
            await sup.stop("a")
        assert pub.restarts == 0 and pub.state == S.STOPPED
        snap = await sup.start("a")
        assert snap.state == S.RUNNING and snap.pid not in (None, first)
        with pytest.raises(InvalidState, match="already RUNNING"):
            await sup.start("a")
        with pytest.raises(UnknownPublisher, match="'nope'"):
            await sup.start("nope")


async def test_restart_gives_a_new_pid() -> None:
    async with running(spec("a")) as sup:
        await in_state(sup.get("a"), S.RUNNING)
        before = sup.get("a").pid
        snap = await sup.restart("a")
        assert snap.state == S.RUNNING and snap.pid != before
        assert before is not None and not alive(before)


async def test_killed_child_is_restarted_at_once() -> None:
    async with running(spec("a")) as sup:
        pub = sup.get("a")
        await in_state(pub, S.RUNNING)
        old = pub.pid
        assert old is not None
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        await until(pub, lambda: pub.state == S.RUNNING and pub.pid not in (None, old))
        took = time.monotonic() - t0
        assert pub.last_exit == -signal.SIGKILL
        assert pub.last_exit_reason == "killed by SIGKILL"
        assert pub.restarts == 1
        assert took < 10  # at once, not after a backoff; the bench measures the figure


async def test_crash_loop_reaches_fatal_following_backoff_and_spares_the_rest() -> None:
    backoff = Backoff(initial=0.1, max=0.4, factor=2, jitter=0)
    crashy = spec("crashy", EXIT1, backoff=backoff, crash_loop=CrashLoop(max_restarts=5, window=60))
    async with running(crashy, spec("steady")) as sup:
        pub, steady = sup.get("crashy"), sup.get("steady")
        await in_state(steady, S.RUNNING)
        steady_pid = steady.pid
        await in_state(pub, S.FATAL)
        assert "crash loop" in pub.details
        starts = list(pub.start_times)
        assert len(starts) == 6  # the first start and max_restarts restarts
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        expected = [0.0, 0.1, 0.2, 0.4, 0.4]
        for gap, want in zip(gaps, expected, strict=True):
            assert want <= gap < want + 0.25, (gaps, expected)
        assert pub.last_exit == 1 and pub.restarts == 5
        assert steady.state == S.RUNNING and steady.pid == steady_pid and steady.restarts == 0
        # only an operator leaves FATAL
        snap = await sup.start("crashy")
        assert snap.state in (S.RUNNING, S.BACKOFF)


async def test_restart_policies_on_clean_exit() -> None:
    async with running(
        spec("never", EXIT1, restart="never"),
        spec("onfail", EXIT0, restart="on-failure", start_timeout=1),
    ) as sup:
        never, onfail = sup.get("never"), sup.get("onfail")
        await in_state(never, S.EXITED)
        await in_state(onfail, S.EXITED)
        assert never.restarts == 0 and never.last_exit == 1
        assert onfail.restarts == 0 and onfail.last_exit == 0
        await sup.stop("never")
        assert never.state == S.STOPPED


async def test_ignoring_sigterm_is_killed_after_stop_timeout_not_before() -> None:
    stubborn = spec("stubborn", IGNORE_TERM, stop_timeout=0.6)
    async with running(stubborn) as sup:
        pub = sup.get("stubborn")
        await in_state(pub, S.RUNNING)
        await lines_seen(pub, 1)  # SIGTERM is now ignored
        t0 = time.monotonic()
        await sup.stop("stubborn")
        took = time.monotonic() - t0
        assert pub.last_exit == -signal.SIGKILL
        assert 0.6 <= took < 0.6 + 10  # not before stop_timeout, not much after


async def test_graceful_stop_kills_the_grandchildren_of_the_group(tmp_path: Path) -> None:
    async with running(spec("parent", GRANDCHILD)) as sup:
        pub = sup.get("parent")
        await in_state(pub, S.RUNNING)
        await lines_seen(pub, 1)
        grandchild = int(pub.output.last(1).lines[0].text)
        leader = pub.pid
        assert leader is not None and alive(grandchild)
        assert os.getpgid(grandchild) == leader
        await sup.stop("parent")
        # Killed with its group; under CPU load it may still be inside exit (its memory and
        # files already released, not yet a zombie) for a moment after the stop returns.
        await wait_gone([grandchild], timeout=5)
        assert not in_group(leader)


async def test_orphaned_grandchild_is_killed_with_its_group_and_reaped() -> None:
    async with running(spec("orphaner", ORPHANER, restart="never")) as sup:
        pub = sup.get("orphaner")
        await in_state(pub, S.EXITED)
        grandchild = int(pub.output.last(1).lines[0].text)
        # The leader exited; the rest of its group was killed and the orphan (re-parented to us,
        # the subreaper) reaped: neither alive nor a zombie.
        async with asyncio.timeout(5):
            while state(grandchild) is not None:
                await asyncio.sleep(0.01)
        assert grandchild not in children(os.getpid())


async def test_a_grandchild_orphaned_while_its_publisher_runs_is_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The publisher's own child exits and leaves its child (a grandchild of ours) re-parented
    # to us, the subreaper, while the publisher keeps running: no exit of ours says "sweep".
    # The periodic sweep reaps it when it ends (its quiet period shortened for the test).
    monkeypatch.setattr(OrphanReaper, "QUIET_PERIOD", 0.2)
    script = "sh -c 'sleep 0.3 & echo $!'; exec sleep 3600"
    async with running(spec("parent", ("sh", "-c", script))) as sup:
        pub = sup.get("parent")
        await lines_seen(pub, 1)
        orphan = int(pub.output.last(1).lines[0].text)
        async with asyncio.timeout(10):
            while state(orphan) is not None:  # alive, then a zombie, then reaped
                await asyncio.sleep(0.02)
        assert pub.state == S.RUNNING and orphan not in children(os.getpid())


async def test_escaped_grandchild_is_killed_at_shutdown() -> None:
    # setsid puts the grandchild out of reach of killpg; shutdown still ends it.
    escaper = spec("escaper", ("sh", "-c", "setsid sleep 3600 & echo started; exec sleep 3600"))
    async with running(escaper) as sup:
        pub = sup.get("escaper")
        await lines_seen(pub, 1)
        leader = pub.pid
    assert leader is not None
    leftovers = [p for p in children(os.getpid()) if alive(p)]
    assert leftovers == []


async def test_depends_on_starts_after_and_stops_before() -> None:
    db = spec("db", SLEEP, start_timeout=0.3)
    app = spec("app", SLEEP, depends_on=("db",))
    order: list[tuple[str, S]] = []
    async with running(app, db) as sup:
        a, d = sup.get("app"), sup.get("db")
        await in_state(a, S.RUNNING)
        assert d.state == S.RUNNING
        assert a.start_times[0] >= d.start_times[0] + 0.3
        orig_a, orig_d = a._transition, d._transition

        def spy(pub: Publisher, orig: Callable[[S, str], None]) -> Callable[[S, str], None]:
            def wrapped(new: S, why: str) -> None:
                order.append((pub.name, new))
                orig(new, why)

            return wrapped

        a._transition = spy(a, orig_a)  # type: ignore[method-assign]
        d._transition = spy(d, orig_d)  # type: ignore[method-assign]
    assert order.index(("app", S.STOPPED)) < order.index(("db", S.STOPPING))


async def test_permanent_spawn_error_is_fatal_with_reason_and_others_run(tmp_path: Path) -> None:
    noexec = tmp_path / "noexec.sh"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    noexec.chmod(0o644)
    async with running(
        spec("noexec", (str(noexec),)),
        spec("ghost", SLEEP, user="no-such-user-pubmon"),
        spec("fine"),
    ) as sup:
        await in_state(sup.get("noexec"), S.FATAL)
        await in_state(sup.get("ghost"), S.FATAL)
        await in_state(sup.get("fine"), S.RUNNING)
        assert "Permission denied" in sup.get("noexec").details
        assert "no-such-user-pubmon" in sup.get("ghost").details


async def test_every_line_of_a_fast_child_reaches_the_log_file(tmp_path: Path) -> None:
    n = 200_000
    async with running(spec("chatty", numbered(n), restart="never"), log_dir=tmp_path) as sup:
        pub = sup.get("chatty")
        await in_state(pub, S.EXITED)
        assert pub.output.lines == n
    lines = (tmp_path / "chatty.log").read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert lines[:-1] == [f"line {i}".encode() for i in range(n)]


async def test_huge_line_invalid_utf8_and_no_final_newline_survive(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "w = sys.stdout.buffer.write\n"
        "w(b'a' * (5 << 20))\n"  # 5 MiB, no newline, then the stream ends with garbage
        "w(b'\\nbad \\xff\\xfe utf8\\nlast')\n"
    )
    big = spec("big", py(code), restart="never", log=replace(spec("x").log, ring_lines=200))
    async with running(big, log_dir=tmp_path) as sup:
        pub = sup.get("big")
        await in_state(pub, S.EXITED)
        assert pub.output.last_seq == 82  # 80 fragments of 64 KiB, then two lines
        chunk = pub.output.tail(0, 10_000)
    lines = chunk.lines
    assert lines[-1].text == "last" and lines[-1].partial
    assert lines[-2].text == "bad \\xff\\xfe utf8" and not lines[-2].partial
    fragments = lines[:-2]
    assert "".join(f.text for f in fragments) == "a" * (5 << 20)
    assert all(f.partial for f in fragments[:-1]) and not fragments[-1].partial
    assert all(len(f.text) <= 65536 for f in fragments)
    raw = (tmp_path / "big.log").read_bytes()
    assert raw.replace(b"\n", b"").startswith(b"a" * (5 << 20))
    assert raw.endswith(b"bad \xff\xfe utf8\nlast\n")


async def test_environment_is_scrubbed_and_pdeathsig_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    code = (
        "import ctypes, os, signal\n"
        "libc = ctypes.CDLL(None)\n"
        "sig = ctypes.c_int()\n"
        "libc.prctl(2, ctypes.byref(sig))\n"  # PR_GET_PDEATHSIG
        "print('pdeathsig', sig.value)\n"
        "print('notify', os.environ.get('NOTIFY_SOCKET'), os.environ.get('WATCHDOG_USEC'))\n"
        "print('mine', os.environ.get('MINE'), os.environ['PUBMON_PUBLISHER'])\n"
        "print('stdin', os.readlink('/proc/self/fd/0'))\n"
    )
    probe = spec("env", py(code), restart="never", environment=(("MINE", "yes"),))
    async with running(probe) as sup:
        pub = sup.get("env")
        await in_state(pub, S.EXITED)
        texts = [line.text for line in pub.output.tail(0, 100).lines]
    assert texts == [
        f"pdeathsig {int(signal.SIGKILL)}",
        "notify None None",
        "mine yes env",
        "stdin /dev/null",
    ]


@pytest.mark.parametrize("path", ["wrapper", "preexec", "setpriv-refused"])
async def test_both_spawn_paths_arm_pdeathsig_and_leave_only_the_command(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if path == "preexec":  # no setpriv on this machine
        monkeypatch.setattr(spawn_module, "_SETPRIV", None)
    elif path == "setpriv-refused":  # as under a seccomp filter that denies its capset
        refusing = tmp_path / "setpriv"
        refusing.write_text(
            "#!/bin/sh\necho 'setpriv: activate capabilities: Operation not permitted' >&2\n"
            "exit 127\n"
        )
        refusing.chmod(0o755)
        monkeypatch.setattr(spawn_module, "_SETPRIV", str(refusing))
        monkeypatch.setattr(spawn_module, "_wrapper_works", None)
    code = (
        "import ctypes, os, signal, sys\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig))\n"  # PR_GET_PDEATHSIG
        "leads = os.getpgid(0) == os.getpid()\n"
        "print('pdeathsig', sig.value, 'ppid', os.getppid(), 'pgid', leads)\n"
        "print('argv', sys.argv[1:])\n"
    )
    argv = (*py(code), "one arg", "$two")
    fast = spawn_module._wrapper_usable() and spawn_module._wrapper_can_run(
        spawn_module._find(argv[0], os.environ, None), None
    )
    assert fast == (path == "wrapper")
    async with running(spec("armed", argv, restart="never")) as sup:
        pub = sup.get("armed")
        await in_state(pub, S.EXITED)
        texts = [line.text for line in pub.output.tail(0, 100).lines]
    assert texts == [
        f"pdeathsig {int(signal.SIGKILL)} ppid {os.getpid()} pgid True",
        "argv ['one arg', '$two']",
    ]
    assert pub.last_exit == 0
    refused = [r.getMessage() for r in caplog.records if "cannot arm" in r.getMessage()]
    assert len(refused) == (path == "setpriv-refused")
    assert all("activate capabilities: Operation not permitted" in m for m in refused)


async def test_the_wrapper_runs_nothing_when_the_daemon_died_before_it_armed() -> None:
    # The race of asyncio-gotchas 1.2: were the daemon killed between the fork and the prctl,
    # nobody would ever send the signal. The check reads the parent after arming.
    async def run(parent: int) -> tuple[int, bytes]:
        argv = spawn_module.wrapped(("echo", "ran"), parent)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    assert await run(os.getpid()) == (0, b"ran\n")
    assert await run(1) == (111, b"")  # "our parent should be pid 1": it is not, so it stops


def test_the_wrapper_is_used_only_for_commands_that_surely_exec(tmp_path: Path) -> None:
    def can(argv0: str, env: dict[str, str], cwd: str | None) -> bool:
        return spawn_module._wrapper_can_run(spawn_module._find(argv0, env, cwd), cwd)

    env = {"PATH": f"{tmp_path}/bin:/usr/bin:/bin"}
    (tmp_path / "bin").mkdir()
    script, text, plain, folder = (tmp_path / "bin" / n for n in ("script", "text", "plain", "dir"))
    script.write_text("#!/bin/sh\nexit 0\n")
    text.write_text("exit 0\n")  # executable, but no #!: the kernel says ENOEXEC
    plain.write_text("#!/bin/sh\n")
    folder.mkdir()
    for f in (script, text):
        f.chmod(0o755)
    assert can("sleep", env, None) and can("script", env, None)
    assert can("bin/script", env, str(tmp_path))  # relative to the publisher's directory
    assert not can("bin/script", env, str(tmp_path / "missing"))
    assert not can("text", env, None)
    assert not can("plain", env, None)  # not executable: the exact EACCES comes from exec
    assert not can("dir", env, None)
    assert not can("no-such-command", env, None)
    assert not can(str(tmp_path / "bin" / "nope"), env, None)


async def test_unknown_and_program_names_resolve() -> None:
    async with running(
        spec("w:0", program="w", index=0), spec("w:1", program="w", index=1), spec("x")
    ) as sup:
        assert [p.name for p in sup.resolve(["w"])] == ["w:0", "w:1"]
        assert [p.name for p in sup.resolve(["x", "w:1"])] == ["x", "w:1"]
        with pytest.raises(UnknownPublisher):
            sup.resolve(["y"])


async def test_shutdown_with_many_publishers_is_concurrent() -> None:
    specs = [spec(f"p{i}") for i in range(50)]
    async with running(*specs) as sup:
        await sup.wait_settled()
        pids = [p.pid for p in sup.publishers.values()]
        assert all(pids)
        t0 = time.monotonic()
    took = time.monotonic() - t0
    await wait_gone([p for p in pids if p], timeout=1)
    assert took < 5


async def test_instant_exits_keep_their_status_while_spawns_overlap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Regression: the orphan reaper's deferred sweep ran before a fresh child was tracked and
    # reaped it, so asyncio reported "exit status already read" and returncode 255.
    specs = [spec(f"e{i}", ("sh", "-c", "exit 3"), restart="never") for i in range(40)]
    async with running(*specs) as sup:
        for pub in sup.publishers.values():
            await in_state(pub, S.EXITED)
        assert {p.last_exit for p in sup.publishers.values()} == {3}
    assert "already read" not in caplog.text


# --- requests that race the child, reloads that change a running publisher ---------------------


async def _kill_and_see_the_exit(pub: Publisher) -> None:
    """SIGKILL the child and return as soon as its exit is known (its `exited` future is
    done), before its runner had a turn: a request posted now races the exit."""
    child = pub.child
    assert child is not None
    os.kill(child.pid, signal.SIGKILL)
    async with asyncio.timeout(5):
        while child.returncode is None:
            await asyncio.sleep(0)


@pytest.mark.parametrize("restart", ["never", "always"])
async def test_a_stop_that_races_the_childs_own_exit_ends_stopped(restart: str) -> None:
    slow_backoff = Backoff(initial=30, max=30, factor=1, jitter=0)
    async with running(spec("racer", restart=restart, backoff=slow_backoff)) as sup:
        pub = sup.get("racer")
        await in_state(pub, S.RUNNING)
        await _kill_and_see_the_exit(pub)
        async with asyncio.timeout(5):  # not the 30 s backoff, not for ever
            snap = await sup.stop("racer")
        assert snap.state == S.STOPPED
        assert pub.restarts == 0 and pub.exits == 1  # no restart was counted, none happened


async def test_a_restart_that_races_the_childs_own_exit_runs_once_more() -> None:
    async with running(spec("racer", restart="never")) as sup:
        pub = sup.get("racer")
        await in_state(pub, S.RUNNING)
        old = pub.pid
        await _kill_and_see_the_exit(pub)
        async with asyncio.timeout(5):
            snap = await sup.restart("racer")
        assert snap.state == S.RUNNING and snap.pid not in (None, old)


async def test_a_script_whose_interpreter_is_missing_is_fatal_at_once(tmp_path: Path) -> None:
    script = tmp_path / "publisher"
    script.write_text("#!/nonexistent/python3\nprint('never')\n")
    script.chmod(0o755)
    async with running(spec("script", (str(script),))) as sup:
        pub = sup.get("script")
        await in_state(pub, S.FATAL)
        assert "its interpreter /nonexistent/python3 cannot be used" in pub.details
        assert pub.restarts == 0 and pub.exits == 0


async def test_reload_rebuilds_a_changed_probe_at_once_without_a_restart() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    before = spec("probed")
    probe = ProbeSpec(kind="tcp", port=dead, interval=0.05, timeout=0.05, failure_threshold=2)
    after = replace(before, probe=probe)
    async with running(before) as sup:
        pub = sup.get("probed")
        await in_state(pub, S.RUNNING)
        old = pub.pid
        diff = await sup.reload(config(after))
        assert [(c.change, c.fields) for c in diff.changes] == [
            (
                "updated",
                (
                    "probe.kind",
                    "probe.interval",
                    "probe.timeout",
                    "probe.failure_threshold",
                    "probe.port",
                ),
            )
        ]
        # The new probe finds nothing on its port and, past its threshold, the run is killed.
        await until(pub, lambda: pub.probe_kills == 1 and pub.exits == 1)
        assert pub.probe_failures >= 2 and old is not None and not alive(old)


async def test_reloaded_stop_settings_apply_to_the_next_stop() -> None:
    before = spec("stubborn", IGNORE_TERM, stop_timeout=60)
    async with running(before) as sup:
        pub = sup.get("stubborn")
        await lines_seen(pub, 1)
        await sup.reload(config(replace(before, stop_timeout=0.1)))
        assert pub.state == S.RUNNING  # a stop setting is applied live: no restart
        async with asyncio.timeout(10):  # not the old 60 s
            snap = await sup.stop("stubborn")
        assert snap.state == S.STOPPED and snap.last_exit == -signal.SIGKILL


async def test_requests_are_refused_once_the_supervisor_is_stopping() -> None:
    async with running(spec("a"), spec("b", IGNORE_TERM, stop_timeout=60)) as sup:
        await lines_seen(sup.get("b"), 1)
        stopping = asyncio.ensure_future(sup.stop_all(30))
        await in_state(sup.get("b"), S.STOPPING)
        for request in (sup.start, sup.restart):
            with pytest.raises(InvalidState, match="STOPPING"):
                await request("a")
        with pytest.raises(InvalidState, match="STOPPING"):
            await sup.reload(config(spec("a")))
        sup.kill_all()
        async with asyncio.timeout(10):
            assert await stopping == []


async def test_a_restart_that_fails_to_spawn_is_answered_at_once(tmp_path: Path) -> None:
    # Found by the model: the failed spawn settled no waiter, so the answer came only when the
    # request's bound (start + stop + KILL_BOUND + grace) ran out.
    script = tmp_path / "publisher"
    script.write_text("#!/nonexistent/python3\n")
    script.chmod(0o755)
    async with running(spec("script", (str(script),), start_timeout=30)) as sup:
        pub = sup.get("script")
        await in_state(pub, S.FATAL)
        async with asyncio.timeout(10):  # not the 45 s bound
            snap = await sup.restart("script")
        assert snap.state == S.FATAL and "interpreter" in snap.details

"""The process layer (pubmon.core.process) under a real Supervisor: how a child is spawned
(the setpriv wrapper or a preexec hook), what it starts with (environment, stdin,
parent-death signal, its own process group), and spawn errors that name their cause."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from children import GRANDCHILD, SLEEP, py, spec
from procs import alive, in_group, wait_gone
from pubmon.core import process as spawn_module
from pubmon.core.lifecycle import PublisherState
from supervised import in_state, lines_seen, running

S = PublisherState


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


async def test_a_script_whose_interpreter_is_missing_is_fatal_at_once(tmp_path: Path) -> None:
    script = tmp_path / "publisher"
    script.write_text("#!/nonexistent/python3\nprint('never')\n")
    script.chmod(0o755)
    async with running(spec("script", (str(script),))) as sup:
        pub = sup.get("script")
        await in_state(pub, S.FATAL)
        assert "its interpreter /nonexistent/python3 cannot be used" in pub.details
        assert pub.restarts == 0 and pub.exits == 0


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


def use_wrapper(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawn through `_arm` (pubmon's own wrapper, when it was built) or setpriv and sh."""
    monkeypatch.setattr(spawn_module, "_wrapper_works", None)
    if kind == "arm":
        if not os.access(spawn_module._BUILT_ARM, os.X_OK):
            pytest.skip("src/pubmon/_arm is not built here (no C compiler at install)")
        monkeypatch.setattr(spawn_module, "_ARM", spawn_module._BUILT_ARM)
    else:
        monkeypatch.setattr(spawn_module, "_ARM", None)


@pytest.mark.parametrize("path", ["arm", "setpriv", "preexec", "setpriv-refused", "arm-refused"])
async def test_every_spawn_path_arms_pdeathsig_and_leaves_only_the_command(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    use_wrapper("arm" if path in ("arm", "arm-refused") else "setpriv", monkeypatch)
    if path == "preexec":  # no setpriv on this machine, no _arm built
        monkeypatch.setattr(spawn_module, "_SETPRIV", None)
    elif path == "arm-refused":  # as on a noexec mount: setpriv takes over
        refusing = tmp_path / "_arm"
        refusing.write_text("#!/bin/sh\necho '_arm: Permission denied' >&2\nexit 126\n")
        refusing.chmod(0o755)
        monkeypatch.setattr(spawn_module, "_ARM", str(refusing))
    elif path == "setpriv-refused":  # as under a seccomp filter that denies its capset
        refusing = tmp_path / "setpriv"
        refusing.write_text(
            "#!/bin/sh\necho 'setpriv: activate capabilities: Operation not permitted' >&2\n"
            "exit 127\n"
        )
        refusing.chmod(0o755)
        monkeypatch.setattr(spawn_module, "_SETPRIV", str(refusing))
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
    assert fast == (path in ("arm", "setpriv", "arm-refused"))
    assert (spawn_module._ARM is not None) == (path == "arm")
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
    assert len(refused) == (path in ("setpriv-refused", "arm-refused"))
    assert all(("Operation not permitted" in m or "trying setpriv" in m) for m in refused)


@pytest.mark.parametrize("kind", ["arm", "setpriv"])
async def test_the_wrapper_runs_nothing_when_the_daemon_died_before_it_armed(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race of asyncio-gotchas 1.2: were the daemon killed between the fork and the prctl,
    # nobody would ever send the signal. The check reads the parent after arming.
    use_wrapper(kind, monkeypatch)

    async def run(parent: int) -> tuple[int, bytes]:
        argv = spawn_module.wrapped(("echo", "ran"), parent)
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    assert await run(os.getpid()) == (0, b"ran\n")
    assert await run(1) == (111, b"")  # "our parent should be pid 1": it is not, so it stops


@pytest.mark.parametrize("kind", ["arm", "setpriv"])
async def test_the_wrapper_joins_the_cgroup_before_the_exec_or_runs_nothing(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both wrappers write "0" (themselves) to the cgroup.procs they are given before the exec,
    # and stop with 112 when they cannot; a command that is not there is 127, as sh says.
    use_wrapper(kind, monkeypatch)

    async def run(*argv: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    procs = tmp_path / "cgroup.procs"  # a plain file stands in: the write is what is checked
    procs.write_text("stale")
    joined = spawn_module.wrapped(("echo", "ran"), os.getpid(), cgroup_procs=str(procs))
    assert await run(*joined) == (0, b"ran\n")
    assert procs.read_text() == "0\n"  # written as sh's `>` does (O_TRUNC), and created:
    fresh = tmp_path / "fresh.procs"  # a test's stand-in cgroup may not have the file yet
    created = spawn_module.wrapped(("true",), os.getpid(), cgroup_procs=str(fresh))
    assert await run(*created) == (0, b"")
    assert fresh.read_text() == "0\n"
    gone = str(tmp_path / "gone" / "cgroup.procs")
    assert await run(*spawn_module.wrapped(("echo", "ran"), os.getpid(), cgroup_procs=gone)) == (
        112,
        b"",
    )
    assert (await run(*spawn_module.wrapped(("no-such-command-here",), os.getpid())))[0] == 127


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

"""The operator's CLI as a supervisorctl / systemctl user expects it (issue 17): real daemons,
real sockets, a real pseudo-terminal, a real bash, a real man."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from daemons import RunningDaemon, daemon_header, run_daemon, toml_publisher

SLEEP = ["sleep", "3600"]
FAIL = ["sh", "-c", "echo boom >&2; exit 3"]
SRC = Path(__file__).parents[1] / "src" / "pubmon"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUBMON_")}
    env.update(extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd="/", env=env or _env(),
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@asynccontextmanager
async def daemon(tmp: Path, body: str, n: int) -> AsyncIterator[tuple[RunningDaemon, str]]:
    """A daemon on `body` whose socket is in tmp; yields once `n` publishers run."""
    config = tmp / "pubmon.toml"
    config.write_text(daemon_header(tmp, socket=True) + body)
    async with run_daemon(config) as d:
        await d.wait_publishers(n)
        yield d, str(tmp / "pubmon.sock")


async def _status(sock: str, *names: str) -> list[dict[str, object]]:
    rc, out, err = await cli("status", "--json", "--socket", sock, *names)
    assert rc == 0, err
    pubs: list[dict[str, object]] = json.loads(out)["publishers"]
    return pubs


async def _wait_state(sock: str, name: str, state: str, timeout: float = 20) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            (info,) = await _status(sock, name)
            if info["state"] == state:
                return info
            await asyncio.sleep(0.05)


# --- 1. finding the daemon ---------------------------------------------------------------------


async def test_socket_is_found_by_flag_env_config_in_that_order(tmp_path: Path) -> None:
    async with daemon(tmp_path, toml_publisher("feed", SLEEP), 1) as (_, sock):
        absent = str(tmp_path / "absent.sock")
        other = tmp_path / "other.toml"
        other.write_text('[control]\nsocket = "absent.sock"\n')  # relative to the file
        config = str(tmp_path / "pubmon.toml")
        # Each source alone finds the daemon.
        for args, env in [
            (["--socket", sock], {}),
            ([], {"PUBMON_SOCKET": sock}),
            (["--config", config], {}),
            ([], {"PUBMON_CONFIG": config}),
        ]:
            rc, out, err = await cli("status", *args, env=_env(**env))
            assert rc == 0 and out.startswith("NAME"), (args, env, err)
        # The order: a higher source wins even when a lower one would have worked.
        for args, env in [
            (["--socket", absent], {"PUBMON_SOCKET": sock}),
            (["--config", config], {"PUBMON_SOCKET": absent}),
            (["--config", str(other)], {"PUBMON_CONFIG": config}),
        ]:
            rc, _, err = await cli("status", *args, env=_env(**env))
            assert rc == 4 and "absent.sock" in err, (args, env, err)
        rc, _, err = await cli("status")  # nothing given: the default path
        assert rc == 4 and "/run/pubmon/pubmon.sock" in err


async def test_conflicting_flags_are_usage_errors() -> None:
    cases = {
        ("status", "--socket", "/x", "--host", "127.0.0.1"): "--socket and --host",
        ("status", "--port", "9090"): "--port goes with --host",
        ("status", "--tls-ca", "/x"): "go with --host",
    }
    for args, text in cases.items():
        rc, out, err = await cli(*args)
        assert rc == 64 and text in err and out == "", (args, err)


async def test_unreachable_sockets_say_why(tmp_path: Path) -> None:
    import socket

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listened on, closed: a daemon's leftover
    rc, _, err = await cli("status", "--socket", str(stale))
    assert rc == 4 and "nothing listens there" in err
    rc, _, err = await cli("status", "--socket", str(tmp_path))
    assert rc == 4 and "a directory, not the daemon's socket" in err


async def test_demo_prints_an_export_line_that_works() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", "demo",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            lines = [(await proc.stdout.readline()).decode() for _ in range(4)]
            while b"ready:" not in await proc.stderr.readline():
                pass
        (export,) = [x.strip() for x in lines if x.strip().startswith("export ")]
        name, value = export.removeprefix("export ").split("=", 1)
        assert name == "PUBMON_SOCKET"
        rc, out, err = await cli("status", env=_env(PUBMON_SOCKET=value))
        assert rc == 0 and "quotes" in out, err
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await proc.communicate()


# --- 2. usage errors ---------------------------------------------------------------------------


async def test_usage_errors_name_the_word_and_guess() -> None:
    cases = {
        ("stauts",): "unknown command 'stauts' (did you mean 'status'",
        ("status", "--jsn"): "unknown option '--jsn' (did you mean '--json'?)",
        ("tail", "feed", "-n", "abc"): "-n expects a number of lines, got 'abc'",
        ("status", "--timeout", "soon"): "--timeout expects seconds, got 'soon'",
        ("status", "--state", "runing"): "no state 'RUNING' (did you mean 'RUNNING'?)",
        ("signal", "feed", "HUPP"): "no signal named 'HUPP' (did you mean 'HUP'",
        ("signal", "feed"): "wrong arguments for pubmon signal",
        (): "a command is missing",
    }
    for args, text in cases.items():
        rc, out, err = await cli(*args)
        assert rc == 64 and text in err, (args, rc, err)
        assert "Argument(" not in err and "Option(" not in err and "Traceback" not in err
        assert out == ""


async def test_counters_json(tmp_path: Path) -> None:
    async with daemon(tmp_path, toml_publisher("feed", SLEEP), 1) as (_, sock):
        rc, out, err = await cli("counters", "publisher.feed.", "--json", "--socket", sock)
        assert rc == 0, err
        data = json.loads(out)
        assert data["publisher.feed.exits"] == 0 and all(
            k.startswith("publisher.feed.") for k in data
        )


# --- 3. names ----------------------------------------------------------------------------------


async def test_all_globs_programs_and_partial_results(tmp_path: Path) -> None:
    body = toml_publisher("feed", SLEEP, numprocs=3) + toml_publisher("news", SLEEP)
    async with daemon(tmp_path, body, 4) as (_, sock):

        async def names(*args: str) -> tuple[int, list[str], str]:
            rc, out, err = await cli("status", "--socket", sock, *args)
            return rc, [x.split()[0] for x in out.splitlines()[1:-1]], err

        assert (await names("all"))[:2] == (0, ["feed:0", "feed:1", "feed:2", "news"])
        assert (await names("feed:[12]"))[:2] == (0, ["feed:1", "feed:2"])
        assert (await names("n*", "feed:0"))[:2] == (0, ["feed:0", "news"])  # config order
        rc, shown, err = await names("feed", "nwes")
        assert (rc, shown) == (6, ["feed:0", "feed:1", "feed:2"])
        assert "no publisher named 'nwes' (did you mean 'news'?)" in err
        rc, out, err = await cli("stop", "feed:1", "nope", "--socket", sock)
        assert rc == 6 and out.strip() == "feed:1: STOPPED" and "'nope'" in err
        rc, out, _ = await cli("pid", "feed", "--socket", sock)
        assert rc == 0 and [x.split()[0] for x in out.splitlines()] == [
            "feed:0",
            "feed:1",
            "feed:2",
        ]


async def test_stop_and_start_are_idempotent(tmp_path: Path) -> None:
    async with daemon(tmp_path, toml_publisher("feed", SLEEP, numprocs=2), 2) as (_, sock):
        rc, out, err = await cli("start", "feed:0", "--socket", sock)
        assert (rc, out.strip()) == (0, "feed:0: already RUNNING"), err
        for _ in range(2):
            rc, out, err = await cli("stop", "feed", "--socket", sock)
            assert rc == 0, err
        assert sorted(out.splitlines()) == ["feed:0: already STOPPED", "feed:1: already STOPPED"]


async def test_tail_of_a_program_interleaves_its_instances_marked(tmp_path: Path) -> None:
    talk = [
        sys.executable,
        "-c",
        "import os; print('hello from', os.environ['PUBMON_PUBLISHER'], flush=True)",
    ]
    talk[-1] += "; import sys; print('oops', file=sys.stderr); import time; time.sleep(3600)"
    async with daemon(tmp_path, toml_publisher("talk", talk, numprocs=2), 2) as (_, sock):
        async with asyncio.timeout(20):
            while True:
                rc, out, err = await cli("tail", "talk", "-n", "10", "--socket", sock)
                assert rc == 0, err
                if out.count("\n") == 4:
                    break
                await asyncio.sleep(0.05)
        lines = out.splitlines()
        assert sorted(lines) == [
            "talk:0 | hello from talk:0",
            "talk:0 | stderr| oops",
            "talk:1 | hello from talk:1",
            "talk:1 | stderr| oops",
        ]
        rc, out, _ = await cli("tail", "talk:1", "--timestamps", "--socket", sock)
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} hello from talk:1", out.split("\n")[0]
        )


# --- 4. many at once ---------------------------------------------------------------------------


async def test_actions_on_many_run_concurrently(tmp_path: Path) -> None:
    body = toml_publisher("slow", SLEEP, numprocs=4, start_timeout=1)
    async with daemon(tmp_path, body, 4) as (_, sock):
        rc, out, err = await cli("restart", "slow", "--socket", sock)
        assert rc == 0, err
        assert sorted(out.splitlines(), key=lambda x: x[:6]) == [
            x for x in sorted(out.splitlines(), key=lambda x: x[:6]) if ": RUNNING pid " in x
        ]
        # One after the other, each would start 1 s (start_timeout) after the one before.
        started = [float(str(i["started_at"])) for i in await _status(sock, "slow")]
        assert max(started) - min(started) < 1.0, started


def _run_on_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; (rc, all it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pubmon", *args], stdout=slave, stderr=slave, env=_env()
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer is gone
                    break
                if not chunk:
                    break
                out += chunk
        return proc.wait(timeout=10), out.decode()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_progress_line_on_a_terminal_and_plain_lines_otherwise(tmp_path: Path) -> None:
    body = toml_publisher("ok", SLEEP, numprocs=3, start_timeout=0.5)
    body += toml_publisher("bad", FAIL, start_timeout=0.5, restart="never")
    async with daemon(tmp_path, body, 3) as (_, sock):
        rc, text = await asyncio.to_thread(_run_on_pty, ["restart", "all", "--socket", sock])
        assert rc == 1, text
        assert "\r\x1b[K" in text  # rewritten in place
        screen = [x.rsplit("\r\x1b[K", 1)[-1] for x in text.replace("\r\n", "\n").split("\n")]
        assert any(x.startswith("bad: ") for x in screen), screen  # the failure, named
        assert "restart: 3/4 RUNNING, 1 failed" in screen
        rc, out, err = await cli("restart", "all", "--socket", sock)  # not a terminal
        assert rc == 1 and "\r" not in out + err
        assert sorted(x.split(":")[0] for x in out.splitlines()) == ["ok", "ok", "ok"]
        assert err.startswith("bad: ")


async def test_no_wait_returns_at_once_and_timeout_ends_only_the_wait(tmp_path: Path) -> None:
    body = toml_publisher("slow", SLEEP, start_timeout=1.5)
    async with daemon(tmp_path, body, 1) as (_, sock):
        await _wait_state(sock, "slow", "RUNNING")
        rc, out, err = await cli("restart", "slow", "--no-wait", "--socket", sock)
        assert rc == 0 and out.startswith("slow: STARTING") and "not waiting" in out, err
        await _wait_state(sock, "slow", "RUNNING")
        rc, out, err = await cli("restart", "slow", "--timeout", "0.5", "--socket", sock)
        assert rc == 8 and "stopped waiting" in err and "goes on" in err, (rc, err)
        (info,) = await _status(sock, "slow")
        assert info["state"] == "STARTING"
        await _wait_state(sock, "slow", "RUNNING")  # the restart went on


# --- 5, 6. status and --json -------------------------------------------------------------------


async def test_status_order_summary_group_state_and_times(tmp_path: Path) -> None:
    body = toml_publisher("s", SLEEP, numprocs=11) + toml_publisher("bad", FAIL)
    body += "backoff = { initial = 30, max = 30 }\n"
    async with daemon(tmp_path, body, 11) as (_, sock):
        await _wait_state(sock, "bad", "BACKOFF")
        await cli("stop", "s:3", "--socket", sock)
        rc, out, err = await cli("status", "--socket", sock)
        assert rc == 0, err
        lines = out.splitlines()
        assert [x.split()[0] for x in lines[1:-1]] == [f"s:{i}" for i in range(11)] + ["bad"]
        assert lines[-1] == "12 publishers: 1 STOPPED, 10 RUNNING, 1 BACKOFF"
        rows = {x.split()[0]: x for x in lines[1:-1]}
        assert re.search(r" RUNNING +\d+ +0:00:\d\d ", rows["s:0"])
        assert re.search(r" STOPPED +- +since \d\d:\d\d:\d\d ", rows["s:3"])
        rc, out, _ = await cli("status", "--group", "--socket", sock)
        assert out.splitlines()[1:3] == [
            "s        11         1 STOPPED, 10 RUNNING",
            "bad      1          1 BACKOFF",
        ]
        rc, out, _ = await cli("status", "--state", "stopped,backoff", "--socket", sock)
        assert [x.split()[0] for x in out.splitlines()[1:-1]] == ["s:3", "bad"]
        # BACKOFF counts down from the deadline the daemon keeps.
        left = []
        async with asyncio.timeout(10):
            while len(set(left)) < 2:
                rc, out, _ = await cli("status", "bad", "--socket", sock)
                left.append(float(re.findall(r"restart in ([0-9.]+) s", out)[0]))
        assert left == sorted(left, reverse=True) and 0 < left[-1] < 40


async def test_json_is_versioned_with_the_daemon_and_exit_apart(tmp_path: Path) -> None:
    body = toml_publisher("feed", SLEEP) + toml_publisher("bad", FAIL)
    body += "backoff = { initial = 30, max = 30 }\n"
    async with daemon(tmp_path, body, 1) as (d, sock):
        await _wait_state(sock, "bad", "BACKOFF")
        os.kill(d.publisher_pids()["feed"], signal.SIGKILL)
        async with asyncio.timeout(20):
            while True:
                rc, out, err = await cli("status", "--json", "--socket", sock)
                data = json.loads(out)
                feed, bad = data["publishers"]
                if feed["exit_signal"] and feed["state"] == "RUNNING":
                    break
                await asyncio.sleep(0.05)
        assert data["format"] == 1
        daemon_ = data["daemon"]
        assert daemon_["pid"] == d.pid and daemon_["config"] == str(tmp_path / "pubmon.toml")
        assert daemon_["last_reload_error"] is None and daemon_["uptime"] > 0
        assert (feed["exit_code"], feed["exit_signal"]) == (None, "SIGKILL")
        assert feed["health"] == "NONE" and feed["probe"] == "none"
        assert abs(float(feed["started_at"]) + float(feed["uptime"]) - time.time()) < 5
        assert (bad["exit_code"], bad["exit_signal"]) == (3, None)
        assert float(bad["backoff_until"]) > time.time()


# --- 7. new commands ---------------------------------------------------------------------------


async def test_signal_pid_log_and_reload_dry_run(tmp_path: Path) -> None:
    trap = [
        sys.executable, "-c",
        "import signal, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: print('got USR1', flush=True))\n"
        "print('up', flush=True)\n"
        "while True: time.sleep(1)\n",
    ]  # fmt: skip
    async with daemon(tmp_path, toml_publisher("trap", trap), 1) as (d, sock):
        rc, out, _ = await cli("pid", "trap", "--socket", sock)
        assert rc == 0 and int(out) == d.publisher_pids()["trap"]
        rc, out, _ = await cli("pid", "--socket", sock)
        assert int(out) == d.pid
        rc, out, err = await cli("signal", "trap", "usr1", "--socket", sock)
        assert rc == 0 and out.strip() == f"trap: usr1 sent to pid {d.publisher_pids()['trap']}"
        async with asyncio.timeout(10):
            while "got USR1" not in (await cli("tail", "trap", "--socket", sock))[1]:
                await asyncio.sleep(0.05)
        rc, out, _ = await cli("log", "-n", "50", "--socket", sock)
        assert rc == 0 and "signalPublisher called by uid" in out and "SIGUSR1 sent" in out
        config = tmp_path / "pubmon.toml"
        config.write_text(config.read_text() + toml_publisher("extra", SLEEP))
        rc, out, err = await cli("reload", "--dry-run", "--socket", sock)
        assert rc == 0, err
        assert "extra: would be added" in out and "nothing applied" in out
        assert [x["name"] for x in await _status(sock)] == ["trap"]  # applied nothing
        await cli("stop", "trap", "--socket", sock)
        rc, _, err = await cli("signal", "trap", "HUP", "--socket", sock)
        assert rc == 7 and "no process to signal" in err


def test_bash_completion_completes_commands_and_names(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pubmon").write_text(f'#!/bin/sh\nexec {sys.executable} -m pubmon "$@"\n')
    (bin_dir / "pubmon").chmod(0o755)
    script = (
        'eval "$(pubmon completion bash)"\n'
        "complete -p pubmon\n"
        'COMP_WORDS=(pubmon re); COMP_CWORD=1; _pubmon; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(pubmon status --js); COMP_CWORD=2; _pubmon; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(pubmon stop fe); COMP_CWORD=2; _pubmon; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(pubmon clear feed:); COMP_CWORD=2; _pubmon; echo "${COMPREPLY[*]}"\n'
    )
    config = tmp_path / "pubmon.toml"
    config.write_text(
        daemon_header(tmp_path, socket=True) + toml_publisher("feed", SLEEP, numprocs=2)
    )

    async def go() -> str:
        async with run_daemon(config) as d:
            await d.wait_publishers(2)
            env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", PUBMON_CONFIG=str(config))
            done = await asyncio.to_thread(
                subprocess.run, ["bash", "--norc", "-c", script], env=env,
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            return done.stdout

    out = asyncio.run(go()).splitlines()
    assert out == [
        "complete -F _pubmon pubmon", "restart resume reload", "--json", "feed:0 feed:1 feed",
        "feed:0 feed:1",
    ]  # fmt: skip


def test_man_page_is_current_and_man_renders_it_without_warnings(tmp_path: Path) -> None:
    from manpage import manpage  # tools/, on pytest's pythonpath

    shipped = SRC / "data" / "pubmon.1"
    assert shipped.read_text() == manpage(), "python tools/manpage.py > src/pubmon/data/pubmon.1"
    if shutil.which("man") is None:
        pytest.fail("man is missing: apt-get install man-db")
    done = subprocess.run(
        ["man", "--warnings", "-l", str(shipped)], capture_output=True, text=True,
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "pubmon signal NAME SIG [options]" in done.stdout and "PUBMON_SOCKET" in done.stdout


# --- 9. config ---------------------------------------------------------------------------------


async def test_environment_values_take_port_name_and_index(tmp_path: Path) -> None:
    show = ["/bin/sh", "-c", 'echo "$INSTANCE $WHO {{x}}"; exec sleep 3600']
    body = toml_publisher(
        "api", show, numprocs=2, port=free_port(),
        environment={"INSTANCE": "{index}", "WHO": "{name}@{port}", "RAW": "{{x}}"},
    )  # fmt: skip
    async with daemon(tmp_path, body, 2) as (_, sock):
        port = int(body.split("port = ")[1].split()[0])
        want = {"api:0": f"0 api:0@{port} {{x}}", "api:1": f"1 api:1@{port + 1} {{x}}"}
        async with asyncio.timeout(20):
            for name, text in want.items():
                while (await cli("tail", name, "--socket", sock))[1].strip() != text:
                    await asyncio.sleep(0.05)
    (tmp_path / "bad.toml").write_text(
        toml_publisher("api", SLEEP, environment={"X": "{nope}"}).replace(
            "[publisher", "[publisher", 1
        )
    )
    rc, _, err = await cli("check-config", str(tmp_path / "bad.toml"))
    assert rc == 2 and "publisher.api.environment.X: '{nope}': unknown placeholder" in err


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tcp_listeners(pid: int) -> int:
    """How many listening TCP sockets the process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            n += cols[3] == "0A" and cols[9] in inodes  # 0A: LISTEN
    return n


async def test_no_tcp_listener_unless_monitor_asks_for_one(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(f'[control]\nsocket = "{tmp_path / "s.sock"}"\n' + toml_publisher("f", SLEEP))
    async with run_daemon(config) as d:
        assert _tcp_listeners(d.pid) == 0
    config.write_text(config.read_text() + '[monitor]\nlisten = "127.0.0.1:0"\n')
    async with run_daemon(config) as d:
        assert _tcp_listeners(d.pid) == 1


async def test_tail_follow_says_when_the_daemon_goes_and_comes_back(tmp_path: Path) -> None:
    tick = [
        sys.executable,
        "-c",
        "import time\nwhile True: print('t', flush=True); time.sleep(0.1)",
    ]
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path, socket=True) + toml_publisher("t", tick))
    sock = str(tmp_path / "pubmon.sock")
    proc = None
    try:
        async with run_daemon(config) as d:
            await d.wait_publishers(1)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pubmon", "tail", "t", "-f", "--socket", sock,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
            )  # fmt: skip
            assert proc.stdout is not None and proc.stderr is not None
            async with asyncio.timeout(20):
                assert await proc.stdout.readline() == b"t\n"
            d.signal(signal.SIGTERM)
            await d.wait_exit()
        async with asyncio.timeout(20):
            line = (await proc.stderr.readline()).decode()
        assert "lost the daemon at" in line and sock in line
        async with run_daemon(config) as d:
            async with asyncio.timeout(20):
                back = (await proc.stderr.readline()).decode()
            assert "is back; following again" in back
            d.signal(signal.SIGTERM)
            await d.wait_exit()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_details_say_what_the_probe_saw_for_every_kind(tmp_path: Path) -> None:
    port = free_port()
    serve = [
        sys.executable, "-c",
        "import socket, sys, time\n"
        "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
        "while True: s.accept()[0].close()\n",
        "{port}",
    ]  # fmt: skip
    body = toml_publisher("web", serve, port=port, start_timeout=10)
    body += 'probe = { kind = "tcp", interval = 0.2, timeout = 0.2 }\n'
    async with daemon(tmp_path, body, 1) as (_, sock):
        info = await _wait_state(sock, "web", "RUNNING")
        want = f"accepts connections on 127.0.0.1:{port}"
        assert info["details"] == want and info["health"] == "HEALTHY"
        async with asyncio.timeout(10):  # and after later rounds, the same
            while (await _status(sock, "web"))[0]["uptime"] < 0.5:  # type: ignore[operator]
                await asyncio.sleep(0.05)
        assert (await _status(sock, "web"))[0]["details"] == want


def test_daemon_log_ring_keeps_the_last_records_with_tail_log_cursor_rules() -> None:
    import logging

    from pubmon.service.daemonlog import DaemonLogRing

    ring = DaemonLogRing(size=3)
    log = logging.getLogger("pubmon.test-ring")
    log.addHandler(ring)
    log.propagate = False
    try:
        for i in range(5):
            log.warning("line %d", i)
    finally:
        log.removeHandler(ring)
    recs, cursor, missed = ring.tail(0, 10)  # from the oldest kept: 2 fell out
    assert [r.text for r in recs] == [f"pubmon.test-ring: line {i}" for i in (2, 3, 4)]
    assert (cursor, missed, recs[0].level) == (5, 2, "WARNING")
    assert [r.seq for r in ring.tail(-2, 10)[0]] == [4, 5]  # the last two
    assert ring.tail(5, 10) == ([], 5, 0)  # nothing new
    assert ring.tail(99, 10) == ([], 5, 0)  # a cursor from before a restart resynchronises
    assert [r.seq for r in ring.tail(3, 1)[0]] == [4]


def test_zsh_completion_loads_by_eval_and_from_fpath(tmp_path: Path) -> None:
    if shutil.which("zsh") is None:
        pytest.fail("zsh is missing: make apt-cli (apt-get install zsh)")
    script = subprocess.run(
        [sys.executable, "-m", "pubmon", "completion", "zsh"],
        capture_output=True, text=True, check=True, env=_env(),
    ).stdout  # fmt: skip
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "_pubmon").write_text(script)
    subprocess.run(["zsh", "-n", str(tmp_path / "fp" / "_pubmon")], check=True)
    init = "autoload -U compinit; compinit -u -D"
    for setup in (
        f'{init}; eval "$(cat {tmp_path}/fp/_pubmon)"',
        f"fpath=({tmp_path}/fp $fpath); {init}",
    ):
        done = subprocess.run(
            ["zsh", "-f", "-c", f"{setup}; print -r -- $_comps[pubmon]"],
            capture_output=True, text=True, timeout=60, env={**_env(), "HOME": str(tmp_path)},
        )  # fmt: skip
        assert (done.returncode, done.stdout, done.stderr) == (0, "_pubmon\n", ""), setup


async def test_reload_no_wait_answers_before_added_publishers_settle(tmp_path: Path) -> None:
    async with daemon(tmp_path, toml_publisher("feed", SLEEP), 1) as (_, sock):
        config = tmp_path / "pubmon.toml"
        good = config.read_text()
        config.write_text(good + "[publisher.broken\n")
        rc, _, err = await cli("reload", "--no-wait", "--socket", sock)
        assert rc == 2 and "pubmon.toml" in err  # a bad file is still refused at once
        config.write_text(good + toml_publisher("slow", SLEEP, start_timeout=30))
        rc, out, err = await cli("reload", "--no-wait", "--socket", sock)
        assert rc == 0 and "slow: added" in out and "still applying" in out, err
        (info,) = await _status(sock, "slow")
        assert info["state"] == "STARTING"  # the reload answered before it settled

"""`pubmon daemon` as a real process: kill -9, SIGTERM with many publishers, SIGHUP reloads,
a bad config, operations that interleave with a shutdown. Its signal table is tested in
test_signals.py, its lock in test_lock.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from daemons import (
    IGNORE_TERM,
    SLEEP,
    daemon_header,
    run_daemon,
    toml_publisher,
    wait_file_lines,
    write_config,
)
from procs import alive, wait_gone


async def test_kill_9_of_the_daemon_takes_every_publisher_with_it(tmp_path: Path) -> None:
    body = "".join(toml_publisher(f"p{i}", SLEEP) for i in range(20))
    async with run_daemon(write_config(tmp_path, body)) as d:
        pids = await d.wait_publishers(20)
        d.signal(signal.SIGKILL)
        await d.wait_exit()
        await wait_gone(list(pids.values()), timeout=10)


async def test_sigterm_with_100_publishers_stops_all_and_exits_0(tmp_path: Path) -> None:
    body = "".join(toml_publisher(f"p{i}", SLEEP) for i in range(100))
    async with run_daemon(write_config(tmp_path, body)) as d:
        pids = await d.wait_publishers(100)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
        assert not any(alive(p) for p in pids.values())


async def test_sighup_touches_only_what_changed(tmp_path: Path) -> None:
    old = (
        toml_publisher("keep", SLEEP)
        + toml_publisher("change", SLEEP)
        + toml_publisher("remove", SLEEP)
        + toml_publisher("policy", SLEEP, stop_timeout=2)
    )
    new = (
        toml_publisher("keep", SLEEP)
        + toml_publisher("change", ["sleep", "3601"])
        + toml_publisher("add", SLEEP)
        + toml_publisher("policy", SLEEP, stop_timeout=3)
    )
    config = write_config(tmp_path, old)
    async with run_daemon(config) as d:
        before = await d.wait_publishers(4)
        config.write_text(daemon_header(tmp_path) + new)
        d.signal(signal.SIGHUP)
        line = await d.wait_log("reloaded")
        assert "1 added, 1 removed, 1 restarted, 1 updated, 1 unchanged" in line
        after = await d.wait_publishers(4)
        assert set(after) == {"keep", "change", "add", "policy"}
        assert after["keep"] == before["keep"]
        assert after["policy"] == before["policy"]
        assert after["change"] != before["change"]
        assert not alive(before["remove"]) and not alive(before["change"])


async def test_broken_config_on_sighup_leaves_everything_running(tmp_path: Path) -> None:
    config = write_config(tmp_path, toml_publisher("a", SLEEP) + toml_publisher("b", SLEEP))
    async with run_daemon(config) as d:
        before = await d.wait_publishers(2)
        config.write_text(daemon_header(tmp_path) + "[publisher.a]\ncommand = 42\n")
        d.signal(signal.SIGHUP)
        line = await d.wait_log("reload failed")
        assert "publisher.a.command" in line or any("publisher.a.command" in s for s in d.stderr)
        assert d.publisher_pids() == before
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0


async def test_bad_config_at_start_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[publisher.a]\ncommand = []\nbogus = 1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", "daemon", "--config", str(config),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert str(config).encode() in err
    assert b"publisher.a.bogus" in err and b"publisher.a.command" in err


# --- operations that interleave with a shutdown ------------------------------------------------


async def test_sigterm_during_a_reload_that_removes_and_adds_stops_in_order(
    tmp_path: Path,
) -> None:
    # The reload is still waiting for "slow" (it ignores SIGTERM) to stop when SIGTERM comes:
    # the reload is cut short, and the publisher it added is stopped in order like the rest.
    old = toml_publisher("slow", IGNORE_TERM, stop_timeout=1) + toml_publisher("keep", SLEEP)
    config = write_config(tmp_path, old)
    async with run_daemon(config) as d:
        await d.wait_publishers(2)
        await wait_file_lines(tmp_path / "logs" / "slow.log", 1)
        config.write_text(
            daemon_header(tmp_path) + toml_publisher("keep", SLEEP) + toml_publisher("new", SLEEP)
        )
        d.signal(signal.SIGHUP)
        await d.wait_log("RUNNING -> STOPPING")  # the reload stops "slow"
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    text = "\n".join(d.stderr)
    assert "Traceback" not in text and "never awaited" not in text, text
    # "new" either never started, or was stopped in order like the rest: not cut down by the
    # cancellation of its runner.
    if "new spawned pid" in text:
        assert re.search(r"new pid \S+: STOPPING -> STOPPED", text), text


async def test_reload_and_start_are_refused_once_stopping(tmp_path: Path) -> None:
    body = toml_publisher("stubborn", IGNORE_TERM, stop_timeout=5) + toml_publisher("b", SLEEP)
    async with run_daemon(
        write_config(
            tmp_path,
            body,
        )
    ) as d:
        await d.wait_publishers(2)
        await wait_file_lines(tmp_path / "logs" / "stubborn.log", 1)
        d.signal(signal.SIGTERM)
        await d.wait_log("stopping gracefully")
        d.signal(signal.SIGHUP)
        await d.wait_log("reload refused: pubmon is stopping")
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0


async def test_a_child_that_outlives_sigkill_is_reported_and_the_daemon_still_ends(
    tmp_path: Path,
) -> None:
    # A daemon without CAP_KILL cannot signal a publisher that runs as another user: to the
    # daemon, that child never dies, like one in D state on hung storage. The stop gives up
    # KILL_BOUND after its SIGKILL, names the child, and the daemon exits 1 all the same.
    body = toml_publisher("unkillable", SLEEP, user="nobody", stop_timeout=0.2)
    config = write_config(tmp_path, body)
    config.write_text(config.read_text().replace("shutdown_timeout = 30", "shutdown_timeout = 1"))
    for p in (tmp_path, tmp_path / "logs"):
        p.mkdir(exist_ok=True)
        p.chmod(0o755)
    async with run_daemon(config, wrap=("setpriv", "--bounding-set", "-kill", "--")) as d:
        pids = await d.wait_publishers(1)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit(timeout=30) == 1
        line = await d.wait_log("leaving behind")
        assert f"unkillable (pid {pids['unkillable']}" in line
        assert "has not exited 10 s after SIGKILL (/proc state:" in line
        # Not even its parent-death signal reaches it: the kernel sends that with the dying
        # parent's credentials. Root (the test) ends it.
        assert alive(pids["unkillable"])
        os.kill(pids["unkillable"], signal.SIGKILL)
        await wait_gone([pids["unkillable"]], timeout=5)

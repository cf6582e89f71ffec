"""The daemon's signal handling (pubmon.daemon.signals) on a real `pubmon daemon`: every stop
signal stops gracefully and a second one kills at once, SIGUSR1 reopens the log files, and
signals the parent left ignored are handled and not passed on to publishers. SIGHUP reloads
are in test_daemon.py (what a reload touches) and test_faults.py (a SIGHUP storm)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest

from daemons import IGNORE_TERM, SLEEP, run_daemon, toml_publisher, wait_file_lines, write_config
from procs import alive


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF])
async def test_every_stop_signal_stops_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    async with run_daemon(write_config(tmp_path, toml_publisher("a", SLEEP))) as d:
        pids = await d.wait_publishers(1)
        d.signal(sig)
        assert await d.wait_exit() == 0
        assert not alive(pids["a"])
        await d.wait_log(f"{sig.name}: stopping gracefully")


async def test_second_sigterm_kills_at_once(tmp_path: Path) -> None:
    body = toml_publisher("stubborn", IGNORE_TERM, stop_timeout=60)
    async with run_daemon(write_config(tmp_path, body)) as d:
        pids = await d.wait_publishers(1)
        await wait_file_lines(tmp_path / "logs" / "stubborn.log", 1)
        d.signal(signal.SIGTERM)
        await d.wait_log("stopping gracefully")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
        assert time.monotonic() - t0 < 5  # not the 60 s stop_timeout
        assert not alive(pids["stubborn"])
        await d.wait_log("killing every publisher now")


async def test_sigusr1_reopens_log_files(tmp_path: Path) -> None:
    talker = [
        sys.executable,
        "-c",
        "import sys, time\n"
        "for line in sys.stdin: pass\n"  # stdin is /dev/null: ends at once
        "i = 0\n"
        "while True:\n"
        "    print(i, flush=True); i += 1; time.sleep(0.01)\n",
    ]
    async with run_daemon(write_config(tmp_path, toml_publisher("t", talker))) as d:
        log = tmp_path / "logs" / "t.log"
        await wait_file_lines(log, 3)
        log.rename(tmp_path / "logs" / "t.log.old")
        d.signal(signal.SIGUSR1)
        await d.wait_log("log files reopened")
        await wait_file_lines(log, 3)
        old = (tmp_path / "logs" / "t.log.old").read_text().split()
        new = log.read_text().split()
        # nothing lost or repeated across the reopen
        numbers = [int(x) for x in old + new]
        assert numbers[: len(numbers) - 1] == list(range(numbers[0], numbers[0] + len(numbers) - 1))


async def test_inherited_ignored_signals_do_not_reach_publishers(tmp_path: Path) -> None:
    sigign = ["sh", "-c", "grep SigIgn /proc/self/status"]
    config = write_config(tmp_path, toml_publisher("s", sigign, restart="never"))
    # A daemon started by a shell with SIGINT and SIGTERM ignored, like a background job.
    daemon = f"{sys.executable} -m pubmon daemon --config {config}"
    script = f"trap '' INT TERM USR1 HUP QUIT 40; exec {daemon}"
    proc = await asyncio.create_subprocess_exec("sh", "-c", script, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_file_lines(tmp_path / "logs" / "s.log", 1)
        text = (tmp_path / "logs" / "s.log").read_text()
        ignored = int(text.split()[1], 16)
        # Signals 32 and 33 belong to glibc (make starts recipes with them ignored; nothing
        # but a raw syscall could reset them, and nothing but glibc uses them).
        assert ignored & ~((1 << 31) | (1 << 32)) == 0, text
        proc.send_signal(signal.SIGTERM)  # handled, though it was ignored at exec
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.communicate()

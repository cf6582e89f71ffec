"""The single-daemon lock (pubmon.daemon.lock): nobody else can take or block it; a second
daemon on the same config exits 3 naming the first one's pid, also after an editor replaced
the config file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import pytest

from daemons import daemon_header, run_daemon, toml_publisher, write_config
from pubmon.daemon.lock import acquire_lock, lock_dir
from pubmon.errors import StartupError

SLEEP = ["sleep", "3600"]
NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")
SYSTEM_PY = "/usr/bin/python3"

# Run as nobody: bind the old abstract lock name, then try everything a squatter could do with
# the new lock, report each outcome on one line, and hold on to what it got until killed.
SQUAT = """
import errno, hashlib, os, socket, sys, time
real, where = sys.argv[1], sys.argv[2]
name = hashlib.sha256(real.encode()).hexdigest()[:40]
held = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
held.bind("\\0pubmon-lock:" + name)
got = ["abstract=bound"]
def attempt(what, fn):
    try:
        fn()
        got.append(what + "=ok")
    except OSError as e:
        got.append(what + "=" + errno.errorcode[e.errno])
attempt("mkdir-parent", lambda: os.mkdir(os.path.dirname(where), 0o777))
attempt("mkdir", lambda: os.mkdir(where, 0o777))
lock, files = where + "/" + name + ".lock", []
attempt("create", lambda: files.append(os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)))
attempt("open", lambda: files.append(os.open(lock, os.O_RDONLY)))
print(" ".join(got), flush=True)
time.sleep(3600)
"""


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as nobody or chown needs root")


@needs_root
async def test_the_daemon_starts_while_nobody_squats_its_lock(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path) + toml_publisher("a", SLEEP))
    real = os.path.realpath(config)
    squatter = await asyncio.create_subprocess_exec(
        *NOBODY, SYSTEM_PY, "-S", "-c", SQUAT, real, lock_dir(),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert squatter.stdout is not None
        async with asyncio.timeout(10):
            report = (await squatter.stdout.readline()).decode().split()
        assert report[0] == "abstract=bound"  # the name that used to block the daemon
        assert not [r for r in report[1:] if r.endswith("=ok")], report
        async with run_daemon(config) as d:  # waits for "ready:"
            await d.wait_publishers(1)
            lock = Path(lock_dir()) / (hashlib.sha256(real.encode()).hexdigest()[:40] + ".lock")
            assert lock.read_text().split("\n")[0] == str(d.pid)
            st = lock.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
            assert (Path(lock_dir()).stat().st_mode & 0o777) == 0o700
    finally:
        squatter.kill()
        await squatter.wait()


async def test_a_second_daemon_exits_3_naming_the_first(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path) + toml_publisher("a", SLEEP))
    async with run_daemon(config) as d:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pubmon", "daemon", "--config", str(config),
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 3
        text = err.decode()
        assert "another pubmon daemon is already running" in text
        assert f"pid {d.pid} holds the lock" in text
        assert str(config) in text
        assert d.proc.returncode is None


async def test_the_lock_survives_an_editor_replacing_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, toml_publisher("a", SLEEP))
    async with run_daemon(config) as d:
        await d.wait_publishers(1)
        fresh = tmp_path / "pubmon.toml.new"
        fresh.write_text(config.read_text())
        fresh.rename(config)  # a new inode under the same name, as editors save
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pubmon", "daemon", "--config", str(config),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 3 and b"already running" in err
        assert d.proc.returncode is None


@needs_root
def test_a_lock_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    where = tmp_path / "locks"
    where.mkdir(mode=0o700)
    os.chown(where, 65534, 65534)
    with pytest.raises(StartupError, match=rf"{where} is owned by uid 65534 .*fix: chown root"):
        acquire_lock(str(tmp_path / "pubmon.toml"), str(where))
    os.chown(where, 0, 0)
    where.chmod(0o777)
    with pytest.raises(StartupError, match=rf"{where} is writable by group and others"):
        acquire_lock(str(tmp_path / "pubmon.toml"), str(where))


@needs_root
def test_a_symlink_in_place_of_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    where = tmp_path / "locks"
    where.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    config = str(tmp_path / "pubmon.toml")
    name = hashlib.sha256(os.path.realpath(config).encode()).hexdigest()[:40] + ".lock"
    (where / name).symlink_to(victim)
    with pytest.raises(StartupError, match="cannot open the daemon lock"):
        acquire_lock(config, str(where))
    assert victim.read_text() == "precious\n"
    (where / name).unlink()
    held = acquire_lock(config, str(where))
    try:
        with pytest.raises(StartupError, match=f"pid {os.getpid()} holds the lock"):
            acquire_lock(config, str(where))
    finally:
        held.close()
    assert not (where / name).exists()  # removed while still held, then released
    acquire_lock(config, str(where)).close()


@needs_root
def test_a_lock_directory_that_cannot_be_made_is_a_startup_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "locks"
    with pytest.raises(StartupError, match=f"lock in {where}: {where.parent} is not a directory"):
        acquire_lock(str(tmp_path / "pubmon.toml"), str(where))

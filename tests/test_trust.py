"""Who may change what a root daemon runs, obeys or writes in: the rules for one path
(pubmon.host.trust), then the daemon refusing (pubmon.config.trust), with the path and the fix
named, files and directories that uid 65534 (nobody) made or can change."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import daemon_header, run_daemon, toml_publisher
from pubmon.config.load import check_config_main
from pubmon.host.trust import check_path, make_trusted_dirs, script_interpreter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as nobody needs root")

NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")
SLEEP = ["/bin/sleep", "3600"]


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def public() -> Iterator[Path]:
    """A root-owned 0755 directory under /tmp holding a sticky 1777 `shared` one, as /tmp is:
    nobody can reach it (pytest's tmp_path is 0700) and create entries in `shared`."""
    base = Path(tempfile.mkdtemp(prefix="pubmon-trust-"))
    try:
        base.chmod(0o755)
        (base / "shared").mkdir()
        (base / "shared").chmod(0o1777)
        yield base
    finally:
        shutil.rmtree(base)


# --- the rules for one path ------------------------------------------------------------------


def test_pytest_tmp_layout_is_trusted(tmp_path: Path) -> None:
    # /tmp (1777 root, sticky) / pytest-of-root (0700 root) / ...: the sticky ancestor is fine.
    f = tmp_path / "pubmon.toml"
    f.write_text("")
    assert check_path(str(f)) is None
    assert check_path(str(tmp_path / "not" / "yet")) is None  # judged up to what exists


def test_owner_and_modes_of_the_path_and_each_directory_above(tmp_path: Path) -> None:
    d = tmp_path / "etc"
    d.mkdir()
    f = d / "pubmon.toml"
    f.write_text("")
    os.chown(f, 65534, 65534)
    bad = check_path(str(f))
    assert bad is not None and bad.path == str(f)
    assert str(bad) == f"{f} is owned by uid 65534 (nobody) (fix: chown root {f})"
    os.chown(f, 0, 0)
    f.chmod(0o664)
    assert str(check_path(str(f))) == f"{f} is writable by group (mode 0664) (fix: chmod g-w {f})"
    f.chmod(0o644)
    d.chmod(0o757)
    assert str(check_path(str(f))) == f"{d} is writable by others (mode 0757) (fix: chmod o-w {d})"
    d.chmod(0o1777)  # sticky: fine above the path, not as the path itself
    assert check_path(str(f)) is None
    assert "writable by group and others (mode 1777)" in str(check_path(str(d)))


def test_symlinks_are_judged_and_followed(tmp_path: Path, public: Path) -> None:
    target = tmp_path / "real.toml"
    target.write_text("")
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert check_path(str(link)) is None
    os.chown(target, 65534, 65534)  # what the link leads to counts
    assert check_path(str(link)) == check_path(str(target)) != None  # noqa: E711
    os.chown(target, 0, 0)
    # A link that nobody made in a sticky directory: nobody may replace it at will.
    as_nobody("ln", "-s", str(target), str(public / "shared" / "evil.toml"))
    bad = check_path(str(public / "shared" / "evil.toml"))
    assert bad is not None and bad.path == str(public / "shared" / "evil.toml")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "symlink loop" in str(check_path(str(loop)))


def test_make_trusted_dirs_creates_0755_and_refuses_what_nobody_made(public: Path) -> None:
    old = os.umask(0o077)
    try:
        assert make_trusted_dirs(str(public / "run" / "pubmon"), 0o755) is None
    finally:
        os.umask(old)
    for d in (public / "run", public / "run" / "pubmon"):
        assert (d.stat().st_mode & 0o7777, d.stat().st_uid) == (0o755, 0)
    as_nobody("mkdir", str(public / "shared" / "run"))
    bad = make_trusted_dirs(str(public / "shared" / "run" / "pubmon"))
    assert bad is not None and bad.path == str(public / "shared" / "run")
    assert not (public / "shared" / "run" / "pubmon").exists()  # nothing made inside it


def test_script_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/bin/sh -e\n")
    assert script_interpreter(str(script)) == "/bin/sh"
    script.write_text("#!/usr/bin/env -S sh -e\n")
    assert script_interpreter(str(script)) == shutil.which("sh")
    script.write_text("echo no\n")
    assert script_interpreter(str(script)) is None


# --- the daemon: refusal at start, reload and check-config -----------------------------------


async def _refused(config: Path, *needles: str) -> str:
    """Start the daemon on `config`: it must exit 2 with every needle in its stderr; so must
    check-config."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", "daemon", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 2, text
    for needle in needles:
        assert needle in text, text
    check = subprocess.run(
        [sys.executable, "-m", "pubmon", "check-config", str(config)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 2
    for needle in needles:
        assert needle in check.stderr, check.stderr
    return text


async def test_a_config_file_nobody_can_change_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path) + toml_publisher("a", SLEEP, user="nobody"))
    config.chmod(0o666)
    await _refused(config, f"{config} is writable by group and others (mode 0666)",
                   f"chmod go-w {config}")  # fmt: skip
    config.chmod(0o644)
    os.chown(config, 65534, 65534)
    await _refused(config, f"{config} is owned by uid 65534 (nobody)", f"chown root {config}")


async def test_what_a_root_publisher_runs_must_be_roots(tmp_path: Path, public: Path) -> None:
    shared = public / "shared"
    as_nobody("sh", "-c", f"printf '#!/bin/sh\\nexec sleep 3600\\n' > {shared}/run.sh")
    as_nobody("chmod", "755", str(shared / "run.sh"))
    config = tmp_path / "pubmon.toml"
    config.write_text(daemon_header(tmp_path) + toml_publisher("a", [str(shared / "run.sh")]))
    await _refused(
        config,
        f"publisher.a.command: {shared / 'run.sh'} is owned by uid 65534 (nobody)",
        "it runs as root",
    )
    # The interpreter of a root-owned script, and a root publisher's directory.
    interp = shared / "interp"
    as_nobody("cp", "/bin/sh", str(interp))
    script = tmp_path / "run.sh"
    script.write_text(f"#!{interp}\nsleep 3600\n")
    script.chmod(0o755)
    config.write_text(
        daemon_header(tmp_path)
        + toml_publisher("a", [str(script)])
        + toml_publisher("b", SLEEP, directory=str(shared))
    )
    await _refused(
        config,
        f"publisher.a.command: {interp} is owned by uid 65534",
        f"it is the interpreter of {script}, run as root",
        f"publisher.b.directory: {shared} is writable by group and others (mode 1777)",
    )
    # Run as nobody, the same files are nobody's business: accepted.
    config.write_text(
        daemon_header(tmp_path)
        + toml_publisher("a", [str(shared / "run.sh")], user="nobody", directory="/")
    )
    async with run_daemon(config) as d:
        await d.wait_publishers(1)


async def test_log_dir_and_socket_dir_that_nobody_made_are_refused(
    tmp_path: Path, public: Path
) -> None:
    shared = public / "shared"
    as_nobody("mkdir", str(shared / "logs"), str(shared / "run"))
    body = toml_publisher("a", SLEEP, user="nobody", directory="/")
    config = tmp_path / "pubmon.toml"
    config.write_text(
        f'[daemon]\nlog_dir = "{shared / "logs"}"\n[control]\nsocket = "{shared / "run" / "s"}"\n'
        '[monitor]\nlisten = ""\n' + body
    )
    await _refused(
        config,
        f"daemon.log_dir: {shared / 'logs'} is owned by uid 65534 (nobody)",
        f"control.socket: {shared / 'run'} is owned by uid 65534 (nobody)",
    )
    # Directories the daemon creates itself in a trusted place are fine (0755 for the socket's).
    config.write_text(
        f'[daemon]\nlog_dir = "{tmp_path / "logs"}"\n'
        f'[control]\nsocket = "{tmp_path / "run" / "pubmon.sock"}"\n[monitor]\nlisten = ""\n' + body
    )
    async with run_daemon(config) as d:
        await d.wait_publishers(1)
        assert (tmp_path / "run").stat().st_mode & 0o7777 == 0o755
        # The socket directory handed to nobody while the daemon runs: a reload is refused.
        os.chown(tmp_path / "run", 65534, 65534)
        d.signal(signal.SIGHUP)
        line = await d.wait_log("reload failed")
        assert f"{tmp_path / 'run'} is owned by uid 65534" in line + "\n".join(d.stderr)
        assert d.proc.returncode is None


async def test_root_publishers_and_unknown_users_are_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pubmon.toml"
    config.write_text(
        daemon_header(tmp_path)
        + toml_publisher("rooted", SLEEP)
        + toml_publisher("ghost", SLEEP, user="pubmon-no-such-user")
    )
    assert check_config_main(str(config)) == 0
    _, err = capsys.readouterr()
    assert f"warning: {config}: publisher.rooted: no `user`: it runs as root" in err
    assert "publisher.ghost.user: no user 'pubmon-no-such-user' on this host" in err
    async with run_daemon(config) as d:  # the daemon logs the same at start
        await d.wait_log("publisher.rooted: no `user`: it runs as root")


def test_the_socket_is_never_placed_in_a_directory_nobody_made(public: Path) -> None:
    from pubmon.thrift.server import _claim_socket_path

    as_nobody("mkdir", str(public / "shared" / "run"))
    with pytest.raises(OSError, match=rf"{public / 'shared' / 'run'} is owned by uid 65534"):
        _claim_socket_path(str(public / "shared" / "run" / "pubmon.sock"))
    _claim_socket_path(str(public / "run" / "pubmon.sock"))  # made 0755, root's
    assert (public / "run").stat().st_mode & 0o7777 == 0o755


def test_dot_dot_after_a_symlink_is_resolved_as_the_kernel_does(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "a" / "b" / "f").write_text("")
    (tmp_path / "x" / "f").write_text("")
    os.chown(tmp_path / "a" / "b" / "f", 65534, 65534)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    # link/../b/f is a/b/f for the kernel (nobody's), not tmp_path/b/f (missing, no verdict).
    assert check_path(str(tmp_path / "link" / ".." / "b" / "f")) is not None
    (tmp_path / "rel").symlink_to("a/b/../../x")
    assert check_path(str(tmp_path / "rel" / "f")) is None

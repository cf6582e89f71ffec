"""Log files as an operator reads them (issue 17): names without ':', timestamps and a stream
mark on request, stderr in a file of its own, a group and mode for the operators allowed on the
socket, and `pubmon clear`. OutputLog on real files; `clear` through a real daemon and the CLI."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemons import toml_publisher
from pubmon.config.load import parse_config
from pubmon.config.model import LogSpec
from pubmon.core.output import LogCleared, OutputLog, file_name
from pubmon.errors import ConfigError
from test_cli import cli, daemon

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "


def _other_gid() -> int:
    """A group that is not ours, to see a chown happen."""
    for g in grp.getgrall():
        if g.gr_gid != os.getegid():
            return g.gr_gid
    pytest.skip("no second group on this host")


# --- names ------------------------------------------------------------------------------------


def test_instance_files_are_named_without_a_colon(tmp_path: Path) -> None:
    assert file_name("api:0") == "api-0.log" and file_name("feed") == "feed.log"
    log = OutputLog("api:0", LogSpec(), str(tmp_path))
    log.open_stream("stdout").feed(b"hello\n")
    assert log.sync()
    assert log.path == str(tmp_path / "api-0.log")
    assert os.listdir(tmp_path) == ["api-0.log"]
    log.close()


def test_a_file_named_by_an_older_pubmon_is_renamed_with_its_backups(tmp_path: Path) -> None:
    (tmp_path / "api:0.log").write_bytes(b"old line\n")
    (tmp_path / "api:0.log.1").write_bytes(b"older line\n")
    log = OutputLog("api:0", LogSpec(backups=3), str(tmp_path))
    log.open_stream("stdout").feed(b"new line\n")
    assert log.sync()
    assert sorted(os.listdir(tmp_path)) == ["api-0.log", "api-0.log.1"]
    assert (tmp_path / "api-0.log").read_bytes() == b"old line\nnew line\n"
    assert (tmp_path / "api-0.log.1").read_bytes() == b"older line\n"
    log.close()


def test_two_instances_that_would_share_a_file_are_a_config_error(tmp_path: Path) -> None:
    text = toml_publisher("api", ["sleep", "1"], numprocs=2) + toml_publisher("api-1", ["true"])
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "p.toml")
    assert "publisher.api-1: instance api-1 would share the log file api-1.log with api:1" in str(
        err.value
    )


# --- what the file holds ----------------------------------------------------------------------


def test_timestamps_and_marked_stderr_in_the_file(tmp_path: Path) -> None:
    log = OutputLog("p", LogSpec(timestamps=True, stderr="marked", max_line=64), str(tmp_path))
    out, err = log.open_stream("stdout"), log.open_stream("stderr")
    out.feed(b"one\ntwo\nthr")
    err.feed(b"oops\n")
    out.feed(b"ee\n")
    out.feed(b"x" * 100)  # a line cut at max_line: each piece gets its prefix
    out.eof()
    assert log.sync()
    lines = (tmp_path / "p.log").read_text().splitlines()
    assert [re.sub(STAMP, "", line) for line in lines] == [
        "one", "two", "stderr| oops", "three", "x" * 64, "x" * 36,
    ]  # fmt: skip
    assert all(re.match(STAMP, line) for line in lines)
    assert [x.text for x in log.tail(0, 10).lines][:4] == ["one", "two", "oops", "three"]
    log.close()


def test_marked_stderr_without_timestamps_and_plain_by_default(tmp_path: Path) -> None:
    plain = OutputLog("a", LogSpec(), str(tmp_path))
    marked = OutputLog("b", LogSpec(stderr="marked"), str(tmp_path))
    for log in (plain, marked):
        log.open_stream("stderr").feed(b"e1\ne2\n")
        log.open_stream("stdout").feed(b"o1\n")
        assert log.sync()
        log.close()
    assert (tmp_path / "a.log").read_bytes() == b"e1\ne2\no1\n"
    assert (tmp_path / "b.log").read_bytes() == b"stderr| e1\nstderr| e2\no1\n"


def test_stderr_separate_goes_to_its_own_file_and_reload_switches_it(tmp_path: Path) -> None:
    log = OutputLog("api:1", LogSpec(stderr="separate"), str(tmp_path))
    out, err = log.open_stream("stdout"), log.open_stream("stderr")
    out.feed(b"out 1\n")
    err.feed(b"err 1\n")
    assert log.sync()
    assert log.paths == [str(tmp_path / "api-1.log"), str(tmp_path / "api-1.err.log")]
    assert (tmp_path / "api-1.log").read_bytes() == b"out 1\n"
    assert (tmp_path / "api-1.err.log").read_bytes() == b"err 1\n"
    log.reconfigure(LogSpec())  # back to one file: stderr joins stdout, the .err.log stays
    err.feed(b"err 2\n")
    assert log.sync()
    assert (tmp_path / "api-1.log").read_bytes() == b"out 1\nerr 2\n"
    assert (tmp_path / "api-1.err.log").read_bytes() == b"err 1\n"
    log.reconfigure(LogSpec(stderr="separate"))
    err.feed(b"err 3\n")
    assert log.sync()
    assert (tmp_path / "api-1.err.log").read_bytes() == b"err 1\nerr 3\n"
    log.close()


# --- who may read it --------------------------------------------------------------------------


def test_log_group_and_mode_on_create_rotation_and_reopen(tmp_path: Path) -> None:
    gid = _other_gid()
    logs = tmp_path / "logs"
    spec = LogSpec(group=gid, mode=0o644, max_bytes=10, backups=2)
    log = OutputLog("p", spec, str(logs))
    sink = log.open_stream("stdout")
    sink.feed(b"first line\n")
    assert log.sync()

    def mode_gid(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return stat.S_IMODE(st.st_mode), st.st_gid

    assert mode_gid(logs / "p.log") == (0o644, gid)
    assert mode_gid(logs) == (0o755, gid)
    sink.feed(b"second line\n")  # rotates: the fresh file gets them too
    assert log.sync()
    assert (logs / "p.log.1").read_bytes() == b"first line\n"
    assert mode_gid(logs / "p.log") == (0o644, gid)
    # logrotate's `create` (or an operator) made a file of other mode and group: reopen fixes it
    (logs / "p.log").rename(logs / "p.log.moved")
    (logs / "p.log").touch(mode=0o600)
    os.chown(logs / "p.log", -1, os.getegid())
    log.reopen()
    sink.feed(b"x\n")
    assert log.sync()
    assert mode_gid(logs / "p.log") == (0o644, gid)
    # a reload to 0640 applies it at once
    log.reconfigure(LogSpec(group=gid, mode=0o640, max_bytes=10, backups=2))
    assert log.sync()
    assert mode_gid(logs / "p.log") == (0o640, gid)
    assert mode_gid(logs) == (0o750, gid)
    log.close()


def test_log_group_and_mode_are_checked_at_load(tmp_path: Path) -> None:
    gid = _other_gid()
    name = grp.getgrgid(gid).gr_name
    ok = parse_config(
        f'[daemon]\nlog_group = "{name}"\nlog_mode = "0644"\n' + toml_publisher("p", ["true"]),
        tmp_path / "p.toml",
    )
    assert (ok.daemon.log_group, ok.daemon.log_mode) == (gid, 0o644)
    assert (ok.publishers[0].log.group, ok.publishers[0].log.mode) == (gid, 0o644)
    bad = '[daemon]\nlog_group = "no-such-group-here"\nlog_mode = "0666"\n' + toml_publisher(
        "p", ["true"], log={"stderr": "apart", "timestamps": "yes"}
    )
    with pytest.raises(ConfigError) as err:
        parse_config(bad, tmp_path / "p.toml")
    text = str(err.value)
    assert "daemon.log_group: no group 'no-such-group-here' on this host" in text
    assert 'daemon.log_mode: expected a file mode such as "0640"' in text
    assert "publisher.p.log.stderr: expected one of 'together' | 'marked' | 'separate'" in text
    assert "publisher.p.log.timestamps: expected true or false" in text
    unreadable = f'[daemon]\nlog_group = {gid}\nlog_mode = "0600"\n' + toml_publisher("p", ["true"])
    with pytest.raises(ConfigError) as err:
        parse_config(unreadable, tmp_path / "p.toml")
    assert "daemon.log_mode: log_group is set but log_mode 0600 does not let the group" in str(
        err.value
    )


# --- pubmon clear -------------------------------------------------------------------------------

# Prints two lines (one on stderr), then one line per SIGUSR1: output on demand, no sleeps.
TALK = [
    sys.executable,
    "-c",
    "import signal, sys\n"
    "print('before 1', flush=True); print('before 2', file=sys.stderr, flush=True)\n"
    "signal.signal(signal.SIGUSR1, lambda *a: print('after', flush=True))\n"
    "while True: signal.pause()\n",
]


async def test_clear_empties_ring_and_files_of_all_matched_and_tail_goes_on(
    tmp_path: Path,
) -> None:
    body = toml_publisher("talk", TALK, numprocs=2, log={"max_bytes": 12, "backups": 3})
    logs = tmp_path / "logs"
    async with daemon(tmp_path, body, 2) as (_, sock):
        async with asyncio.timeout(20):
            while not all((logs / f"talk-{i}.log.1").exists() for i in (0, 1)):
                await asyncio.sleep(0.02)  # both lines written: one rotation each
        rc, out, err = await cli("tail", "talk:0", "-n", "5", "--socket", sock)
        assert rc == 0 and "before 1" in out, err
        rc, out, err = await cli("clear", "talk*", "--socket", sock)
        assert rc == 0, err
        assert sorted(out.splitlines()) == [
            "talk:0: log cleared (2 lines, 2 file(s))",
            "talk:1: log cleared (2 lines, 2 file(s))",
        ]
        assert sorted(os.listdir(logs)) == ["talk-0.log", "talk-1.log"]
        assert (logs / "talk-0.log").read_bytes() == b""
        rc, out, _ = await cli("tail", "talk:0", "-n", "5", "--socket", sock)
        assert (rc, out) == (0, "")
        rc, _, _ = await cli("signal", "talk:0", "USR1", "--socket", sock)
        assert rc == 0
        async with asyncio.timeout(20):
            while True:
                rc, out, _ = await cli("tail", "talk:0", "-n", "5", "--socket", sock)
                if out:
                    break
                await asyncio.sleep(0.02)
        assert out == "after\n"  # seq goes on: nothing "missed", nothing from before
        rc, _, err = await cli("clear", "nope", "--socket", sock)
        assert rc == 6 and "nope" in err


async def test_clear_keeps_numbering_and_a_follower_misses_nothing(tmp_path: Path) -> None:
    log = OutputLog("p", LogSpec(ring_lines=3), str(tmp_path))
    sink = log.open_stream("stdout")
    sink.feed(b"a\nb\n")
    cursor = log.tail(0, 1).next_seq  # a follower that has read line 1
    done = await log.clear()
    assert (done.lines, done.files, done.error) == (2, [str(tmp_path / "p.log")], "")
    assert log.tail(cursor, 10).lines == [] and log.tail(cursor, 10).missed == 0
    assert log.last(5).lines == []
    for line in (b"c\n", b"d\n", b"e\n", b"f\n"):  # the ring keeps 3: c goes, and is missed
        sink.feed(line)
    chunk = log.tail(cursor, 10)
    assert [(x.seq, x.text) for x in chunk.lines] == [(4, "d"), (5, "e"), (6, "f")]
    assert chunk.missed == 1
    assert log.sync()
    assert (tmp_path / "p.log").read_bytes() == b"c\nd\ne\nf\n"
    log.close()
    ringonly = OutputLog("q", LogSpec(), None)
    ringonly.open_stream("stderr").feed(b"x\n")
    assert await ringonly.clear() == LogCleared(1, [], "")


def test_a_group_the_daemon_may_not_give_still_leaves_the_lines_in_the_file(
    tmp_path: Path,
) -> None:
    """A daemon not root, asked for a group it is not in: EPERM from fchown is one warning;
    the file is written all the same (run as nobody, by Debian's python3: the venv's is
    under /root)."""
    system_py = Path("/usr/bin/python3")
    if not system_py.exists():
        pytest.skip("no /usr/bin/python3 that the user nobody can run")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    gid = _other_gid()
    if gid in os.getgrouplist("nobody", nobody.pw_gid):
        pytest.skip("nobody is in every other group")
    work = Path(tempfile.mkdtemp(prefix="pubmon-loggroup-", dir="/tmp"))
    try:
        os.chown(work, nobody.pw_uid, nobody.pw_gid)
        script = (
            "import os; os.umask(0o077); from pubmon.config.model import LogSpec;"
            " from pubmon.core.output import OutputLog;"
            f" log = OutputLog('p', LogSpec(group={gid}, mode=0o604), {str(work)!r});"
            " log.open_stream('stdout').feed(b'kept\\n'); assert log.sync();"
            " print(log.dropped)"
        )
        done = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
             "--clear-groups", str(system_py), "-c", script],
            capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "PATH": os.defpath},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "0"
        assert f"cannot give log file {work}/p.log group {gid}, mode 0604" in done.stderr
        assert (work / "p.log").read_bytes() == b"kept\n"
        assert stat.S_IMODE(os.stat(work / "p.log").st_mode) == 0o604  # the mode: given
    finally:
        shutil.rmtree(work)

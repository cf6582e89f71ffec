"""pubmon.core.logfile and pubmon.core.logwriter: the rotating file, its writer thread, failures."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import stat
import types
from pathlib import Path

import pytest

from outputs import feed_randomly, numbered, texts
from pubmon.config.model import LogSpec
from pubmon.core import logfile as _logfile
from pubmon.core.output import OutputLog

# -- helpers -------------------------------------------------------------------------------------


def log_files_oldest_first(path: Path) -> list[Path]:
    backups = sorted(path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]))
    return [*reversed(backups), path]


# -- the file ------------------------------------------------------------------------------------


def test_file_and_directory_modes(logdir: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    log = OutputLog("feed:0", LogSpec(), str(logdir / "sub"))
    log.open_stream("stdout").feed(b"x\n")
    assert log.sync()
    assert stat.S_IMODE(os.stat(logdir / "sub").st_mode) == 0o750 & ~umask
    assert stat.S_IMODE(os.stat(logdir / "sub" / "feed-0.log").st_mode) == 0o640 & ~umask
    log.close()


def test_rotation_keeps_every_line_once_in_order(logdir: Path) -> None:
    rng = random.Random(11)
    data = numbered(1, 20_000)
    log = OutputLog("p", LogSpec(max_bytes=50_000, backups=100), str(logdir))
    sink = log.open_stream("stdout")
    feed_randomly(sink, data, rng, [1, 100, 10_000, 40_000])
    assert log.sync()
    files = log_files_oldest_first(logdir / "p.log")
    assert len(files) > 10
    contents = [f.read_bytes() for f in files]
    assert b"".join(contents) == data
    assert all(len(c) <= 50_000 and c.endswith(b"\n") for c in contents)


def test_rotation_keeps_only_backups_and_truncates_with_zero(logdir: Path) -> None:
    data = numbered(1, 10_000)
    for backups in (2, 0):
        log = OutputLog(f"b{backups}", LogSpec(max_bytes=20_000, backups=backups), str(logdir))
        sink = log.open_stream("stdout")
        for i in range(0, len(data), 3000):
            sink.feed(data[i : i + 3000])
        assert log.sync()
        files = log_files_oldest_first(logdir / f"b{backups}.log")
        names = [f"b{backups}.log.{i}" for i in range(backups, 0, -1)]
        assert [f.name for f in files] == [*names, f"b{backups}.log"]
        kept = b"".join(f.read_bytes() for f in files)
        assert data.endswith(kept) and (len(data) == len(kept) or data[-len(kept) - 1] == 10)
        assert 0 < len(files[-1].read_bytes()) <= 20_000
        log.close()


def test_a_write_larger_than_max_bytes_goes_whole_to_a_fresh_file(logdir: Path) -> None:
    log = OutputLog("p", LogSpec(max_bytes=1000, backups=3), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"small\n")
    big = numbered(1, 100)
    sink.feed(big)
    sink.feed(b"after\n")
    assert log.sync()
    assert (logdir / "p.log.2").read_bytes() == b"small\n"
    assert (logdir / "p.log.1").read_bytes() == big
    assert (logdir / "p.log").read_bytes() == b"after\n"


def test_reopen_after_the_file_was_renamed_away(logdir: Path) -> None:
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"one\n")
    assert log.sync()
    os.rename(logdir / "p.log", logdir / "p.log.moved")
    sink.feed(b"two\n")  # still the old inode, as logrotate expects until it signals
    log.reopen()
    sink.feed(b"three\n")
    assert log.sync()
    assert (logdir / "p.log.moved").read_bytes() == b"one\ntwo\n"
    assert (logdir / "p.log").read_bytes() == b"three\n"
    assert log.dropped == 0


def test_a_deleted_file_or_directory_is_recreated(logdir: Path) -> None:
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"one\n")
    assert log.sync()
    os.unlink(logdir / "p.log")
    sink.feed(b"two\n")
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"two\n"
    shutil.rmtree(logdir)
    sink.feed(b"three\n")
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"three\n"
    assert log.dropped == 0


def test_dropping_is_counted_logged_once_rate_limited_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(_logfile, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    caplog.set_level(logging.INFO, logger="pubmon")
    logdir = tmp_path / "a" / "logs"
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"1\n")
    assert log.sync()
    shutil.rmtree(tmp_path / "a")
    (tmp_path / "a").write_text("a path component replaced by a regular file")
    sink.feed(b"2\n3\n4")  # reopen attempted at once, fails
    sink.feed(b"\n5\n")  # within the second: no new attempt
    assert log.sync()
    (tmp_path / "a").unlink()
    sink.feed(b"6\n")  # the path is fine again, but the next attempt is not due yet
    assert log.sync()
    assert (log.dropped, log.last_seq) == (6 - 1, 6)
    assert log.dropped_bytes == len(b"2\n3\n4\n5\n6\n")
    clock[0] += 1.0
    sink.feed(b"7\n")
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"7\n"
    assert (log.dropped, log.lines) == (5, 7)
    assert texts(log.tail(0, 10).lines) == ["1", "2", "3", "4", "5", "6", "7"]
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("pubmon")]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO]
    assert "p:" in records[0][1] and "Not a directory" in records[0][1]
    assert "10 bytes (5 lines)" in records[1][1]


def test_a_symlink_in_place_of_the_file_is_refused_until_reopen(
    logdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubmon")
    logdir.mkdir()
    (logdir / "p.log").symlink_to("/dev/full")
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"a\nb\n")
    sink.feed(b"c\n")
    assert log.sync()
    assert (log.dropped, log.dropped_bytes) == (3, 6)
    (logdir / "p.log").unlink()
    log.reopen()
    sink.feed(b"d\n")
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"d\n" and log.dropped == 3
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("pubmon")]
    assert [level for level, _ in records] == [logging.WARNING, logging.INFO]
    assert str(logdir / "p.log") in records[0][1] and "symbolic link" in records[0][1]


def test_short_writes_are_completed(logdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real_writev(fd, [bufs[0][:3]]))
    log = OutputLog("p", LogSpec(), str(logdir))
    sink = log.open_stream("stdout")
    sink.feed(b"hello\nwor")
    sink.feed(b"ld\n")
    assert log.sync()
    assert (logdir / "p.log").read_bytes() == b"hello\nworld\n"


def test_close_counts_later_lines_as_dropped_and_no_file(tmp_path: Path) -> None:
    log = OutputLog("p", LogSpec(), str(tmp_path))
    sink = log.open_stream("stdout")
    log.close()
    sink.feed(b"x\ny\n")
    assert log.sync()
    assert (log.dropped, log.last_seq, (tmp_path / "p.log").read_bytes()) == (2, 2, b"")
    assert "last_seq=2" in repr(log)


def test_the_log_writer_thread_never_takes_a_signal_meant_for_the_loop(tmp_path: Path) -> None:
    # A signal the kernel hands to the writer (its fd table is private) would have its wakeup
    # byte written to /dev/null and be lost: SIGHUP + SIGTERM back to back lost the SIGTERM.
    from pubmon.core import logwriter as _logwriter

    writer = _logwriter.acquire(str(tmp_path))
    try:
        tid = writer._thread.native_id
        status = Path(f"/proc/self/task/{tid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
        blocked = int(line.split()[1], 16)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
            assert blocked & (1 << (sig - 1)), sig.name
    finally:
        _logwriter.release(writer)

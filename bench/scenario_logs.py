"""Children that write as fast as they can: how fast, and when is every byte in the log file?

Each writer (writer.py) writes a source file of numbered lines to stdout and notes
when its writing started and ended. Writers load their lines, then wait for a go file that the
benchmark creates once all of them are ready: the figures are about output, not spawning. The
benchmark polls the size of each log file every millisecond until it holds all the bytes, then
compares the file with the source byte for byte.
- `<label>_write`: total bytes / (last writer's end - first writer's start): the rate the
  children could write at, i.e. how fast the supervisor drains their pipes;
- `<label>_e2e`: total bytes / (moment the last file is complete - first writer's start);
- `<label>_lost`: source lines missing from the log file (0 when the file matches exactly).
logs_1 is one writer; logs_20 is 20 writers at once, each with its own lines: lines of 100 bytes.
logs_kb_1 and logs_kb_20 are the same with lines of a few KB (2-6 KiB, 4 KiB on average, lengths
spread by a fixed hash of the line number): per byte, one newline in 40 instead of one in 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import procfs
from contenders import Contender, DaemonDied, Program
from harness import Ctx, Recorder, say

LINE = 100
KB_LINES = (2048, 4096)  # KB shape: 2048 + (hash of the line number) % 4096 bytes a line
WRITER = Path(__file__).resolve().with_name("writer.py")
BATCH = 100_000  # lines generated per write while making a source file
COMPLETE_TIMEOUT = 120.0


def logs(ctx: Ctx, cls: type[Contender], rec: Recorder) -> None:
    runs = (
        ("logs_1", 1, ctx.sizes.log_one, False),
        ("logs_20", *ctx.sizes.log_many, False),
        ("logs_kb_1", 1, ctx.sizes.log_kb_one, True),
        ("logs_kb_20", *ctx.sizes.log_kb_many, True),
    )
    for label, writers, size, kb in runs:
        sources = make_sources(ctx.root, writers, size, kb=kb)
        for _ in range(ctx.runs):
            c = cls(ctx.workdir(f"{cls.name}-{label}"))
            try:
                _one_run(c, label, sources, rec)
            finally:
                procfs.cleanup()
                shutil.rmtree(c.logs, ignore_errors=True)  # up to 400 MB a run


def make_sources(root: Path, writers: int, size: int, *, kb: bool = False) -> list[Path]:
    """One file per writer of lines "WWW LLLLLLLLLLLL xxx...x\\n" (writer, line number): `size //
    100` lines of 100 bytes, or (`kb`) lines of 2-6 KiB until the file holds `size` bytes."""
    folder = root / "sources" / f"{writers}x{size}{'kb' if kb else ''}"
    paths = [folder / f"w{i}.dat" for i in range(writers)]
    if folder.exists():
        return paths
    folder.mkdir(parents=True)
    head = len(b"000 000000000000 \n")
    pad = b"x" * (max(LINE, sum(KB_LINES)) - head)
    short = pad[: LINE - head]
    low, spread = KB_LINES
    for index, path in enumerate(paths):
        with path.open("wb") as out:
            if not kb:
                for first in range(0, size // LINE, BATCH):
                    last = min(first + BATCH, size // LINE)
                    lines = [b"%03d %012d %s\n" % (index, i, short) for i in range(first, last)]
                    out.write(b"".join(lines))
                continue
            written, number = 0, 0
            while written < size:
                lines = []
                while written < size and len(lines) < BATCH:
                    width = low + (number * 2654435761 >> 7) % spread - head
                    lines.append(b"%03d %012d %s\n" % (index, number, pad[:width]))
                    written += len(lines[-1])
                    number += 1
                out.write(b"".join(lines))
    return paths


def _one_run(c: Contender, label: str, sources: list[Path], rec: Recorder) -> None:
    timing = c.workdir / "timing"
    timing.mkdir()
    go = c.workdir / "go"
    source = f"{sources[0].parent}/w{{i}}.dat"
    argv = (sys.executable, str(WRITER), source, f"{timing}/{{i}}.json", str(go))
    program = Program("w", argv, numprocs=len(sources))
    c.start([program])
    names = program.instances()
    want = {c.log_path(n): src.stat().st_size for n, src in zip(names, sources, strict=True)}
    for i in range(len(sources)):  # every writer spawned and holding its lines in memory
        _wait_file(timing / f"{i}.json.ready", 60)
    go.touch()
    pending = dict(want)
    deadline = time.monotonic() + COMPLETE_TIMEOUT
    while pending:
        for path, size in list(pending.items()):
            try:
                if os.stat(path).st_size >= size:
                    del pending[path]
            except FileNotFoundError:
                pass
        if not pending:
            break
        if procfs.exited(c.pid):
            raise DaemonDied(f"{c.name} exited:\n{c.daemon_log_tail()}")
        if time.monotonic() > deadline:
            got = sum(os.stat(p).st_size if p.exists() else 0 for p in want)
            rec.na(f"{label}_e2e", c.name, f"{got} of {sum(want.values())} bytes after timeout")
            return
        time.sleep(0.001)
    done = time.monotonic()
    spans = [_timing(timing / f"{i}.json") for i in range(len(sources))]
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    total = sum(want.values())
    rec.add(f"{label}_e2e", c.name, total / (done - first) / 1e6, "MB/s")
    rec.add(f"{label}_write", c.name, total / (last - first) / 1e6, "MB/s")
    lost = sum(_lost_lines(path, src) for path, src in zip(want, sources, strict=True))
    rec.add(f"{label}_lost", c.name, lost, "lines")
    say(
        f"  {c.name} {label}: written in {last - first:.3f} s, in the file after "
        f"{done - first:.3f} s, {lost} lines lost"
    )


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the writer never made {path}")
        time.sleep(0.005)


def _timing(path: Path) -> tuple[float, float]:
    _wait_file(path, 10)
    start, end = json.loads(path.read_text())
    return start, end


def _lost_lines(path: Path, source: Path) -> int:
    """0 when the log file equals the source; else how many source lines it lacks."""
    chunk = 16 << 20
    if path.exists():
        with path.open("rb") as got, source.open("rb") as wanted:
            while (a := got.read(chunk)) == wanted.read(chunk):
                if not a:
                    return 0
    have = set(path.read_bytes().splitlines()) if path.exists() else set()
    missing = set(source.read_bytes().splitlines()) - have
    if not missing:
        say(f"  {path}: no line lost, but the file has extra or reordered lines")
    return len(missing)

"""Checks of a chaos run: every recorded line in the log files, the daemon's fds and RSS, leftovers.

`check_logs` reads `<log_dir>/<name>.log.N … .log.1, <name>.log` in that order (oldest first) and
parses the chaos child's lines (see chaos_child.py). Per run and stream the numbered lines must
be 1, 2, 3 … in file order with no gap and no repeat, every line the run recorded as written must
be there whole and intact, and only lines after the recorded count (written, not yet recorded,
when the child died) may be missing or cut.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chaos_child import bad_bytes, checksum, long_payload

from procs import alive, children, descendants, state

_HEAD = re.compile(rb"C (\d+\.\d+) ([oe]) (\d+) ")


@dataclass
class LogReport:
    lines: int = 0  # numbered lines found whole and checked
    runs: int = 0
    files: int = 0
    bytes: int = 0
    unrecorded: int = 0  # lines beyond a run's recorded count (written as it died)
    problems: list[str] = field(default_factory=list)


@dataclass
class _Stream:
    seq: int = 0
    cut: bool = False  # the last line seen was incomplete: nothing may follow it


def log_files(log_dir: Path, name: str) -> list[Path]:
    """A publisher's files, oldest first."""
    rotated = []
    for path in log_dir.glob(f"{name}.log.*"):
        suffix = path.name[len(name) + 5 :]
        if suffix.isdigit():
            rotated.append((int(suffix), path))
    out = [p for _, p in sorted(rotated, reverse=True)]
    main = log_dir / f"{name}.log"
    if main.exists():
        out.append(main)
    return out


def recorded_runs(state_dir: Path, name: str) -> dict[str, tuple[int, int]]:
    """run id -> (stdout lines, stderr lines) each run of `name` recorded as written."""
    out = {}
    folder = state_dir / name
    if not folder.is_dir():
        return out
    for path in folder.glob("*.run"):
        text = path.read_text().split()
        out[path.name[: -len(".run")]] = (int(text[0]), int(text[1])) if text else (0, 0)
    return out


class _Checker:
    def __init__(self, name: str, report: LogReport) -> None:
        self.name = name
        self.report = report
        self.streams: dict[tuple[str, str], _Stream] = {}
        self.open_long: tuple[tuple[str, str], int, bytearray] | None = None  # key, size, so far
        self.complete: dict[tuple[str, str], int] = {}  # key -> last seq found whole

    def problem(self, text: str) -> None:
        if len(self.report.problems) < 50:
            self.report.problems.append(f"{self.name}: {text}")

    def feed(self, line: bytes, where: str) -> None:
        m = _HEAD.match(line)
        if m is None:
            if self.open_long is None:
                self.problem(f"{where}: a line that is not a chaos line: {line[:60]!r}")
                return
            key, size, got = self.open_long
            got += line
            if len(got) >= size:
                self._finish_long(key, size, got, where)
            return
        run, stream, seq = m.group(1).decode(), m.group(2).decode(), int(m.group(3))
        key = (run, stream)
        if self.open_long is not None and (stream == "o" or self.open_long[0][0] != run):
            # A stdout line (or another run's) while a long stdout line is still incomplete:
            # that long line was cut short by its writer's death.
            self._cut(self.open_long[0])
            self.open_long = None
        st = self.streams.setdefault(key, _Stream())
        if st.cut:
            self.problem(f"{where}: {run}/{stream} line {seq} after an incomplete line")
        if seq != st.seq + 1:
            self.problem(f"{where}: {run}/{stream} line {seq} follows line {st.seq}")
        st.seq = seq
        body = line[m.end() :]
        if body.startswith(b"L"):
            size_text, _, payload = body[1:].partition(b" ")
            size = int(size_text)
            if len(payload) >= size:
                self._finish_long(key, size, bytearray(payload), where)
            else:
                self.open_long = (key, size, bytearray(payload))
            return
        if body[2:] == bad_bytes(seq) if body.startswith(b"B ") else body == checksum(seq):
            self.complete[key] = seq
        else:
            self._cut(key)

    def _finish_long(self, key: tuple[str, str], size: int, got: bytearray, where: str) -> None:
        self.open_long = None
        if len(got) != size or bytes(got) != long_payload(size):
            self.problem(f"{where}: {key[0]} long line {self.streams[key].seq} is corrupt")
            self._cut(key)
            return
        self.complete[key] = self.streams[key].seq

    def _cut(self, key: tuple[str, str]) -> None:
        self.streams[key].cut = True

    def finish(self, runs: dict[str, tuple[int, int]]) -> None:
        if self.open_long is not None:
            self._cut(self.open_long[0])
        for run, counts in runs.items():
            self.report.runs += 1
            for stream, recorded in zip("oe", counts, strict=True):
                st = self.streams.get((run, stream), _Stream())
                whole = self.complete.get((run, stream), 0)
                if st.seq < recorded:
                    self.problem(
                        f"run {run}/{stream}: recorded {recorded} lines written, "
                        f"the log files have {st.seq}"
                    )
                elif whole < recorded:
                    self.problem(f"run {run}/{stream}: line {whole + 1} of {recorded} is cut")
                self.report.lines += min(recorded, whole)
                self.report.unrecorded += max(0, st.seq - recorded)
        for run in sorted({run for run, _ in self.streams} - set(runs)):
            self.problem(f"lines of run {run}, which never recorded itself")


def check_logs(log_dir: Path, state_dir: Path, names: list[str], backups: int) -> LogReport:
    report = LogReport()
    for name in names:
        files = log_files(log_dir, name)
        if (log_dir / f"{name}.log.{backups}").exists():
            report.problems.append(
                f"{name}: {name}.log.{backups} exists: rotation may have deleted lines "
                "(raise Env.backups)"
            )
        checker = _Checker(name, report)
        for path in files:
            data = path.read_bytes()
            report.files += 1
            report.bytes += len(data)
            if data and not data.endswith(b"\n"):
                checker.problem(f"{path.name} does not end with a newline")
            for i, line in enumerate(data.split(b"\n")[:-1]):
                checker.feed(line, f"{path.name}:{i + 1}")
        checker.finish(recorded_runs(state_dir, name))
    return report


_BANNER = re.compile(rb"demo \S+ pid \d+: ")
_TICK = re.compile(rb"tick (\d+)$")
_SPEW = re.compile(rb"spew (\d+)/(\d+)$")


def check_demo_logs(log_dir: Path, names: list[str]) -> LogReport:
    """Demo publishers' files: in each run (from its banner line on) the ticks count 1, 2, 3 ...
    and each spew i/N counts 1..N with nothing lost; only a run's end may cut a spew short."""
    report = LogReport()
    for name in names:
        tick = 0
        spew: tuple[int, int] | None = None  # (N, last i) of a spew in progress
        for path in log_files(log_dir, name):
            data = path.read_bytes()
            report.files += 1
            report.bytes += len(data)
            for i, line in enumerate(data.split(b"\n")[:-1]):
                where = f"{name}: {path.name}:{i + 1}"
                if _BANNER.match(line):
                    report.runs += 1
                    tick, spew = 0, None
                elif m := _TICK.match(line):
                    if int(m.group(1)) != tick + 1:
                        report.problems.append(f"{where}: tick {m.group(1)} after tick {tick}")
                    tick = int(m.group(1))
                    report.lines += 1
                elif m := _SPEW.match(line):
                    k, n = int(m.group(1)), int(m.group(2))
                    expected = 1 if spew is None or spew[1] == spew[0] else spew[1] + 1
                    if k != expected or (spew is not None and k > 1 and n != spew[0]):
                        report.problems.append(f"{where}: spew {k}/{n} after {spew}")
                    spew = (n, k)
                    report.lines += 1
    return report


# --- the daemon from outside ----------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """The daemon's open fds by kind, and its RSS, at one moment."""

    fds: Counter[str]
    rss_kib: int
    # Pidfds beyond what the daemon's live children explain: one whose process is gone or is
    # not a child of the daemon, or a third one for the same child. (Each spawned child has two,
    # ours and asyncio's watcher's; one adopted by an upgrade has one.)
    stray_pidfds: int = 0

    @property
    def total(self) -> int:
        return sum(self.fds.values())


def fd_kind(target: str) -> str:
    if target.startswith("pipe:"):
        return "pipe"
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:") :].strip("[]")
    if target.endswith(".log") or ".log." in target:
        return "logfile"
    return "other"


def usage(pid: int) -> Usage:
    fds: Counter[str] = Counter()
    targets: Counter[int] = Counter()  # what the pidfds refer to (-1: a process reaped)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = fd_kind(os.readlink(f"/proc/{pid}/fd/{fd}"))
            fds[kind] += 1
            if kind == "pidfd":
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                targets[int(info.split("\nPid:", 1)[1].split()[0])] += 1
        except (FileNotFoundError, IndexError, ValueError):
            pass
    live = children(pid)
    stray = sum(n if p not in live else max(0, n - 2) for p, n in targets.items())
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Usage(fds, rss, stray)


def residual(u: Usage, live_children: int, live_probed: int, configured: int) -> dict[str, int]:
    """Open fds by kind minus those the publishers explain: what should not grow over a run.

    Each live child costs two pipes and one or two pidfds (`Usage.stray_pidfds` counts those
    it does not explain), each live child with an fb303 probe a socket (the probe's
    connection), and each configured publisher one log file.
    """
    out = dict(u.fds)
    out["pipe"] = out.get("pipe", 0) - 2 * live_children
    out["pidfd"] = u.stray_pidfds
    out["socket"] = out.get("socket", 0) - live_probed
    out["logfile"] = out.get("logfile", 0) - configured
    return out


def tagged_processes(token: str) -> dict[int, str]:
    """Every process on the host whose environment has PUBMON_CHAOS=token (not zombies)."""
    needle = f"PUBMON_CHAOS={token}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                cmd = b"?"
            found[pid] = cmd[:100].decode(errors="replace")
    return found


def zombies_under(pid: int) -> list[int]:
    return [p for p in descendants(pid) if state(p) == "Z"]

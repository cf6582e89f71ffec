"""What the scenarios share: the run's settings (`Ctx`) and where their numbers go (`Recorder`)."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCENARIOS = ("spawn", "idle", "restart", "logs", "rpc", "cli", "stop", "orphans", "http")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """How big and how long each scenario is: `full()` for `make bench`, `quick()` for
    `make bench-quick`."""

    fleet: tuple[int, ...]  # N for spawn / idle / rpc / cli / stop
    idle_window: float  # seconds of idle CPU measurement
    settle: float  # seconds after all RUNNING before the idle window starts
    kills: int  # SIGKILLs in the restart scenario (one per child, at most 20)
    log_one: int  # bytes one writer writes
    log_many: tuple[int, int]  # (writers, bytes each)
    log_kb_one: int  # the same with lines of a few KB (2-6 KiB, 4 KiB on average)
    log_kb_many: tuple[int, int]
    rpc_window: float  # seconds per calls/s measurement
    status_calls: int  # status calls whose median latency is reported (at most ~3 s of them)
    cli_runs: int  # CLI runs whose median wall time is reported
    fb303_fleet: int  # demo publishers probed over fb303 in the idle scenario
    big_runs: int = 1  # starts for spawn/stop at N >= 1000 (supervisord needs ~25 s per start)

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            fleet=(200, 1000), idle_window=20.0, settle=2.0, kills=20,
            log_one=200_000_000, log_many=(20, 20_000_000), log_kb_one=100_000_000,
            log_kb_many=(20, 10_000_000), rpc_window=1.5,
            status_calls=20, cli_runs=5, fb303_fleet=200,
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            fleet=(200,), idle_window=5.0, settle=1.0, kills=10,
            log_one=100_000_000, log_many=(20, 10_000_000), log_kb_one=100_000_000,
            log_kb_many=(20, 10_000_000), rpc_window=0.5,
            status_calls=10, cli_runs=3, fb303_fleet=20,
        )  # fmt: skip


@dataclass(slots=True)
class Ctx:
    sizes: Sizes
    runs: int  # repeated starts for spawn, stop and logs (the median is reported)
    scenarios: frozenset[str]
    root: Path  # a temporary folder for every workdir of this run
    _made: int = 0

    def wants(self, *names: str) -> bool:
        return not self.scenarios.isdisjoint(names)

    def workdir(self, label: str) -> Path:
        self._made += 1
        path = self.root / f"{self._made:03d}-{label}"
        path.mkdir(parents=True)
        return path


Key = tuple[str, int | None, str]  # (figure, n, contender)


@dataclass(slots=True)
class Recorder:
    """Collects each figure's values per run; `flush()` prints one JSON line per finished
    (figure, n, contender) with the median, and keeps it for the summary."""

    values: dict[Key, list[float]] = field(default_factory=dict)
    units: dict[Key, str] = field(default_factory=dict)
    notes: dict[Key, str] = field(default_factory=dict)
    results: list[dict[str, object]] = field(default_factory=list)
    _flushed: set[Key] = field(default_factory=set)

    def add(
        self, figure: str, contender: str, value: float, unit: str, n: int | None = None
    ) -> None:
        key = (figure, n, contender)
        self.values.setdefault(key, []).append(value)
        self.units[key] = unit

    def na(self, figure: str, contender: str, why: str, n: int | None = None) -> None:
        """No number: the feature is missing, or the run failed (`why` says which)."""
        self.notes[(figure, n, contender)] = why

    def flush(self) -> None:
        for key in [*self.values, *self.notes]:
            if key in self._flushed:
                continue
            self._flushed.add(key)
            figure, n, contender = key
            runs = self.values.get(key, [])
            result: dict[str, object] = {"figure": figure, "n": n, "contender": contender}
            result["value"] = round(statistics.median(runs), 4) if runs else None
            result["unit"] = self.units.get(key, "")
            result["runs"] = [round(v, 4) for v in runs]
            if key in self.notes:
                result["note"] = self.notes[key]
            self.results.append(result)
            print(json.dumps(result), flush=True)

    def value(self, figure: str, n: int | None, contender: str) -> float | None:
        runs = self.values.get((figure, n, contender))
        return statistics.median(runs) if runs else None

    def note(self, figure: str, n: int | None, contender: str) -> str | None:
        return self.notes.get((figure, n, contender))


def say(text: str) -> None:
    """Progress, on stderr so that stdout stays JSON lines and the table."""
    print(text, file=sys.stderr, flush=True)

"""ProcStats.refresh_soon: the status call's /proc work is O(changed trees), not O(publishers).

Real processes (`sleep`), real /proc; the seam is `sample_tree`, counted, not replaced.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest

from pubmon.core import procstats
from pubmon.core.procstats import ProcStats


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = procstats.sample_tree

    def counted(pid: int) -> procstats.ProcFigures | None:
        seen.append(pid)
        return real(pid)

    monkeypatch.setattr(procstats, "sample_tree", counted)
    return seen


async def test_status_reads_only_trees_it_has_not_seen_and_refreshes_the_rest_in_background(
    sleepers: list[subprocess.Popen[bytes]], reads: list[int]
) -> None:
    stats = ProcStats(min_interval=3600.0)
    leaders: dict[str, int | None] = {f"p{i}": p.pid for i, p in enumerate(sleepers)}
    stats.refresh_soon(leaders)  # nothing cached: every tree is read in the call
    assert sorted(reads) == sorted(p.pid for p in sleepers)
    assert set(stats.figures) == set(leaders)
    assert all(f.processes == 1 and f.rss_bytes > 0 for f in stats.figures.values())
    while stats._background is not None:  # the first refresh was due at once (never refreshed)
        await asyncio.sleep(0.01)
    reads.clear()

    stats.refresh_soon(leaders)  # nothing changed, the cache is fresh: no /proc read at all
    assert reads == []

    # One restart (a new leader) and one stop: only the new leader is read, the stopped one
    # is dropped; the others keep their cached figures.
    fresh = subprocess.Popen(["sleep", "60"])
    sleepers.append(fresh)
    leaders["p1"], leaders["p2"] = fresh.pid, None
    stats.refresh_soon(leaders)
    assert reads == [fresh.pid]
    assert "p2" not in stats.figures and stats.figures["p1"].processes == 1
    assert stats._background is None  # fresh cache: no walk started


async def test_a_stale_cache_is_refreshed_in_background_not_in_the_call(
    sleepers: list[subprocess.Popen[bytes]], reads: list[int]
) -> None:
    stats = ProcStats(min_interval=0.0)
    leaders: dict[str, int | None] = {f"p{i}": p.pid for i, p in enumerate(sleepers)}
    stats.refresh_soon(leaders)
    first = stats.refreshes
    while stats._background is not None:
        await asyncio.sleep(0.01)
    assert stats.refreshes == first + 1
    reads.clear()
    stats.refresh_soon(leaders)  # stale (min_interval 0): a walk starts, none in the call
    assert reads == [] and stats._background is not None
    while stats._background is not None:
        await asyncio.sleep(0.01)
    assert sorted(reads) == sorted(p.pid for p in sleepers)
    assert stats.refreshes == first + 2
    assert os.getpid() not in reads

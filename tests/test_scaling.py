"""The supervisor's work per publisher does not grow with the number of publishers.

bench/bench_scaling.py measures how spawn, status and stop grow from 100 to 4000 publishers;
its wall times also carry the kernel's share (a spawn copies the daemon's descriptor table:
O(fds) each) and the machine's load. These tests count instead: the lines run in pubmon's own
code while N and 4N real `sleep` children are started (at start-up and by a reload that
adds them), listed and stopped. Linear work runs 4x the lines; an O(N) scan on every
change (a waiter per publisher woken by every publisher's change, a pass over all on each
event) gives 16x, and is caught well before it is felt at 1000.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from children import config, spec
from pubmon.core.lifecycle import PublisherState
from pubmon.core.supervisor import Supervisor
from supervised import supervising

S = PublisherState
SRC = str(Path(__file__).resolve().parents[1] / "src" / "pubmon")
SMALL = 15
# Calls at 4N against 4 x those at N: room for what varies with the loop's batching of events
# (a Pulse waiter wakes once per loop pass that saw a fire, not once per fire).
SLACK = 1.5


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Lines run in each of pubmon's functions (by qualified name) in this thread meanwhile:
    lines, not calls, so that a loop (a comprehension over every publisher) counts per turn."""
    lines: Counter[str] = Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            lines[frame.f_code.co_qualname] += 1
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(SRC) else None

    sys.settrace(trace)
    try:
        yield lines
    finally:
        sys.settrace(None)


def _superlinear(small: Counter[str], large: Counter[str]) -> dict[str, tuple[int, int]]:
    """Functions that ran more than SLACK x 4 as many lines at 4N as at N (at least 100)."""
    return {
        name: (small[name], n)
        for name, n in large.items()
        if n >= 100 and n > SLACK * 4 * max(small[name], 1)
    }


async def _phases(n: int) -> dict[str, Counter[str]]:
    """Calls per phase with `n` publishers: start-up, a reload adding `n` more, status, stop."""
    # Dependents: every spawn of a:* and b:* asks whether the db is RUNNING; each change of
    # the db wakes them all.
    db = spec("db")
    first = [db, *(spec(f"a:{i}", program="a", index=i, depends_on=("db",)) for i in range(n))]
    added = [spec(f"b:{i}", program="b", index=i, depends_on=("db",)) for i in range(n)]
    out: dict[str, Counter[str]] = {}

    async def phase(name: str, step: Callable[[], Awaitable[object]]) -> None:
        with counting() as calls:
            await step()
        out[name] = calls

    cm = supervising(config(*first))
    with counting() as calls:
        sup: Supervisor = await cm.__aenter__()
        await sup.wait_settled()
    out["start"] = calls
    try:
        assert all(p.state == S.RUNNING for p in sup.publishers.values())
        await phase("reload adding", lambda: sup.reload(config(*first, *added)))
        assert all(p.state == S.RUNNING for p in sup.publishers.values())

        async def status() -> None:
            for p in sup.publishers.values():
                p.snapshot()
            sup.summary()

        await phase("status", status)
    finally:
        with counting() as calls:
            await cm.__aexit__(None, None, None)
        out["stop"] = calls
    return out


async def test_start_reload_status_and_stop_do_linear_work_in_the_publishers() -> None:
    small, large = await _phases(SMALL), await _phases(4 * SMALL)
    grew = {ph: _superlinear(small[ph], large[ph]) for ph in small}
    assert grew == {ph: {} for ph in small}, f"lines run (N -> 4N) growing faster than N: {grew}"
    totals = {ph: (sum(small[ph].values()), sum(large[ph].values())) for ph in small}
    assert all(b <= SLACK * 4 * a for a, b in totals.values()), totals

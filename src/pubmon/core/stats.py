"""Plain-data figures the daemon keeps per publisher for its metrics: no I/O, no loop.

A `Histogram` has fixed upper bounds (Prometheus' `le` buckets, in seconds), per-bucket counts,
a sum and a count: what a collector needs to expose `_bucket`, `_sum` and `_count` without
keeping every observation. `EXIT_REASONS` is the closed set a publisher's exits are counted by.
"""

from __future__ import annotations

__all__ = ["EXIT_REASONS", "PROBE_BUCKETS", "ExitReason", "Histogram"]

import bisect
from typing import Literal

ExitReason = Literal["exit", "signal", "unhealthy", "operator", "memory"]
EXIT_REASONS: tuple[ExitReason, ...] = ("exit", "signal", "unhealthy", "operator", "memory")

# fb303 / tcp / exec probes on loopback take 0.1-5 ms; a timeout is seconds.
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations at or below each bound (not cumulative; +Inf is the last slot)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = PROBE_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last: Prometheus' `_bucket`."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

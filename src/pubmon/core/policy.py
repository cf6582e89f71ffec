"""Pure restart decisions: the backoff delay and the crash-loop window. No I/O, no loop."""

from __future__ import annotations

__all__ = ["CrashWindow", "next_delay", "should_restart"]

import random
from collections import deque
from collections.abc import Iterable
from typing import Literal

RestartPolicy = Literal["always", "on-failure", "never"]


def next_delay(
    failures: int,
    *,
    initial: float,
    factor: float,
    maximum: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the next start after `failures` earlier failures in a row.

    The first restart after a healthy run (failures == 0) is immediate, like supervisord; then
    initial, initial*factor, initial*factor**2, ... capped at `maximum`, each spread by +-jitter
    (a fraction of the delay) so that many publishers failing together do not restart in step.

    >>> [next_delay(n, initial=0.5, factor=2, maximum=3, jitter=0) for n in range(5)]
    [0.0, 0.5, 1.0, 2.0, 3.0]
    """
    if failures <= 0:
        return 0.0
    # Cap the exponent: factor**n overflows a float long before anyone waits that long.
    base = min(maximum, initial * factor ** min(failures - 1, 64))
    if jitter <= 0 or base <= 0:
        return base
    spread = (rng or random).uniform(-jitter, jitter)
    return max(0.0, min(maximum, base * (1.0 + spread)))


def should_restart(
    policy: RestartPolicy, returncode: int | None, success_codes: Iterable[int]
) -> bool:
    """Whether an exit calls for a restart. A death by signal (negative code) is a failure."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    return returncode is None or returncode < 0 or returncode not in set(success_codes)


class CrashWindow:
    """Counts automatic restarts inside a sliding window; too many means a crash loop.

    `allow(now)` records a restart and returns True while fewer than `max_restarts` restarts
    happened in the last `window` seconds; the next one returns False (-> FATAL).

    >>> w = CrashWindow(max_restarts=2, window=10)
    >>> [w.allow(t) for t in (0, 1, 2)], w.allow(20)
    ([True, True, False], True)
    """

    def __init__(self, *, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    def reset(self) -> None:
        self._times.clear()

    def __len__(self) -> int:
        return len(self._times)

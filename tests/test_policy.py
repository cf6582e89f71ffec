"""Restart policy (pubmon.core.policy): backoff delays, restart on which exits, the crash window."""

import random

import pytest

from pubmon.core.lifecycle import PublisherState
from pubmon.core.policy import CrashWindow, next_delay, should_restart

S = PublisherState


def test_first_restart_is_immediate_then_exponential_and_capped() -> None:
    delays = [next_delay(n, initial=0.5, factor=2, maximum=5, jitter=0) for n in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_jitter_stays_within_its_fraction_and_under_the_cap() -> None:
    rng = random.Random(7)
    for n in range(1, 12):
        base = min(10.0, 1.0 * 3 ** (n - 1))
        d = next_delay(n, initial=1, factor=3, maximum=10, jitter=0.2, rng=rng)
        assert base * 0.8 - 1e-9 <= d <= min(10.0, base * 1.2) + 1e-9


def test_huge_failure_counts_do_not_overflow() -> None:
    assert next_delay(10_000, initial=0.5, factor=2, maximum=60, jitter=0) == 60


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        ("always", 0, True),
        ("always", 1, True),
        ("never", 1, False),
        ("never", -9, False),
        ("on-failure", 0, False),
        ("on-failure", 3, True),
        ("on-failure", -15, True),  # death by signal is a failure even if 15 were "success"
    ],
)
def test_should_restart(policy: str, code: int, expected: bool) -> None:
    assert should_restart(policy, code, {0, 15}) is expected  # type: ignore[arg-type]


def test_crash_window_allows_max_restarts_then_refuses_then_forgets() -> None:
    w = CrashWindow(max_restarts=3, window=10)
    assert [w.allow(t) for t in (0, 1, 2)] == [True, True, True]
    assert w.allow(3) is False
    assert w.allow(10.5) is True  # t=0 left the window
    w.reset()
    assert len(w) == 0


def test_crash_window_of_zero_restarts_refuses_the_first() -> None:
    assert CrashWindow(max_restarts=0, window=1).allow(0) is False

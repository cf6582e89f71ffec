"""A model-based test of the daemon: Hypothesis picks operator calls, child exits, reloads and
signals; a real `pubmon daemon` runs real children; after every step the daemon must agree with
a model of what an operator expects. See `DaemonModel` for the model.

    make test                 this file with a fixed seed and a budget of about a minute
    make explore MINUTES=N    fresh seeds until N minutes pass; a failure prints its replay

Replay a failure with the command it prints (PUBMON_MODEL_SEED=... for a seed, or
PUBMON_MODEL_BLOB=... for the exact shrunk example Hypothesis printed).
"""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import HealthCheck, Phase, reproduce_failure, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from .machine import DaemonModel

# --- running it ---------------------------------------------------------------------------

FIXED = settings(
    max_examples=int(os.environ.get("PUBMON_MODEL_EXAMPLES", "4")),
    stateful_step_count=int(os.environ.get("PUBMON_MODEL_STEPS", "12")),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
    # PUBMON_MODEL_NOSHRINK=1: report the first failing example as found (shrinking reruns
    # a real daemon dozens of times).
    phases=[p for p in Phase if p != Phase.shrink or not os.environ.get("PUBMON_MODEL_NOSHRINK")],
)


def machine_for(seed_value: int | None = None) -> type[DaemonModel]:
    """The machine class, with the replay asked for in the environment applied."""
    cls = type("DaemonModel", (DaemonModel,), {})
    blob = os.environ.get("PUBMON_MODEL_BLOB")
    if blob:
        version, _, data = blob.partition(":")
        cls = reproduce_failure(version, data.encode())(cls)
    chosen = os.environ.get("PUBMON_MODEL_SEED")
    if chosen is not None or seed_value is not None:
        cls = seed(int(chosen) if chosen is not None else seed_value)(cls)
    return cls


def replay_hint(seed_value: int | None) -> str:
    cmd = ".venv/bin/python -m pytest -q tests/model -p no:cacheprovider"
    how = f"PUBMON_MODEL_EXPLORE=1 PUBMON_MODEL_SEED={seed_value} " if seed_value else ""
    return (
        f"replay: {how}{cmd}\n"
        "or the shrunk example exactly: PUBMON_MODEL_BLOB='<version>:<blob>' "
        f"{cmd} (from the @reproduce_failure line above)"
    )


@pytest.mark.slow
def test_daemon_agrees_with_the_model() -> None:
    seconds = float(os.environ.get("PUBMON_MODEL_SECONDS", "0"))
    if not seconds and not os.environ.get("PUBMON_MODEL_EXPLORE"):
        run_state_machine_as_test(machine_for(), settings=FIXED)
        return
    # Exploring: fresh seeds until the time is up (or the one seed asked for, once).
    explore = settings(FIXED, derandomize=False, max_examples=3)
    end = time.monotonic() + seconds
    rounds = 0
    while True:
        seed_value = int(os.environ.get("PUBMON_MODEL_SEED") or random.randrange(1 << 32))
        rounds += 1
        print(f"model: seed {seed_value} (round {rounds})", flush=True)
        try:
            run_state_machine_as_test(machine_for(seed_value), settings=explore)
        except BaseException:
            print(replay_hint(seed_value), flush=True)
            raise
        if os.environ.get("PUBMON_MODEL_SEED") or time.monotonic() > end:
            break

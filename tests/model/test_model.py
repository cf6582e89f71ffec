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
import re
import time

import pytest
from hypothesis import HealthCheck, Phase, reproduce_failure, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from .machine import DaemonModel

# --- running it ---------------------------------------------------------------------------

FIXED = settings(
    max_examples=int(os.environ.get("PUBMON_MODEL_EXAMPLES", "7")),
    stateful_step_count=int(os.environ.get("PUBMON_MODEL_STEPS", "16")),
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
    # The fixed-seed run reports the first failing example as found: shrinking reruns a real
    # daemon for minutes. `make explore` shrinks (unless PUBMON_MODEL_NOSHRINK=1).
    phases=[p for p in Phase if p != Phase.shrink],
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


CMD = ".venv/bin/python -m pytest -q -s tests/model -p no:cacheprovider"
_BLOB = re.compile(r"@reproduce_failure\('([^']+)', b'([^']+)'\)")


def replay_hint(exc: BaseException, seed_value: int | None) -> str:
    """How to run the failure again: the seed (the whole round), and the shrunk example."""
    out = []
    if seed_value is not None:
        out.append(f"replay the round: PUBMON_MODEL_EXPLORE=1 PUBMON_MODEL_SEED={seed_value} {CMD}")
    else:
        out.append(f"replay: {CMD} (the fixed seed)")
    notes = [str(n) for e in (exc, *getattr(exc, "exceptions", ())) for n in _notes(e)]
    for found in _BLOB.finditer("\n".join(notes)):
        out.append(f"replay the shrunk example: PUBMON_MODEL_BLOB='{found[1]}:{found[2]}' {CMD}")
        break
    return "\n".join(out)


def _notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", ()))


@pytest.mark.slow
def test_daemon_agrees_with_the_model() -> None:
    seconds = float(os.environ.get("PUBMON_MODEL_SECONDS", "0"))
    exploring = bool(seconds or os.environ.get("PUBMON_MODEL_EXPLORE"))
    # Exploring: fresh seeds until the time is up (or the one seed asked for, once).
    shrink = not os.environ.get("PUBMON_MODEL_NOSHRINK")
    explore = settings(
        FIXED,
        derandomize=False,
        max_examples=3,
        phases=[p for p in Phase if p != Phase.shrink or shrink],
    )
    end = time.monotonic() + seconds
    rounds = 0
    while True:
        seed_value = None
        if exploring:
            seed_value = int(os.environ.get("PUBMON_MODEL_SEED") or random.randrange(1 << 32))
            rounds += 1
            print(f"model: seed {seed_value} (round {rounds})", flush=True)
        try:
            run_state_machine_as_test(
                machine_for(seed_value), settings=explore if exploring else FIXED
            )
        except BaseException as exc:
            print(replay_hint(exc, seed_value), flush=True)
            raise
        if not exploring or os.environ.get("PUBMON_MODEL_SEED") or time.monotonic() > end:
            break

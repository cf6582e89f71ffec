"""The model's vocabulary: publisher settings Hypothesis draws, reload edits, and what the
model expects of one publisher (states it may settle in, counter ranges)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import strategies as st

from .harness import ModelConfig, PubSpec

NAMES = ("a", "b", "c", "d")
LOOSE = 1000  # "any number": a counter the model cannot predict (see the tolerances)
# Checks that can be switched off to find the next bug on a core that has an earlier one
# (PUBMON_MODEL_SKIP=key,key,...; none by default): broken (the `#!` publisher), tail0, uids,
# probe (no probe edits), answer (the reload's answer), changed-list (only its `changed`),
# ready (sd_notify), race (stop racing an exit), inflight (SIGTERM during a reload), stuck,
# stuck-answer (what a stop of a stuck child says), refusal (the undeclared InvalidState),
# refused-start (a refused reload that started publishers). See issue 10's closing note.
SKIP = frozenset(filter(None, os.environ.get("PUBMON_MODEL_SKIP", "").split(",")))

term_delays = st.sampled_from([0.0, 0.5, 3.0])
restarts = st.sampled_from(["always", "on-failure", "never"])
probes = st.sampled_from(["none", "live", "dead"])
names = st.sampled_from(NAMES)
vias = st.sampled_from(["cli", "rpc"])
# Which publisher a step acts on: an index into those that exist (or that run), so that a step
# rarely names no one; past 12 any name of the pool, known or not (UnknownPublisher).
who = st.integers(0, 15)


@st.composite
def pubspecs(draw: st.DrawFn, name: str | None = None) -> PubSpec:
    return PubSpec(
        name=name or draw(names),
        term_delay=draw(term_delays),
        restart=draw(restarts),
        probe=draw(probes),
        slow_ready=draw(st.booleans()),
    )


# Reload edits. A name in an edit is an index into the publishers of the config being edited
# (so that an edit rarely misses); a publisher added takes its drawn name, or the first name of
# the pool not in use if that one is.
ops = st.one_of(
    st.tuples(st.just("add"), pubspecs()),
    st.tuples(st.just("remove"), who),
    st.tuples(st.just("replace"), who, pubspecs()),  # one goes, another comes
    st.tuples(st.just("env"), who),
    st.tuples(st.just("term"), who, term_delays),
    st.tuples(st.just("probe"), who, probes),
    st.tuples(st.just("probe"), who, probes),  # twice: the edit with most to get wrong
    st.tuples(st.just("restart"), who, restarts),
    st.tuples(st.just("ready"), who, st.booleans()),
    st.tuples(st.just("uids"), st.booleans()),
)

# A reload in flight at SIGTERM: mostly edits that stop and start publishers (what races the
# ordered stop), and now and then any edit.
shutdown_ops = st.one_of(
    st.tuples(st.just("replace"), who, pubspecs()),
    st.tuples(st.just("remove"), who),
    st.tuples(st.just("add"), pubspecs()),
    ops,
)


def apply_ops(cfg: ModelConfig, todo: list[tuple[Any, ...]]) -> ModelConfig:
    pubs = {p.name: p for p in cfg.publishers}
    allow = cfg.allow_nobody

    def fresh(spec: PubSpec) -> PubSpec | None:
        if spec.name not in pubs:
            return spec
        free = [n for n in NAMES if n not in pubs]
        return replace(spec, name=free[0]) if free else None

    for op in todo:
        kind, arg = op[0], op[1]
        present = sorted(pubs)
        if kind == "uids":
            allow = arg if "uids" not in SKIP else allow
            continue
        if kind == "add":
            if (spec := fresh(arg)) is not None:
                pubs[spec.name] = spec
            continue
        if not present:
            continue
        name = present[arg % len(present)]
        if kind == "replace":
            del pubs[name]
            if (spec := fresh(op[2])) is not None:
                pubs[spec.name] = spec
        elif kind == "remove":
            del pubs[name]
        elif kind == "env":
            pubs[name] = replace(pubs[name], version=pubs[name].version + 1)
        elif kind == "term":
            pubs[name] = replace(pubs[name], term_delay=op[2])
        elif kind == "probe":
            pubs[name] = replace(pubs[name], probe=op[2])
        elif kind == "restart":
            pubs[name] = replace(pubs[name], restart=op[2])
        elif kind == "ready":
            pubs[name] = replace(pubs[name], slow_ready=op[2])
    if "probe" in SKIP:
        pubs = {n: replace(p, probe="none") for n, p in pubs.items()}
    return replace(cfg, publishers=tuple(pubs.values()), allow_nobody=allow)


@dataclass
class Pub:
    """What the model knows of one publisher of the running daemon."""

    spec: PubSpec | None  # None: the broken `#!` publisher
    expect: frozenset[str]  # the states it may settle in after the last step
    exits: tuple[int, int]  # the counter's range [lo, hi] after the last step
    restarts: tuple[int, int]
    state: str = ""  # as last seen settled
    pid: int = 0  # as last seen settled (0 = none)
    new_pid: bool = False  # the last step must have replaced its process
    same_pid: bool = False  # the last step must have kept its process
    probe_deadline: float = 0.0  # the process `pid` must be gone by then (a failing probe)
    probe_pid: int = 0

    def bump(self, exits: tuple[int, int] = (0, 0), restarts: tuple[int, int] = (0, 0)) -> None:
        self.exits = (self.exits[0] + exits[0], self.exits[1] + exits[1])
        self.restarts = (self.restarts[0] + restarts[0], self.restarts[1] + restarts[1])


def started(spec: PubSpec | None) -> frozenset[str]:
    """Where a publisher settles once started: a probe that cannot pass ends in a crash loop."""
    if spec is None:
        return frozenset({"FATAL"})
    if spec.probe == "dead":  # unhealthy counts as a failure, restarted unless never
        return frozenset({"EXITED" if spec.restart == "never" else "FATAL"})
    return frozenset({"RUNNING"})


def restarts_after(spec: PubSpec, code: int) -> bool:
    if spec.restart == "always":
        return True
    return spec.restart == "on-failure" and code != 0

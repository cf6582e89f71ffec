"""What a reload does: two configs compared instance by instance, by one explicit table.

`FIELD_EFFECTS` names every field of `PublisherSpec` with what a change of it does (restart the
process, rebuild the probe, or apply live); `diff_configs` refuses a field the table does not
list, so a new field cannot be silently ignored by a reload. `daemon_changes` says the same of
[daemon] (one line per changed setting); the listeners ([control], [monitor], [http]) report
their own changes as they apply them. `ReloadReport` is what a reload answers: both.
"""

from __future__ import annotations

__all__ = [
    "FIELD_EFFECTS",
    "ConfigDiff",
    "FieldEffect",
    "PublisherChange",
    "ReloadReport",
    "daemon_changes",
    "diff_configs",
]

from dataclasses import dataclass, fields, is_dataclass
from typing import Literal, NamedTuple

from pubmon.config.model import Config

# What a reload does when a publisher's field changes. Every field of PublisherSpec is listed
# (a test checks it, and diff_configs refuses an unlisted one), so a new field cannot be
# silently ignored by a reload:
# - restart: the process was started with it; the publisher restarts with the new value;
# - probe: the health watch is rebuilt at once, in the phase the run is in (no restart);
# - live: read where it is used (the next stop, backoff, exit decision, log write...).
FieldEffect = Literal["restart", "probe", "live"]
FIELD_EFFECTS: dict[str, FieldEffect] = {
    "name": "restart",
    "program": "restart",
    "index": "restart",
    "command": "restart",
    "directory": "restart",
    "environment": "restart",
    "inherit_environment": "restart",
    "user": "restart",
    "port": "live",  # what it changes ({port} in the command, the probe's port) says itself
    "numprocs": "live",
    "autostart": "live",  # the next daemon start; a reload starts only what it adds
    "depends_on": "live",
    "restart": "live",
    "success_exit_codes": "live",
    "start_timeout": "live",
    "stop_signal": "live",
    "stop_timeout": "live",
    "backoff": "live",
    "crash_loop": "live",
    "data_source": "probe",  # handed over by the new probe once the child is healthy
    "log": "live",
    "probe": "probe",
    # Written to the cgroup and set as rlimits when the process starts: a new value needs a
    # new process (systemd applies cgroup limits live; pubmon restarts, which is simpler and
    # says what happens).
    "limits": "restart",
    "memory_restart": "live",  # read by the memory sweep each second
    "memory_restart_after": "live",
    "critical": "live",  # read when it ends for good
}

ChangeKind = Literal["added", "removed", "restarted", "updated", "unchanged"]


@dataclass(frozen=True, slots=True)
class PublisherChange:
    """What a reload does to one instance, and the settings (dotted keys) that differ."""

    name: str
    change: ChangeKind
    fields: tuple[str, ...] = ()
    top: frozenset[str] = frozenset()  # the differing top-level fields of PublisherSpec


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """Every instance of the old and the new config, new ones in file order, removed last."""

    changes: tuple[PublisherChange, ...] = ()

    def _names(self, kind: ChangeKind) -> tuple[str, ...]:
        return tuple(sorted(c.name for c in self.changes if c.change == kind))

    @property
    def added(self) -> tuple[str, ...]:
        return self._names("added")

    @property
    def removed(self) -> tuple[str, ...]:
        return self._names("removed")

    @property
    def changed(self) -> tuple[str, ...]:
        """Restarted: spawn settings differ."""
        return self._names("restarted")

    @property
    def policy_only(self) -> tuple[str, ...]:
        """Updated: applied to the running publisher, no restart."""
        return self._names("updated")

    @property
    def unchanged(self) -> tuple[str, ...]:
        return self._names("unchanged")


def _differences(a: object, b: object, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two dataclasses of one type."""
    out = []
    for f in fields(a):  # type: ignore[arg-type]
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x == y:
            continue
        if is_dataclass(x) and type(x) is type(y):
            out.extend(_differences(x, y, prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs instance by instance (by instance name): see FIELD_EFFECTS."""
    before = {spec.name: spec for spec in old.publishers}
    changes = []
    for spec in new.publishers:
        was = before.get(spec.name)
        if was is None:
            changes.append(PublisherChange(spec.name, "added"))
            continue
        dotted = _differences(was, spec)
        top = frozenset(key.split(".", 1)[0] for key in dotted)
        unlisted = top - FIELD_EFFECTS.keys()
        assert not unlisted, f"FIELD_EFFECTS does not say what a reload does with {unlisted}"
        if not top:
            kind: ChangeKind = "unchanged"
        elif any(FIELD_EFFECTS[f] == "restart" for f in top):
            kind = "restarted"
        else:
            kind = "updated"
        changes.append(PublisherChange(spec.name, kind, tuple(dotted), top))
    after = {spec.name for spec in new.publishers}
    changes.extend(
        PublisherChange(spec.name, "removed") for spec in old.publishers if spec.name not in after
    )
    return ConfigDiff(tuple(changes))


# [daemon] settings read once, when the daemon starts: a reload reports them as pending.
_DAEMON_AT_START = ("log_dir", "cgroup", "log_stdout")


def daemon_changes(old: Config, new: Config) -> list[str]:
    """One line per changed [daemon] setting (the listeners report their own)."""
    out = []
    for f in fields(old.daemon):
        a, b = getattr(old.daemon, f.name), getattr(new.daemon, f.name)
        if a != b:
            at_start = f.name in _DAEMON_AT_START
            later = " (takes effect at the next daemon start)" if at_start else ""
            out.append(f"daemon.{f.name}: {_shown(f.name, a)} -> {_shown(f.name, b)}{later}")
    return out


def _shown(name: str, value: object) -> str:
    """A [daemon] value as the file writes it: modes in octal (0o640), the rest as repr."""
    if name.endswith("_mode") and isinstance(value, int):
        return f"0o{value:o}"
    return repr(value)


class ReloadReport(NamedTuple):
    """What a reload did: the publishers' diff, and one line per daemon-level change."""

    diff: ConfigDiff
    daemon: list[str]

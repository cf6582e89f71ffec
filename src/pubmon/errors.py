"""The PubmonError hierarchy. Imports nothing from the package, so every module can use it."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "InvalidState",
    "InvalidTransition",
    "PermissionDenied",
    "PubmonError",
    "RpcError",
    "SpawnError",
    "StartupError",
    "UnknownPublisher",
    "UpgradeRefused",
]

from typing import NamedTuple


class PubmonError(Exception):
    """Base of every error pubmon raises on purpose."""


class ConfigProblem(NamedTuple):
    """One thing wrong with a config file: where (dotted key) and what was expected.

    A NamedTuple, not a dataclass: the CLI imports this module, and `dataclasses` (with the
    `inspect` it pulls in) would cost it 12 ms of its 100 ms start budget.
    """

    key: str
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {self.why}" if self.key else self.why


class ConfigError(PubmonError):
    """A config file that cannot be used. Carries every problem found in the file at once."""

    def __init__(self, file: str, problems: list[ConfigProblem]) -> None:
        self.file = file
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{file}: {len(self.problems)} error(s):\n{lines}")


class SpawnError(PubmonError):
    """A publisher could not be started (exec failed, unknown user, ...)."""

    def __init__(self, name: str, why: str, *, permanent: bool) -> None:
        self.name = name
        self.why = why
        self.permanent = permanent
        super().__init__(f"cannot start {name!r}: {why}")


class UnknownPublisher(PubmonError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no publisher named {name!r}")


class InvalidState(PubmonError):
    """An operator's request that does not fit the publisher's current state."""


class InvalidTransition(PubmonError):
    """A lifecycle move the transition table forbids: always a pubmon bug."""

    def __init__(self, name: str, old: object, new: object) -> None:
        super().__init__(f"publisher {name!r}: {old} -> {new} is not an allowed move")


class PermissionDenied(PubmonError):
    """A peer that may not make this call on this listener."""


class RpcError(PubmonError):
    """A Thrift call that failed on the wire (timeout, closed connection, bad reply)."""


class StartupError(PubmonError):
    """The daemon cannot start: another one holds the lock, a listener cannot bind, ..."""


class UpgradeRefused(PubmonError):
    """`pubmon upgrade`: the code on disk cannot take over (its check failed); nothing changed."""

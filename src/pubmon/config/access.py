"""Access levels: who may see states, who may read logs, who may change things.

Three levels, each including the ones before it:

- ``status``: names, states, health, pids, counters, metrics (fb303 getters, listPublishers);
- ``logs``: the content of the ring buffers and the log files (``tailLog``, ``tailDaemonLog``);
- ``control``: anything that changes state (start, stop, restart, reload, reopenLogs,
  setOption, shutdown, reinitialize) and getCpuProfile (it costs CPU for as long as it asks).

Logs are a level of their own because "read-only" is not "harmless": publishers print tokens,
customer data and stack traces, which their log files protect with file modes. A listener that
cannot tell who is calling (TCP without client certificates, HTTP without a credential) gets
``status`` only.

Allow lists, one per listener, map a level to the principals that get it::

    [control]
    allow = { control = ["root", "@ops"], logs = ["@dev"], status = ["*"] }
    [monitor]
    allow = { control = ["CN=operator,O=pubmon"], logs = ["DNS:dash.example"] }

Why this shape: one inline table reads like the access matrix an operator reviews, each level
names its principals once, and the levels nest, so ``control = ["root"]`` is enough for root
(an operator who may restart a publisher may also see why it died). A principal on the unix
socket is a uid (``1000`` or ``"1000"``), a user name (``"alice"``), a group (``"@ops"``) or a
gid (``"@27"``), checked against the peer's SO_PEERCRED uid and gid and its supplementary
groups (SO_PEERGROUPS): all vouched for by the kernel at connect time, none of it from the
peer. Names are resolved when the config is loaded, so a typo is a config error, and a
refusal never waits on NSS. On TCP with mutual TLS a principal is a certificate subject
(``"CN=operator,O=pubmon"``: the same attributes, in any order, no more and no fewer) or a
subjectAltName (``"DNS:dash.example"``, ``"IP:10.0.0.7"``, ``"email:ops@example.com"``,
``"URI:spiffe://example/ops"``). ``"*"`` is any peer the listener let in.

A refusal names the method, the level it needs, who asked and the config key that grants it.
Each is counted (``access.denied.<listener>.<level>``) and logged at most once per peer per
minute, so a refused client in a retry loop cannot flood the journal.

Example::

    where = "the control socket /run/pubmon/pubmon.sock"
    policy = Policy("control", where, acl, "[control] allow.{level}")
    keys = unix_keys(uid=1001, gids=(1001, 27))
    if not policy.allowed(keys, level_of("tailLog")):
        raise PermissionDenied(policy.refusal(keys, "uid 1001", "tailLog", "1001 or @group"))
"""

from __future__ import annotations

__all__ = [
    "ANONYMOUS",
    "LEVELS",
    "AccessList",
    "Level",
    "Policy",
    "Principal",
    "Refusals",
    "cert_keys",
    "cert_principal",
    "level_of",
    "unix_keys",
    "unix_principal",
]

import enum
import grp
import logging
import pwd
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields
from typing import final

from pubmon.thrift.peer import SUBJECT_ATTRS

logger = logging.getLogger(__name__)


class Level(enum.StrEnum):
    STATUS = "status"
    LOGS = "logs"
    CONTROL = "control"

    @property
    def rank(self) -> int:
        return _RANK[self]


LEVELS = (Level.STATUS, Level.LOGS, Level.CONTROL)
_RANK = {level: i for i, level in enumerate(LEVELS)}

_STATUS = (
    # fb303
    "getName", "getVersion", "getStatus", "getStatusDetails", "getCounters", "getCounter",
    "getOption", "getOptions", "aliveSince",
    # PubmonService
    "listPublishers", "getPublisher", "getDaemonInfo",
)  # fmt: skip
_LOGS = ("tailLog", "tailDaemonLog")
_CONTROL = (
    "startPublisher", "stopPublisher", "restartPublisher", "signalPublisher", "reloadConfig",
    "diffConfig", "reopenLogs", "setOption", "shutdown", "reinitialize", "getCpuProfile",
    "pausePublisher", "resumePublisher", "upgrade", "clearLog",
)  # fmt: skip
_METHOD_LEVELS = {
    **dict.fromkeys(_STATUS, Level.STATUS),
    **dict.fromkeys(_LOGS, Level.LOGS),
    **dict.fromkeys(_CONTROL, Level.CONTROL),
}


def level_of(method: str) -> Level:
    """The level a PubmonService or fb303 method needs; a method not listed needs control (a
    method added to the IDL without a level here is closed, not open, until someone decides)."""
    return _METHOD_LEVELS.get(method, Level.CONTROL)


# --- principals -------------------------------------------------------------------------------

ANONYMOUS = frozenset({"*"})  # the keys of a peer the listener cannot identify


@dataclass(frozen=True, slots=True)
class Principal:
    """One entry of an allow list: as the operator wrote it, and the key it matches.

    Keys: ``*``, ``uid:N``, ``gid:N``, ``subject:CN=a,O=b`` (attributes sorted), ``DNS:name``
    (lower case), ``IP:addr``, ``email:addr``, ``URI:uri``.
    """

    spelled: str
    key: str


_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no uid"


def unix_principal(entry: object) -> Principal:
    """A principal of the unix socket's allow list: 1000, "1000", "alice", "@ops", "@27", "*".

    Names are looked up now. Raises ValueError saying what was expected.
    """
    if isinstance(entry, bool) or not isinstance(entry, int | str):
        raise ValueError('expected a uid, a user name, @group, @gid or "*"')
    if isinstance(entry, int):
        return Principal(str(entry), f"uid:{_id(entry)}")
    if entry == "*":
        return Principal(entry, "*")
    group = entry.startswith("@")
    name = entry[1:] if group else entry
    if not name:
        raise ValueError(f"expected a name after '@', got {entry!r}")
    if name.isdigit():
        return Principal(entry, f"{'gid' if group else 'uid'}:{_id(int(name))}")
    try:
        if group:
            return Principal(entry, f"gid:{grp.getgrnam(name).gr_gid}")
        return Principal(entry, f"uid:{pwd.getpwnam(name).pw_uid}")
    except KeyError:
        what = "group" if group else "user"
        raise ValueError(f"no {what} named {name!r} on this host") from None


def _id(n: int) -> int:
    if not 0 <= n <= _MAX_ID:
        raise ValueError(f"expected an integer in 0..{_MAX_ID}, got {n}")
    return n


# Subject attributes as people write them, whatever the case: "cn=..." is "CN=...".
_SHORT = {v.upper(): v for v in SUBJECT_ATTRS.values()}
_SANS = {"DNS": "DNS", "IP": "IP", "IP ADDRESS": "IP", "EMAIL": "email", "URI": "URI"}


def _subject_key(rdns: Iterable[tuple[str, str]]) -> str:
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(",", "\\,")

    attrs = sorted((SUBJECT_ATTRS.get(a, _SHORT.get(a.upper(), a)), v) for a, v in rdns)
    return "subject:" + ",".join(f"{a}={esc(v)}" for a, v in attrs)


def _split_dn(text: str) -> list[tuple[str, str]]:
    """ "CN=a,O=b" -> [("CN", "a"), ("O", "b")]; a backslash escapes the next character."""
    parts, cur, escaped = [], "", False
    for ch in text:
        if escaped:
            cur, escaped = cur + ch, False
        elif ch == "\\":
            cur += ch
            escaped = True
        elif ch == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        attr, eq, value = part.strip().partition("=")
        if not eq or not attr.strip() or not value:
            raise ValueError(
                f'expected a subject such as "CN=operator,O=pubmon" or a SAN such as '
                f'"DNS:dash.example", got {text!r}'
            )
        unescaped = value.replace("\\,", ",").replace("\\\\", "\\")
        out.append((attr.strip(), unescaped))
    return out


def cert_principal(entry: object) -> Principal:
    """A principal of a TLS listener's allow list: a subject, a SAN or "*".

    Raises ValueError saying what was expected.
    """
    if not isinstance(entry, str) or not entry:
        raise ValueError('expected a certificate subject ("CN=...,O=..."), a SAN or "*"')
    if entry == "*":
        return Principal(entry, "*")
    kind, colon, value = entry.partition(":")
    if colon and "=" not in kind:
        san = _SANS.get(kind.strip().upper())
        if san is None or not value:
            raise ValueError(f"expected a SAN as DNS:, IP:, email: or URI:, got {entry!r}")
        return Principal(entry, _san_key(san, value))
    return Principal(entry, _subject_key(_split_dn(entry)))


def _san_key(kind: str, value: str) -> str:
    if kind == "DNS":
        value = value.lower().rstrip(".")
    elif kind == "IP":
        import ipaddress

        try:
            value = str(ipaddress.ip_address(value.strip()))
        except ValueError:
            pass  # getpeercert gives what OpenSSL printed; compare as written
    return f"{kind}:{value}"


def unix_keys(uid: int, gids: Iterable[int]) -> frozenset[str]:
    """The keys a unix peer matches: its uid, each of its gids, and "*"."""
    return frozenset({"*", f"uid:{uid}", *(f"gid:{g}" for g in gids)})


def cert_keys(
    subject: Iterable[tuple[str, str]], sans: Iterable[tuple[str, str]]
) -> frozenset[str]:
    """The keys a verified client certificate matches: its subject (as getpeercert() spells
    the attributes), each subjectAltName (getpeercert's ("DNS", "x") pairs), and "*"."""
    keys = {"*", _subject_key(subject)}
    for kind, value in sans:
        san = _SANS.get(kind.upper())
        if san is not None:
            keys.add(_san_key(san, value))
    return frozenset(keys)


# --- allow lists ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessList:
    """Per level, the principals given that level (and, through nesting, the ones below)."""

    status: tuple[Principal, ...] = ()
    logs: tuple[Principal, ...] = ()
    control: tuple[Principal, ...] = ()

    def at(self, level: Level) -> tuple[Principal, ...]:
        entries: tuple[Principal, ...] = getattr(self, level.value)
        return entries

    def keys(self) -> frozenset[str]:
        return frozenset(p.key for level in LEVELS for p in self.at(level))

    def level(self, keys: Collection[str]) -> Level | None:
        """The highest level whose list names one of `keys`; None: no level at all."""
        for level in reversed(LEVELS):
            if any(p.key in keys for p in self.at(level)):
                return level
        return None

    def changes(self, new: AccessList, where: str) -> list[str]:
        """One line per level whose list differs: "control.allow: logs += @dev -= 1000"."""
        out = []
        for f in fields(self):
            old_keys = {p.key: p.spelled for p in getattr(self, f.name)}
            new_keys = {p.key: p.spelled for p in getattr(new, f.name)}
            added = [s for k, s in new_keys.items() if k not in old_keys]
            gone = [s for k, s in old_keys.items() if k not in new_keys]
            if added or gone:
                text = " ".join([*(f"+= {s}" for s in added), *(f"-= {s}" for s in gone)])
                out.append(f"{where}: {f.name} {text}")
        return out


@final
class Policy:
    """Who may do what on one listener.

    ``grant_key`` names the config key that grants a level, with ``{level}`` in it
    ("[control] allow.{level} in /etc/pubmon/pubmon.toml"). ``always`` are keys given control
    whatever the list says (the daemon's own uid on the unix socket). ``anonymous_note`` (with
    ``{level}``) is said to a peer with no keys of its own (TCP without client certificates),
    instead of pointing at an allow list it can never be in.
    """

    def __init__(
        self,
        listener: str,
        where: str,
        allow: AccessList,
        grant_key: str,
        *,
        always: Collection[str] = (),
        anonymous_note: str | None = None,
    ) -> None:
        self.listener = listener
        self.where = where
        self.allow = allow
        self.grant_key = grant_key
        self.always = frozenset(always)
        self.anonymous_note = anonymous_note
        # key -> the rank of the highest level it is given; and per set of keys (a peer), the
        # verdict, so that a call costs one dict lookup (~0.1 µs) once the peer is known.
        self._ranks: dict[str, int] = {}
        for level in LEVELS:
            for p in allow.at(level):
                self._ranks[p.key] = _RANK[level]
        for key in self.always:
            self._ranks[key] = _RANK[Level.CONTROL]
        self._seen: dict[frozenset[str], int] = {}  # keys of recent peers -> their rank

    def _rank(self, keys: Collection[str]) -> int:
        if isinstance(keys, frozenset):  # a frozenset keeps its hash: one lookup per call
            rank = self._seen.get(keys)
            if rank is None:
                if len(self._seen) >= 1024:
                    self._seen.clear()
                rank = self._seen[keys] = max((self._ranks.get(k, -1) for k in keys), default=-1)
            return rank
        return max((self._ranks.get(k, -1) for k in keys), default=-1)

    def level(self, keys: Collection[str]) -> Level | None:
        rank = self._rank(keys)
        return LEVELS[rank] if rank >= 0 else None

    def allowed(self, keys: Collection[str], level: Level) -> bool:
        return self._rank(keys) >= _RANK[level]

    def refusal(
        self,
        keys: Collection[str],
        who: str,
        method: str | None,
        principal: str,
        *,
        level: Level | None = None,
    ) -> str:
        """Why `who` may not call `method` (None: may not connect at all) and how to grant it:
        add `principal` (how the operator names the peer) to the grant key of the level.
        `level` defaults to `level_of(method)` (status for None); give it for what is not a
        Thrift method ("GET /logs/feed" needs Level.LOGS)."""
        if level is None:
            level = Level.STATUS if method is None else level_of(method)
        got = self.level(keys)
        has = f"has {got}" if got is not None else "has no access level"
        what = f"{method} needs the {level} level" if method else "every call needs a level"
        lead = f"{what} on {self.where}; {who} {has}"
        if set(keys) <= ANONYMOUS and self.anonymous_note is not None:
            return f"{lead}. {self.anonymous_note.format(level=level)}"
        grant = self.grant_key.format(level=level)
        return f"{lead}. To grant it, add {principal} to {grant}, then reload"


# --- refusals ---------------------------------------------------------------------------------


@final
class Refusals:
    """Counts refusals per listener and level, and logs each peer at most once a minute.

    ``track(listener)`` lists that listener's counters (at 0) before its first refusal, so a
    scraper sees the series from the start.
    """

    LOG_EVERY = 60.0
    MAX_PEERS = 4096  # peers remembered for the rate limit (loopback alone has 2^24 addresses)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self._flood_logged = 0.0

    def track(self, listener: str) -> None:
        for level in LEVELS:
            self.counts.setdefault(f"access.denied.{listener}.{level}", 0)

    def refuse(
        self, listener: str, level: Level, peer: str, message: str, *, seen_as: str = ""
    ) -> None:
        """Count a refusal; log it unless `peer` (the rate limit's key: a uid, an address, a
        certificate) was logged in the last minute. `seen_as` adds detail to the log line (a
        pid, a port) without splitting the key."""
        self.track(listener)
        self.counts[f"access.denied.{listener}.{level}"] += 1
        now = time.monotonic()
        key = (listener, peer)
        last = self._logged.get(key)
        if last is not None and now - last < self.LOG_EVERY:
            return
        if last is None and len(self._logged) >= self.MAX_PEERS:
            cutoff = now - self.LOG_EVERY
            self._logged = {k: t for k, t in self._logged.items() if t > cutoff}
            if len(self._logged) >= self.MAX_PEERS:
                if now - self._flood_logged >= self.LOG_EVERY:
                    self._flood_logged = now
                    logger.warning(
                        "refusing calls from more than %d peers a minute on %s; "
                        "not logging each one (see access.denied.* counters)",
                        self.MAX_PEERS,
                        listener,
                    )
                return
        self._logged[key] = now
        logger.warning("access denied on %s to %s%s: %s", listener, peer, seen_as, message)

    def counters(self) -> dict[str, int]:
        return dict(self.counts)

"""PubmonService: a thin adapter from Thrift calls to the daemon and its Supervisor.

It sees the daemon through `DaemonControl`, the few things it reads and asks of it (a Protocol
defined here, where it is used): the service layer sits below pubmon.daemon and never imports it.

The same handler serves both listeners; `Listeners` decides who may call what, by the access
levels of `pubmon.config.access` (status, logs, control):
- the unix control socket: SO_PEERCRED uid and groups against `[control] allow` (allow_uids is
  its control list; the daemon's own uid always has control). The file is 0600 unless the
  lists name someone else; then it is 0666 and the kernel-vouched credentials are the gate;
- the TCP monitor listener: status only for peers without a client certificate; with mutual
  TLS, the certificate's subject or SANs against `[monitor] allow`.
A peer with no level at all is refused when it connects (its first call is answered
PermissionDenied, then the connection closes). Every call at the control level is logged with
its peer (uid and pid, or the certificate subject); refusals are counted and logged by
`access.Refusals`. A reload re-applies both sections through `Listeners.reconfigure`.
"""

from __future__ import annotations

__all__ = ["DaemonControl", "Listeners", "PubmonHandler", "UpgradeAnswer", "tls_context"]

import asyncio
import errno
import functools
import hashlib
import logging
import os
import ssl
import stat
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

from pubmon._version import __version__
from pubmon.config.access import (
    ANONYMOUS,
    AccessList,
    Level,
    Policy,
    Refusals,
    cert_keys,
    level_of,
    unix_keys,
)
from pubmon.config.diff import ConfigDiff, ReloadReport
from pubmon.config.model import Config, ControlConfig, MonitorConfig
from pubmon.core.lifecycle import PublisherState
from pubmon.core.output import LogChunk, LogLine, OutputLog
from pubmon.core.procstats import ProcFigures, ProcStats
from pubmon.core.publisher import Publisher, PublisherSnapshot
from pubmon.errors import (
    ConfigError,
    ConfigProblem,
    InvalidState,
    PermissionDenied,
    StartupError,
    UnknownPublisher,
    UpgradeRefused,
)
from pubmon.service import daemonlog as _daemonlog
from pubmon.thrift import idl
from pubmon.thrift.codec import Encoded, encode_struct, field_encoder
from pubmon.thrift.server import Peer, ThriftServer, fair_turn

if TYPE_CHECKING:
    from pubmon.core.supervisor import Supervisor

logger = logging.getLogger(__name__)

TAIL_WAIT = 0.5  # tailLog with nothing new waits this long for a line (long poll for tail -f)
_SIGNALLABLE = (PublisherState.STARTING, PublisherState.RUNNING, PublisherState.STOPPING)
NO_WAIT = 0.1  # start/stop/restart with noWait: how long to wait for a refusal before answering


class UpgradeAnswer(Protocol):
    """An upgrade the new code accepted (the daemon re-executes right after the answer)."""

    @property
    def old_version(self) -> str: ...
    @property
    def new_version(self) -> str: ...
    @property
    def publishers(self) -> int: ...  # processes carried over
    @property
    def upgrades_before(self) -> int: ...


class Upgrades(Protocol):
    async def upgrade(self) -> UpgradeAnswer:
        """Upgrade in place; InvalidState or UpgradeRefused when it will not."""
        ...

    def admit(self) -> None:
        """InvalidState("pubmon is upgrading: retry") once an upgrade began, else the calling
        task is tracked until its answer went out."""

    def cuttable(self, accepted: str | None) -> AbstractAsyncContextManager[None]:
        """A wait that an upgrade ends early (InvalidState naming `accepted`, unless None)."""
        ...


class DaemonControl(Protocol):
    """What the monitor service reads and asks of the daemon (pubmon.daemon.daemon.Daemon)."""

    @property
    def config(self) -> Config: ...
    @property
    def supervisor(self) -> Supervisor | None: ...  # None until the publishers are set up
    @property
    def stopping(self) -> bool: ...
    @property
    def started_at(self) -> float: ...
    @property
    def reloads(self) -> int: ...
    @property
    def last_reload_error(self) -> str: ...
    @property
    def procstats(self) -> ProcStats: ...
    @property
    def upgrader(self) -> Upgrades: ...
    def counters(self) -> dict[str, int]: ...
    def fb303_status(self) -> str: ...  # a name of fb_status
    def status_details(self) -> str: ...
    def request_reload(self) -> None: ...
    def request_stop(self) -> None: ...
    async def reload(self) -> ReloadReport:
        """Reload the config file (ConfigError, InvalidState, StartupError: nothing changed)."""
        ...

    def reopen_logs(self) -> None: ...


def _publisher_info(
    snap: PublisherSnapshot, fig: ProcFigures | None = None, pub: Publisher | None = None
) -> Any:
    m = idl.pubmon()
    if snap.pid is None:
        fig = None  # figures of a run that has ended
    times = _times(pub)
    return m.PublisherInfo(
        name=snap.name,
        program=snap.program,
        state=str(snap.state),
        pid=snap.pid or 0,
        health=str(snap.health),
        restarts=snap.restarts,
        lastExit=snap.last_exit,
        lastExitReason=snap.last_exit_reason,
        uptime=round(snap.uptime, 3),
        port=snap.port or 0,
        statusDetails=snap.details,
        cpuSeconds=None if fig is None else round(fig.cpu_seconds, 2),
        memoryBytes=None if fig is None else fig.rss_bytes,
        openFds=None if fig is None else fig.open_fds,
        backoffUntil=times[0],
        startedAt=times[1],
        stateSince=times[2],
        probe=pub.spec.probe.kind if pub is not None else None,
    )


def _times(pub: Publisher | None) -> tuple[float | None, float | None, float | None]:
    """The wall-clock times of PublisherInfo: backoff deadline, start of the run, state since."""
    if pub is None:
        return None, None, None
    backoff = pub.backoff_until if pub.state == PublisherState.BACKOFF else None
    return backoff, pub.started_wall, pub.state_since


def _log_chunk(chunk: LogChunk) -> Any:
    m = idl.pubmon()
    lines = [
        m.LogLine(seq=x.seq, time=x.time, stream=x.stream, text=x.text, partial=x.partial)
        for x in chunk.lines
    ]
    return m.LogChunk(lines=lines, nextSeq=chunk.next_seq, missed=chunk.missed)


class PubmonHandler:
    """The Thrift methods. Read-only ones are plain functions (answered without a task)."""

    def __init__(self, daemon: DaemonControl, rpc_counters: Callable[[], dict[str, int]]) -> None:
        self._daemon = daemon
        self._rpc_counters = rpc_counters
        self._infos: dict[str, tuple[tuple[object, ...], Encoded]] = {}  # see listPublishers
        self._uptime: Callable[[Any], bytes] | None = None
        self._options: dict[str, str] = {}
        self._log = _daemonlog.install()

    # --- helpers ------------------------------------------------------------------------------

    def _sup(self) -> Supervisor:
        sup = self._daemon.supervisor
        if sup is None:
            raise idl.pubmon().InvalidState(message="the daemon is still starting")
        return sup

    def _mutable(self) -> Supervisor:
        if self._daemon.stopping:
            raise idl.pubmon().InvalidState(message="the daemon is stopping")
        return self._sup()

    def _admit(self, *, declared: bool = True) -> Any:
        """[upgrade] hook, first thing in every mutating or waiting call: refused with
        InvalidState("pubmon is upgrading: retry") once an upgrade began (as a
        TApplicationException of that text where the method declares no InvalidState), else
        tracked so that the exec waits for its answer. Returns the daemon's Upgrader."""
        up = self._daemon.upgrader
        try:
            up.admit()
        except InvalidState as exc:
            if declared:
                raise self._translate(exc) from None
            from thriftpy2.thrift import TApplicationException

            kind = TApplicationException.UNKNOWN
            raise TApplicationException(kind, f"InvalidState: {exc}") from None
        return up

    @staticmethod
    def _translate(exc: Exception) -> Exception:
        m = idl.pubmon()
        out: Exception = exc
        if isinstance(exc, UnknownPublisher):
            out = m.UnknownPublisher(message=str(exc))
        elif isinstance(exc, InvalidState):
            out = m.InvalidState(message=str(exc))
        elif isinstance(exc, ConfigError):
            out = m.ConfigError(message=str(exc), problems=[str(p) for p in exc.problems])
        return out

    # --- fb303 --------------------------------------------------------------------------------

    def getName(self) -> str:
        return "pubmon"

    def getVersion(self) -> str:
        return __version__

    def getStatus(self) -> int:
        return int(idl.FbStatus[self._daemon.fb303_status()])

    def getStatusDetails(self) -> str:
        return self._daemon.status_details()

    def getCounters(self) -> dict[str, int]:
        out = self._daemon.counters()
        out.update(self._rpc_counters())
        return out

    def getCounter(self, key: str) -> int:
        return self.getCounters().get(key, 0)

    def setOption(self, key: str, value: str) -> None:
        if key == "log_level":
            logging.getLogger().setLevel(value.upper())
        self._options[key] = value

    def getOption(self, key: str) -> str:
        return self._options.get(key, "")

    def getOptions(self) -> dict[str, str]:
        return dict(self._options)

    def getCpuProfile(self, profileDurationInSec: int) -> str:
        return ""

    def aliveSince(self) -> int:
        return int(self._daemon.started_at)

    def reinitialize(self) -> None:
        self._daemon.request_reload()

    def shutdown(self) -> None:
        self._daemon.request_stop()

    # --- PubmonService ------------------------------------------------------------------------

    def listPublishers(self) -> list[Any]:
        """Every publisher. Each PublisherInfo is encoded again only when something in it other
        than its uptime changed (1000 of them: ~16 ms -> ~3 ms a call)."""
        sup = self._daemon.supervisor
        if sup is None:
            return []
        if self._uptime is None:
            self._uptime = field_encoder(idl.pubmon().PublisherInfo, "uptime")
        uptime, old, new = self._uptime, self._infos, {}
        pubs = list(sup.publishers.values())
        snaps = [pub.snapshot() for pub in pubs]
        procstats = self._daemon.procstats
        procstats.refresh_soon({snap.name: snap.pid for snap in snaps})
        figures = procstats.figures
        out: list[Any] = []
        for pub, snap in zip(pubs, snaps, strict=True):
            fig = pub.figures(figures.get(snap.name))  # its cgroup's first, as getPublisher
            key = (*snap[:-1], fig, *_times(pub), pub.spec.probe.kind)  # all but the uptime
            hit = old.get(snap.name)
            if hit is None or hit[0] != key:
                hit = (key, encode_struct(_publisher_info(snap, fig, pub), skip="uptime"))
            new[snap.name] = hit
            out.append(Encoded(uptime(round(snap.uptime, 3)) + hit[1]))
        self._infos = new
        return out

    def getPublisher(self, name: str) -> Any:
        try:
            pub = self._sup().get(name)
            fig = pub.figures(self._daemon.procstats.one(pub.name, pub.pid))  # cgroup first
            return _publisher_info(pub.snapshot(), fig, pub)
        except UnknownPublisher as exc:
            raise self._translate(exc) from None

    async def startPublisher(self, name: str, noWait: bool | None = None) -> Any:
        return await self._request("start", name, bool(noWait))

    async def stopPublisher(self, name: str, noWait: bool | None = None) -> Any:
        return await self._request("stop", name, bool(noWait))

    async def restartPublisher(self, name: str, noWait: bool | None = None) -> Any:
        return await self._request("restart", name, bool(noWait))

    async def pausePublisher(self, name: str) -> Any:
        return await self._request("pause", name, False)

    async def resumePublisher(self, name: str) -> Any:
        return await self._request("resume", name, False)

    async def _request(self, what: str, name: str, no_wait: bool) -> Any:
        up = self._admit()
        sup = self._mutable()
        # An upgrade answers a request it finds posted: the exec waits until its publisher
        # took it, and the new image carries it out.
        accepted = f"the {what} of {name} was accepted and goes on (see pubmon status)"
        try:
            pub = sup.get(name)
            async with up.cuttable(accepted):
                if no_wait:
                    # The request is shielded in the publisher: giving up the wait leaves it
                    # in force. NO_WAIT is for a refusal (already RUNNING) to come back as one.
                    try:
                        async with asyncio.timeout(NO_WAIT):
                            await getattr(sup, what)(name)
                    except TimeoutError:
                        pass
                else:
                    await getattr(sup, what)(name)
        except (UnknownPublisher, InvalidState) as exc:
            raise self._translate(exc) from None
        return _publisher_info(pub.snapshot(), pub=pub)

    async def signalPublisher(self, name: str, signal: str) -> Any:
        import signal as signals

        self._admit()
        self._mutable()
        m = idl.pubmon()
        try:
            pub = self._sup().get(name)
        except UnknownPublisher as exc:
            raise self._translate(exc) from None
        text = signal.strip().upper()
        try:
            sig = signals.Signals(int(text)) if text.isdigit() else None
            sig = sig or signals.Signals[text if text.startswith("SIG") else "SIG" + text]
        except (KeyError, ValueError):
            raise m.InvalidState(message=f"no signal named {signal!r}") from None
        child = pub.child
        if child is None or child.returncode is not None or pub.state not in _SIGNALLABLE:
            raise m.InvalidState(message=f"{name} has no process to signal ({pub.state})")
        logger.info("%s pid %s: %s sent by an operator", name, child.pid, sig.name)
        child.signal(sig)
        return _publisher_info(pub.snapshot(), pub=pub)

    def getDaemonInfo(self) -> Any:
        d = self._daemon
        return idl.pubmon().DaemonInfo(
            pid=os.getpid(),
            version=__version__,
            startedAt=d.started_at,
            configPath=d.config.path,
            lastReloadError=d.last_reload_error,
            reloads=d.reloads,
        )

    async def diffConfig(self) -> Any:
        from pubmon.config.diff import daemon_changes, diff_configs
        from pubmon.config.load import load_config

        current = self._daemon.config
        try:
            new = load_config(current.path)
        except ConfigError as exc:
            raise self._translate(exc) from None
        diff = diff_configs(current, new)
        return self._reload_result(diff, daemon_changes(current, new))

    def tailDaemonLog(self, afterSeq: int, maxLines: int) -> Any:
        m = idl.pubmon()
        recs, next_seq, missed = self._log.tail(afterSeq, max(1, min(maxLines, 10000)))
        lines = [
            m.LogLine(seq=r.seq, time=r.time, stream=r.level, text=r.text, partial=False)
            for r in recs
        ]
        return m.LogChunk(lines=lines, nextSeq=next_seq, missed=missed)

    async def reloadConfig(self, noWait: bool | None = None) -> Any:
        self._admit()  # one in flight is not cut: the exec waits for its reload
        self._mutable()
        preview = await self.diffConfig() if noWait else None  # a bad file: ConfigError now
        try:
            if preview is None:
                report = await self._daemon.reload()
            else:
                try:  # the reload is shielded in the daemon: giving up the wait leaves it on
                    async with asyncio.timeout(NO_WAIT):
                        report = await self._daemon.reload()
                except TimeoutError:
                    preview.daemon = [*preview.daemon, "still applying: not waiting for it"]
                    return preview
        except (ConfigError, InvalidState) as exc:
            raise self._translate(exc) from None
        except StartupError as exc:  # a listener could not be rebound: nothing changed
            raise idl.pubmon().ConfigError(message=str(exc), problems=[str(exc)]) from None
        return self._reload_result(report.diff, report.daemon)

    @staticmethod
    def _reload_result(diff: ConfigDiff, daemon: list[str]) -> Any:
        m = idl.pubmon()
        return m.ReloadResult(
            added=list(diff.added),
            removed=list(diff.removed),
            changed=list(diff.changed),  # restarted; see `publishers` for the rest
            unchanged=list(diff.unchanged),
            publishers=[
                m.PublisherChange(name=c.name, change=c.change, fields=list(c.fields))
                for c in diff.changes
            ],
            daemon=daemon,
        )

    async def upgrade(self) -> Any:
        self._mutable()
        m = idl.pubmon()
        try:
            got = await self._daemon.upgrader.upgrade()
        except InvalidState as exc:
            raise self._translate(exc) from None
        except UpgradeRefused as exc:
            raise m.UpgradeRefused(message=str(exc)) from None
        return m.UpgradeResult(
            oldVersion=got.old_version,
            newVersion=got.new_version,
            publishers=got.publishers,
            upgradesBefore=got.upgrades_before,
        )

    async def tailLog(self, name: str, afterSeq: int, maxLines: int) -> Any:
        up = self._admit(declared=False)
        try:
            output = self._sup().get(name).output
        except UnknownPublisher as exc:
            raise self._translate(exc) from None
        if 0 <= afterSeq == output.last_seq and maxLines > 0:
            # Nothing new yet: wait a little for it, so `tail -f` need not spin. (An upgrade
            # ends the wait: the answer goes out before the exec.)
            try:
                async with asyncio.timeout(TAIL_WAIT), up.cuttable(None):
                    await output.wait_beyond(afterSeq)
            except TimeoutError:
                pass
        await fair_turn()  # building a big chunk is work: take our turn in the server's queue
        if afterSeq < 0:
            return _log_chunk(_newest(output, -afterSeq))
        return _log_chunk(_oldest(output, afterSeq, maxLines))

    def reopenLogs(self) -> None:
        self._sup()
        self._daemon.reopen_logs()

    async def clearLog(self, name: str) -> Any:
        try:
            output = self._sup().get(name).output
        except UnknownPublisher as exc:
            raise self._translate(exc) from None
        done = await output.clear()
        logger.info(
            "%s: log cleared by an operator: %d ring lines, files %s%s",
            name, done.lines, ", ".join(done.files) or "none",
            f" ({done.error})" if done.error else "",
        )  # fmt: skip
        return idl.pubmon().LogCleared(lines=done.lines, files=done.files, error=done.error)


# One tailLog reply stays under ~1 MiB (the server holds at most one unsent reply per
# connection, and 150 callers that never read must not cost a GB): lines are read from the ring
# in pages and taken while their text (in characters, at most 4 bytes each once encoded) plus a
# LogLine's overhead fits REPLY_CHARS. At least one line always goes, however long.
REPLY_CHARS = 256 * 1024
_LINE_OVERHEAD = 48  # field headers, seq, time, stream, partial, STOP
_PAGE = 64  # lines decoded at a time (64 lines of the default 64 KiB max_line: 4 MiB)
_MAX_LINES = 10_000


def _oldest(output: OutputLog, after: int, max_lines: int) -> LogChunk:
    """Up to ``max_lines`` lines after ``after``, oldest first, cut at REPLY_CHARS. nextSeq is
    the last line sent, so a client that follows nextSeq pages through the rest."""
    want = min(max(max_lines, 1), _MAX_LINES)
    lines: list[LogLine] = []
    missed, cursor, budget = 0, after, REPLY_CHARS
    while len(lines) < want:
        page = output.tail(cursor, min(want - len(lines), _PAGE))
        if not lines:
            if not page.lines:
                return page  # caught up (or a cursor from the future: resynced)
            missed = page.missed
        elif page.missed or not page.lines:
            break  # caught up, or the ring moved under us: the next call reports it
        for x in page.lines:
            budget -= len(x.text) + _LINE_OVERHEAD
            if budget < 0 and lines:
                return LogChunk(lines, lines[-1].seq, missed)
            lines.append(x)
        cursor = lines[-1].seq
    return LogChunk(lines, lines[-1].seq, missed)


def _newest(output: OutputLog, n: int) -> LogChunk:
    """The newest ``n`` lines, cut at REPLY_CHARS by leaving out the oldest. nextSeq is the
    newest line; ``missed`` counts lines of the ``n`` that the ring no longer holds. Lines held
    back for size are those from ``nextSeq - n + missed`` to the first line sent (exclusive):
    a client fetches them with ``tailLog(name, nextSeq - n + missed, ...)``."""
    n = min(n, _MAX_LINES)
    last = output.last_seq
    start = max(0, last - n)
    lines: list[LogLine] = []
    missed, hi, budget = 0, last, REPLY_CHARS
    while hi > start:
        lo = max(start, hi - _PAGE)
        # (lo, hi]; past an eviction the ring answers from its oldest line, maybe beyond hi
        got = [x for x in output.tail(lo, hi - lo).lines if x.seq <= hi]
        evicted = len(got) < hi - lo  # reached the oldest line the ring holds
        if evicted:
            missed = (got[0].seq if got else hi + 1) - 1 - start
        taken: list[LogLine] = []
        full = False
        for x in reversed(got):
            budget -= len(x.text) + _LINE_OVERHEAD
            if budget < 0 and (lines or taken):
                full = True
                break
            taken.append(x)
        lines[:0] = reversed(taken)
        if full or evicted:
            break
        hi = lo
    return LogChunk(lines, last, missed)


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The monitor listener's server context; with ``client_ca``, mutual TLS.

    Client certificates are verified by OpenSSL with the "sslclient" purpose (its default on
    the server side): a certificate whose extendedKeyUsage lacks clientAuth fails the
    handshake ("unsuitable certificate purpose"), one without the extension passes, as RFC 5280
    says. tests/test_access.py pins that, so `cryptography` is not needed to parse the EKU.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


def _describe(peer: Peer) -> str:
    if peer.kind == "unix":
        return f"uid {peer.uid} pid {peer.pid} on {peer.address}"
    if peer.cert_subject:
        return f"{peer.cert_subject} at {peer.address}"
    return f"tcp {peer.address}"


# Keys of a peer, per call: cached, since the same few peers call again and again.
_unix_keys = functools.lru_cache(maxsize=256)(unix_keys)
_cert_keys = functools.lru_cache(maxsize=256)(cert_keys)
_SAN_NAMES = {"IP Address": "IP"}  # getpeercert's name -> how allow lists spell it


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _socket_mode(allow: AccessList) -> int:
    # 0600 keeps everyone else out at the door; when other users get any level the door must
    # open (0666) and SO_PEERCRED, which the kernel vouches for, is the check. Root passes
    # file modes anyway, so naming it does not open the door.
    others = allow.keys() - {f"uid:{os.getuid()}", "uid:0"}
    return 0o666 if others else 0o600


def _tls_stamp(mon: MonitorConfig) -> tuple[object, ...]:
    """What the TLS listener was built from, file contents included (a rotated certificate
    at the same path is a change)."""
    out: list[object] = []
    for path in (mon.tls_cert, mon.tls_key, mon.tls_client_ca):
        if path is None:
            out.append(None)
            continue
        try:
            with open(path, "rb") as f:
                out.append((path, hashlib.sha256(f.read()).hexdigest()))
        except OSError as exc:
            out.append((path, str(exc)))
    return tuple(out)


def _set_mode(path: str, mode: int) -> None:
    """chmod the socket file we bound, without following a symlink someone put there."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, f"{path} is no longer a socket")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


class Listeners:
    """The daemon's Thrift listeners: one server, a unix socket and a TCP port, and who may do
    what on each (pubmon.config.access): the listener "control" is the unix socket, "monitor" the
    TCP port."""

    def __init__(self, daemon: DaemonControl, config: Config) -> None:
        self.config = config
        self.tcp_port: int | None = None
        self.socket_path: str | None = None
        self.refusals = Refusals()
        self.last_changes: list[str] = []  # what the last reconfigure() applied
        mon = config.monitor
        self._unix: str | None = None  # ThriftServer.listening() names of ours
        self._tcp: str | None = None
        self._ctx: ssl.SSLContext | None = None  # the monitor listener's
        self._tls = _tls_stamp(mon)
        self._policies = self._make_policies(config)
        self.server = ThriftServer(
            idl.pubmon().PubmonService,
            PubmonHandler(daemon, self.counters),
            name="pubmon",
            max_frame=mon.max_frame,
            idle_timeout=mon.idle_timeout,
            max_connections=mon.max_connections,
            max_connections_per_ip=mon.max_connections_per_ip,
            max_unix_connections=config.control.max_connections,
            max_connections_per_uid=config.control.max_connections_per_uid,
            authorize=self._authorize,
            admit=self._admit,
        )

    def counters(self) -> dict[str, int]:
        s = self.server
        out = {
            "rpc.calls": s.calls,
            "rpc.errors": s.errors,
            "rpc.connections": s.connections,
            "rpc.rejected_frames": s.rejected_frames,
            "rpc.rejected_connections": s.rejected_connections,
            "rpc.throttled": s.throttled,
            "rpc.buffered_bytes": s.memory,
        }
        out.update(self.refusals.counters())
        return out

    # --- access levels (pubmon.config.access) ------------------------------------------------

    def _make_policies(self, config: Config) -> dict[str, Policy]:
        ctl, mon = config.control, config.monitor
        where = f"the control socket {ctl.socket}"
        grant = "[control] allow.{level} in " + config.path
        policies = {
            "control": Policy("control", where, ctl.allow, grant, always=[f"uid:{os.getuid()}"]),
        }
        if mon.tls_client_ca:
            note = None
        else:
            note = (
                "Peers of the TCP monitor listener are not authenticated, so they get the "
                "status level only: use the control socket, or set up mutual TLS ([monitor] "
                "tls_client_ca) and name the client certificate in [monitor] allow.{level}"
            )
        policies["monitor"] = Policy(
            "monitor",
            f"the monitor listener {mon.listen}",
            mon.allow,
            "[monitor] allow.{level} in " + config.path,
            anonymous_note=note,
        )
        for name in policies:
            self.refusals.track(name)
        return policies

    def _identify(self, peer: Peer) -> tuple[Policy, frozenset[str]]:
        """The policy of the listener `peer` came through, and the keys it matches there."""
        if peer.kind == "unix":
            assert peer.uid is not None
            return self._policies["control"], _unix_keys(peer.uid, peer.gids)
        if peer.cert_rdns or peer.cert_sans:
            return self._policies["monitor"], _cert_keys(peer.cert_rdns, peer.cert_sans)
        return self._policies["monitor"], ANONYMOUS

    def _refuse(self, peer: Peer, policy: Policy, keys: frozenset[str], method: str | None) -> str:
        """Count and log a refusal (at most once a minute per peer); return what to answer."""
        if peer.kind == "unix":
            who = log_as = f"uid {peer.uid}"
            hint = f'{peer.uid} (its uid), its user name, or "@group" for one of its groups'
        elif keys is ANONYMOUS:
            log_as = _host(peer.address)
            who, hint = f"{log_as} (no client certificate)", ""
        else:
            who = log_as = f"certificate {peer.cert_subject}"
            sans = ", ".join(f'"{_SAN_NAMES.get(k, k)}:{v}"' for k, v in peer.cert_sans)
            hint = f'"{peer.cert_subject}"' + (f" or one of its SANs ({sans})" if sans else "")
        why = policy.refusal(keys, who, method, hint)
        level = level_of(method) if method else Level.STATUS
        seen = f" (pid {peer.pid})" if peer.kind == "unix" else f" ({peer.address})"
        self.refusals.refuse(policy.listener, level, log_as, why, seen_as=seen)
        return why

    def tls_refused(self, address: str, exc: BaseException) -> None:
        """Count and log (once a minute per host) a TLS handshake that failed: no client
        certificate, one the CA did not sign, one without clientAuth usage. For the server,
        when it runs handshakes itself: asyncio's own TLS layer drops them without a word."""
        host = _host(address)
        why = f"TLS handshake refused on {self._policies['monitor'].where}: {exc}"
        self.refusals.refuse("monitor", Level.STATUS, host, why)

    def _admit(self, peer: Peer) -> str | None:
        policy, keys = self._identify(peer)
        if policy.level(keys) is not None:
            return None
        return self._refuse(peer, policy, keys, None)

    def _authorize(self, peer: Peer, method: str) -> None:
        policy, keys = self._identify(peer)
        level = level_of(method)
        if not policy.allowed(keys, level):
            raise PermissionDenied(self._refuse(peer, policy, keys, method))
        if level == Level.CONTROL:  # refused ones are logged by Refusals, once a minute
            logger.info("%s called by %s", method, _describe(peer))

    # --- binding ------------------------------------------------------------------------------

    async def _bind_unix(self, ctl: ControlConfig) -> str:
        assert ctl.socket
        mode = _socket_mode(ctl.allow)
        await self.server.start_unix(ctl.socket, mode=mode, allow_uids=None)
        return f"unix:{ctl.socket}"

    @staticmethod
    def _context(mon: MonitorConfig) -> ssl.SSLContext | None:
        if mon.tls_cert and mon.tls_key:
            return tls_context(mon.tls_cert, mon.tls_key, mon.tls_client_ca)
        return None

    async def _bind_tcp(self, mon: MonitorConfig, ctx: ssl.SSLContext | None) -> None:
        address = mon.address()
        assert address is not None
        host, port = address
        self.tcp_port = await self.server.start_tcp(host, port, ssl_context=ctx)
        self._tcp, self._ctx = self.server.listening()[-1], ctx
        logger.info("monitor listening on %s:%d%s", host, self.tcp_port, " (TLS)" if ctx else "")

    async def start(self) -> None:
        ctl, mon = self.config.control, self.config.monitor
        if ctl.socket:
            try:
                self._unix = await self._bind_unix(ctl)
            except OSError as exc:
                raise StartupError(f"control socket {ctl.socket}: {exc.strerror or exc}") from exc
            self.socket_path = ctl.socket
        if mon.address() is not None:
            try:
                await self._bind_tcp(mon, self._context(mon))
            except OSError as exc:
                raise StartupError(f"monitor listener {mon.listen}: {exc.strerror or exc}") from exc

    # --- reload -------------------------------------------------------------------------------

    async def reconfigure(self, config: Config) -> list[str]:
        """Apply [control] and [monitor] of a reloaded config; one line per change applied.

        New listeners are bound before old ones close. If one cannot be bound, whatever this
        call bound is closed again, nothing else changes, and ConfigError names the key, the
        address and the reason. Allow lists apply at once: the next call is judged by them,
        and connections whose peer lost a level are closed (after the reply to a call in
        progress). Connections accepted by a listener that moved stay open until they end.
        """
        old, lines = self.config, []
        self.last_changes = []
        octl, ctl, omon, mon = old.control, config.control, old.monitor, config.monitor
        tls = _tls_stamp(mon)
        move_unix = octl.socket != ctl.socket
        move_tcp = omon.listen != mon.listen or self._tls != tls
        new_unix: str | None = None
        try:
            if move_unix and ctl.socket:
                try:
                    new_unix = await self._bind_unix(ctl)
                except OSError as exc:
                    why = f"cannot listen on {ctl.socket}: {exc.strerror or exc}"
                    raise ConfigError(config.path, [ConfigProblem("control.socket", why)]) from exc
            if move_tcp:
                lines += await self._move_tcp(omon, mon, config.path)
        except BaseException:
            if new_unix is not None:
                await self.server.stop_listening(new_unix)
            raise
        self._tls = tls
        # Committed: nothing below can fail the reload.
        if move_unix:
            if self._unix is not None:
                await self.server.stop_listening(self._unix)
            self._unix, self.socket_path = new_unix, ctl.socket
            lines.append(f"control.socket: {octl.socket or '(none)'} -> {ctl.socket or '(none)'}")
        elif ctl.socket and _socket_mode(octl.allow) != _socket_mode(ctl.allow):
            mode = _socket_mode(ctl.allow)
            try:
                _set_mode(ctl.socket, mode)
                lines.append(f"control.socket: mode {mode:04o}")
            except OSError as exc:
                logger.error("cannot chmod %s to %04o: %s", ctl.socket, mode, exc)
        lines += octl.allow.changes(ctl.allow, "control.allow")
        lines += omon.allow.changes(mon.allow, "monitor.allow")
        lines += self._limits(omon, mon)
        lines += self._control_limits(octl, ctl)
        before = self._policies
        self._policies = self._make_policies(config)
        self.config = config
        closed = self.server.close_peers(lambda peer: self._demoted(before, peer))
        if closed:
            lines.append(f"closed {closed} connection(s) of peers whose access level went down")
        for line in lines:
            logger.info("reload: %s", line)
        self.last_changes = lines
        return lines

    async def _move_tcp(self, omon: MonitorConfig, mon: MonitorConfig, path: str) -> list[str]:
        """Bind the monitor listener as `mon` says, then close the old one. The same address
        cannot be bound twice: then the old one closes first (once the new TLS context is
        built), and is bound again if the new one cannot be."""
        try:
            ctx = self._context(mon) if mon.address() is not None else None
        except OSError as exc:  # ssl.SSLError included: a file that is not what it should be
            why = f"cannot load {mon.tls_cert}, {mon.tls_key}, {mon.tls_client_ca}: {exc}"
            raise ConfigError(path, [ConfigProblem("monitor.tls_cert", why)]) from exc
        same = omon.address() == mon.address() and omon.address() is not None
        old, old_ctx = self._tcp, self._ctx
        if same and old is not None:
            await self.server.stop_listening(old)
            self._tcp = None
        try:
            if mon.address() is not None:
                await self._bind_tcp(mon, ctx)
            else:
                self._tcp, self.tcp_port, self._ctx = None, None, None
        except OSError as exc:
            if same and old is not None:
                try:
                    await self._bind_tcp(omon, old_ctx)
                except OSError as again:
                    logger.error("monitor listener %s lost: %s", omon.listen, again)
            why = f"cannot listen on {mon.listen}: {exc.strerror or exc}"
            raise ConfigError(path, [ConfigProblem("monitor.listen", why)]) from exc
        if old is not None and not same:
            await self.server.stop_listening(old)
        if omon.listen != mon.listen:
            return [f"monitor.listen: {omon.listen or '(none)'} -> {mon.listen or '(none)'}"]
        return ["monitor: TLS settings or files changed; listener rebuilt"]

    def _limits(self, omon: MonitorConfig, mon: MonitorConfig) -> list[str]:
        out = []
        for name in ("max_frame", "idle_timeout", "max_connections", "max_connections_per_ip"):
            was, now = getattr(omon, name), getattr(mon, name)
            if was != now:
                setattr(self.server, name, now)
                out.append(f"monitor.{name}: {was} -> {now}")
        return out

    def _control_limits(self, octl: ControlConfig, ctl: ControlConfig) -> list[str]:
        out = []
        for name, attr in (
            ("max_connections", "max_unix_connections"),
            ("max_connections_per_uid", "max_connections_per_uid"),
        ):
            was, now = getattr(octl, name), getattr(ctl, name)
            if was != now:
                setattr(self.server, attr, now)
                out.append(f"control.{name}: {was} -> {now}")
        return out

    def _demoted(self, before: dict[str, Policy], peer: Peer) -> str | None:
        """Why to close `peer`'s connection after a reload: its level went down."""
        policy, keys = self._identify(peer)
        was, now = before[policy.listener].level(keys), policy.level(keys)
        if was is None or (now is not None and now.rank >= was.rank):
            return None
        who = f"uid {peer.uid}" if peer.kind == "unix" else peer.cert_subject or peer.address
        return f"a reload changed {policy.where}: {who} now has {now or 'no access level'}"

    async def close(self) -> None:
        await self.server.close()

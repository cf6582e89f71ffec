"""PubmonService: a thin adapter from Thrift calls to the Daemon and its Supervisor.

The same handler serves both listeners; `Listeners` decides who may call what:
- the unix control socket (mode 0600, SO_PEERCRED against allow_uids + our own uid): everything;
- the TCP monitor listener: read-only methods; mutating ones raise PermissionDenied, unless
  mutual TLS is on and `allow_control = true`.
Every mutating call is logged with its peer (uid and pid, or the certificate subject).
"""

from __future__ import annotations

__all__ = ["MUTATING", "Listeners", "PubmonHandler", "tls_context"]

import asyncio
import logging
import os
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import __version__, idl
from ._frames import Encoded, encode_struct, field_encoder
from .config import Config
from .errors import ConfigError, InvalidState, PermissionDenied, StartupError, UnknownPublisher
from .output import LogChunk
from .publisher import PublisherSnapshot
from .rpc import Peer, ThriftServer

if TYPE_CHECKING:
    from .daemon import Daemon
    from .supervisor import Supervisor

logger = logging.getLogger(__name__)

MUTATING = frozenset(
    {
        "startPublisher",
        "stopPublisher",
        "restartPublisher",
        "reloadConfig",
        "reopenLogs",
        "setOption",
        "shutdown",
        "reinitialize",
    }
)
TAIL_WAIT = 0.5  # tailLog with nothing new waits this long for a line (long poll for tail -f)


def _publisher_info(snap: PublisherSnapshot) -> Any:
    m = idl.pubmon()
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
    )


def _log_chunk(chunk: LogChunk) -> Any:
    m = idl.pubmon()
    lines = [
        m.LogLine(seq=x.seq, time=x.time, stream=x.stream, text=x.text, partial=x.partial)
        for x in chunk.lines
    ]
    return m.LogChunk(lines=lines, nextSeq=chunk.next_seq, missed=chunk.missed)


class PubmonHandler:
    """The Thrift methods. Read-only ones are plain functions (answered without a task)."""

    def __init__(self, daemon: Daemon, rpc_counters: Callable[[], dict[str, int]]) -> None:
        self._daemon = daemon
        self._rpc_counters = rpc_counters
        self._infos: dict[str, tuple[tuple[object, ...], Encoded]] = {}  # see listPublishers
        self._uptime: Callable[[Any], bytes] | None = None
        self._options: dict[str, str] = {}

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
        out: list[Any] = []
        for snap in sup.snapshots():
            key = snap[:-1]  # everything but the uptime
            hit = old.get(snap.name)
            if hit is None or hit[0] != key:
                hit = (key, encode_struct(_publisher_info(snap), skip="uptime"))
            new[snap.name] = hit
            out.append(Encoded(uptime(round(snap.uptime, 3)) + hit[1]))
        self._infos = new
        return out

    def getPublisher(self, name: str) -> Any:
        try:
            return _publisher_info(self._sup().get(name).snapshot())
        except UnknownPublisher as exc:
            raise self._translate(exc) from None

    async def startPublisher(self, name: str) -> Any:
        return await self._request("start", name)

    async def stopPublisher(self, name: str) -> Any:
        return await self._request("stop", name)

    async def restartPublisher(self, name: str) -> Any:
        return await self._request("restart", name)

    async def _request(self, what: str, name: str) -> Any:
        sup = self._mutable()
        try:
            snap = await getattr(sup, what)(name)
        except (UnknownPublisher, InvalidState) as exc:
            raise self._translate(exc) from None
        return _publisher_info(snap)

    async def reloadConfig(self) -> Any:
        self._mutable()
        try:
            report = await self._daemon.reload()
        except (ConfigError, InvalidState) as exc:
            raise self._translate(exc) from None
        except StartupError as exc:  # a listener could not be rebound: nothing changed
            raise idl.pubmon().ConfigError(message=str(exc), problems=[str(exc)]) from None
        m, diff = idl.pubmon(), report.diff
        return m.ReloadResult(
            added=list(diff.added),
            removed=list(diff.removed),
            changed=list(diff.changed),
            unchanged=list(diff.unchanged),
            publishers=[
                m.PublisherChange(name=c.name, change=c.change, fields=list(c.fields))
                for c in diff.changes
            ],
            daemon=report.daemon,
        )

    async def tailLog(self, name: str, afterSeq: int, maxLines: int) -> Any:
        try:
            output = self._sup().get(name).output
        except UnknownPublisher as exc:
            raise self._translate(exc) from None
        if 0 <= afterSeq == output.last_seq and maxLines > 0:
            # Nothing new yet: wait a little for it, so `tail -f` need not spin.
            try:
                async with asyncio.timeout(TAIL_WAIT):
                    await output.wait_beyond(afterSeq)
            except TimeoutError:
                pass
        if afterSeq < 0:
            return _log_chunk(output.last(-afterSeq))
        return _log_chunk(output.tail(afterSeq, maxLines))

    def reopenLogs(self) -> None:
        self._sup()
        self._daemon.reopen_logs()


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
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


class Listeners:
    """The daemon's Thrift listeners: one server, a unix socket and a TCP port."""

    def __init__(self, daemon: Daemon, config: Config) -> None:
        self.config = config
        self.tcp_port: int | None = None
        self.socket_path: str | None = None
        mon = config.monitor
        self._tcp_control = bool(mon.allow_control and mon.tls_client_ca)
        self.server = ThriftServer(
            idl.pubmon().PubmonService,
            PubmonHandler(daemon, self.counters),
            name="pubmon",
            max_frame=mon.max_frame,
            idle_timeout=mon.idle_timeout,
            max_connections=mon.max_connections,
            authorize=self._authorize,
            on_call=self._on_call,
        )

    def counters(self) -> dict[str, int]:
        s = self.server
        return {
            "rpc.calls": s.calls,
            "rpc.errors": s.errors,
            "rpc.connections": s.connections,
            "rpc.rejected_frames": s.rejected_frames,
        }

    def _on_call(self, peer: Peer, method: str) -> None:
        if method in MUTATING:
            logger.info("%s called by %s", method, _describe(peer))

    def _authorize(self, peer: Peer, method: str) -> None:
        if method in MUTATING and peer.kind == "tcp" and not self._tcp_control:
            raise PermissionDenied(
                f"{method} is not allowed on the TCP monitor listener; use the control socket"
            )

    async def start(self) -> None:
        ctl, mon = self.config.control, self.config.monitor
        if ctl.socket:
            # 0600 keeps everyone else out at the door; when other uids are allowed the door must
            # open (0666) and SO_PEERCRED, which the kernel vouches for, is the check.
            others = set(ctl.allow_uids) - {os.getuid()}
            mode = 0o666 if others else 0o600
            try:
                await self.server.start_unix(ctl.socket, mode=mode, allow_uids=ctl.allow_uids)
            except OSError as exc:
                raise StartupError(f"control socket {ctl.socket}: {exc.strerror or exc}") from exc
            self.socket_path = ctl.socket
        address = mon.address()
        if address is not None:
            host, port = address
            ctx = None
            if mon.tls_cert and mon.tls_key:
                ctx = tls_context(mon.tls_cert, mon.tls_key, mon.tls_client_ca)
            try:
                self.tcp_port = await self.server.start_tcp(host, port, ssl_context=ctx)
            except OSError as exc:
                raise StartupError(f"monitor listener {mon.listen}: {exc.strerror or exc}") from exc
            logger.info(
                "monitor listening on %s:%d%s", host, self.tcp_port, " (TLS)" if ctx else ""
            )

    async def reconfigure(self, config: Config) -> list[str]:
        """Apply a reloaded [control] and [monitor]; one line per change applied."""
        self.config = config
        return []

    async def close(self) -> None:
        await self.server.close()

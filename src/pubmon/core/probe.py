"""Health probes: ask a running publisher whether it is healthy.

A probe answers one question per call, `check()`, with a Health. It never raises: a refused
connection, a timeout or a bad answer is UNHEALTHY, with the reason kept in `last_error`.
The publisher's runner decides what failures mean (thresholds, start_timeout), and makes a new
probe for every start of the child.

- `Fb303Probe`: fb303 ``getStatus`` over one persistent Thrift connection. ALIVE is HEALTHY,
  WARNING is DEGRADED, STARTING is UNHEALTHY ("child reports STARTING": the runner tolerates
  that only until start_timeout), DEAD, STOPPING, STOPPED, an unknown value, an error or no
  answer within `timeout` are UNHEALTHY. Its `on_first_healthy()` hands the publisher its
  data source (``startPublishers(url)``).
- `TcpProbe`: a TCP connect.
- `ExecProbe`: a command that must exit 0 in time; it is spawned like a publisher (own process
  group, parent-death signal, scrubbed environment) and its whole group is killed afterwards.
"""

from __future__ import annotations

__all__ = ["ExecProbe", "Fb303Probe", "Probe", "TcpProbe", "make_probe"]

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, Literal, Protocol, TypeVar, final

from pubmon.config.model import ProbeSpec, PublisherSpec
from pubmon.core.lifecycle import Health
from pubmon.core.process import OrphanReaper, SpawnRequest, spawn
from pubmon.errors import RpcError, SpawnError
from pubmon.thrift import idl
from pubmon.thrift.idl import FbStatus
from pubmon.thrift.server import ThriftClient

logger = logging.getLogger(__name__)

_DRAIN_TIMEOUT = 0.2  # after an exec probe's group is gone: how long its pipes may stay open
_OUTPUT_KEPT = 400  # bytes of an exec probe's output kept for last_error
# Past an fb303 deadline, how long what already arrived may still complete the call (see _by).
_GRACE = 0.05
_BACKSTOP = 30.0  # the fb303 client's own timeout: `_by` enforces the real one

_T = TypeVar("_T")


async def _by(deadline: float, coro: Coroutine[Any, Any, _T]) -> _T:
    """`coro`'s result if it completes by `deadline` (loop time); else TimeoutError.

    Unlike `asyncio.timeout_at`, a deadline that fires late does not beat an answer that is
    already in: when our own loop was stalled past the deadline (a spawn waiting for its child's
    exec under load, a busy turn) with a call in flight, the child's reply and the expired timer
    are seen in the same loop turn, and the timer would win and blame a child that answered in
    time. Past the deadline the call gets `_GRACE` more seconds of a running loop to finish.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        if not done:
            await asyncio.wait({task}, timeout=_GRACE)
        if not task.done():
            raise TimeoutError
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved (we were cancelled, or it lost to the deadline)


class Probe(Protocol):
    last_error: str
    details: str

    async def check(self) -> Health: ...
    async def close(self) -> None: ...


@final
class Fb303Probe:
    """fb303 getStatus over ONE persistent connection to the child (PublisherService).

    Contract:
    - `check()` takes at most `timeout` seconds in all (connecting included). The connection is
      kept between checks and thrown away after any error (the client closes itself); the next
      check connects again. A kept connection that fails at once (the child closed it while
      idle) is retried once on a fresh connection within the same `timeout`, so a child's idle
      timeout never counts as a failure.
    - `details` is the child's getStatusDetails, fetched only when the status differs from the
      previous answer, once after startPublishers, and on every round while it is WARNING
      (DEGRADED rounds cost two calls, steady ALIVE rounds one). A failed fetch keeps the
      verdict and is not retried until the status changes. A failed startPublishers is
      reported in `details` too.
    - `on_first_healthy()` calls ``startPublishers(data_source)`` when a data source is set
      (under `timeout`). A failure is logged as an error and reported in `details`; the probe
      does not fail and does not retry: the publisher keeps running without its data source
      until it is restarted (by an operator, or by a later probe failure or exit).
    """

    def __init__(
        self,
        host: str,
        port: int,
        timeout: float,
        transport: Literal["framed", "buffered"] = "framed",
        data_source: str | None = None,
        *,
        name: str = "",
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.transport: Literal["framed", "buffered"] = transport
        self.data_source = data_source
        self.name = name or f"{host}:{port}"
        self.last_error = ""
        self.details = ""
        self.status: FbStatus | int | None = None  # the last answer; None after a failure
        self.checks = 0
        self.calls = 0  # RPCs sent: getStatus, getStatusDetails, startPublishers
        self._client: ThriftClient | None = None
        self._child_details = ""
        self._details_for: FbStatus | int | None = None  # the status _child_details belongs to
        self._details_failed = False
        self._data_source_error = ""
        self._service = idl.publisher().PublisherService

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "idle"
        return f"<Fb303Probe {self.name} {self.transport} {state} status={self.status}>"

    async def check(self) -> Health:
        self.checks += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            answer = await _by(deadline, self._get_status())
        except (RpcError, TimeoutError) as exc:
            await self._drop()
            self.status = None
            self._details_for = None
            self._child_details = ""
            self._compose_details()
            self.last_error = str(exc) or self._no_answer()
            return Health.UNHEALTHY
        status: FbStatus | int = answer if isinstance(answer, int) else -1
        try:
            status = FbStatus(status)
        except ValueError:
            pass
        self.status = status
        if status != self._details_for or (status == FbStatus.WARNING and not self._details_failed):
            await self._fetch_details(status, deadline)
        self._compose_details()
        if status == FbStatus.ALIVE:
            self.last_error = ""
            return Health.HEALTHY
        if status == FbStatus.WARNING:
            self.last_error = ""
            return Health.DEGRADED
        what = status.name if isinstance(status, FbStatus) else f"unknown status {status}"
        self.last_error = f"child reports {what}"
        if self._child_details:
            self.last_error += f": {self._child_details}"
        return Health.UNHEALTHY

    async def on_first_healthy(self) -> None:
        """Hand the child its data source: ``startPublishers(data_source)``, when one is set."""
        url = self.data_source
        if url is None:
            return
        logger.info("%s: startPublishers(%s)", self.name, url)
        error_cls = idl.publisher().PublisherServiceException
        try:
            deadline = asyncio.get_running_loop().time() + self.timeout
            await _by(deadline, self._call("startPublishers", url))
        except error_cls as exc:
            why = f"refused: {exc.message}"
        except (RpcError, TimeoutError) as exc:
            await self._drop()
            why = str(exc) or self._no_answer()
        else:
            self._data_source_error = ""
            self._details_for = None  # its details may say so: fetch them on the next round
            logger.info("%s: startPublishers(%s) accepted", self.name, url)
            return
        self._data_source_error = f"startPublishers({url}) failed: {why}"
        self._compose_details()
        logger.error(
            "%s: %s; it keeps running without its data source until it is restarted",
            self.name,
            self._data_source_error,
        )

    async def close(self) -> None:
        await self._drop()

    # --- internals --------------------------------------------------------------------------

    def _no_answer(self) -> str:
        return f"{self.host}:{self.port}: no answer within {self.timeout:g} s"

    async def _get_status(self) -> object:
        reused = self._client is not None
        try:
            return await self._call("getStatus")
        except RpcError:
            if not reused:
                raise
            # The child may have closed our idle connection: once more on a fresh one. A child
            # that does not answer has used up the whole timeout by now, so this costs nothing.
            return await self._call("getStatus")

    async def _call(self, method: str, *args: object) -> object:
        client = self._client
        if client is None:
            client = await ThriftClient.connect(
                self._service,
                host=self.host,
                port=self.port,
                timeout=_BACKSTOP,
                transport=self.transport,
            )
            self._client = client
        self.calls += 1
        try:
            return await client.call(method, *args)
        except (RpcError, asyncio.CancelledError):
            self._client = None  # it closed itself; the next call connects afresh
            raise

    async def _fetch_details(self, status: FbStatus | int, deadline: float) -> None:
        self._details_for = status
        try:
            text = await _by(deadline, self._call("getStatusDetails"))
        except (RpcError, TimeoutError) as exc:
            await self._drop()
            self._details_failed = True
            self._child_details = ""
            logger.debug("%s: getStatusDetails failed: %s", self.name, exc)
            return
        self._details_failed = False
        self._child_details = str(text or "")

    def _compose_details(self) -> None:
        parts = [p for p in (self._child_details, self._data_source_error) if p]
        self.details = "; ".join(parts)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


@final
class TcpProbe:
    """Healthy when a TCP connection to host:port succeeds within the timeout."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.last_error = ""
        self.details = ""

    async def check(self) -> Health:
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            self.last_error = f"connect {self.host}:{self.port}: {exc or 'timed out'}"
            return Health.UNHEALTHY
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        self.last_error = ""
        self.details = f"accepts connections on {self.host}:{self.port}"
        return Health.HEALTHY

    async def close(self) -> None:
        pass


class _Tail:
    """A spawn sink that keeps the last bytes a probe command wrote (both streams)."""

    def __init__(self) -> None:
        self.data = b""

    def feed(self, data: bytes) -> None:
        self.data = (self.data + data)[-_OUTPUT_KEPT:]

    def eof(self) -> None:
        pass

    def last_line(self) -> str:
        lines = self.data.decode("utf-8", "backslashreplace").strip().splitlines()
        return lines[-1].strip() if lines else ""


@final
class ExecProbe:
    """Healthy when the command exits 0 within the timeout.

    The command is started by `spawn.spawn()`, exactly as a publisher is: its own process group,
    PR_SET_PDEATHSIG = SIGKILL (so it never outlives the daemon), no NOTIFY_SOCKET and friends,
    in the publisher's directory, environment and user. After every check, passed or not, what
    is left of its process group is SIGKILLed: a probe leaves nothing behind. Its last line of
    output goes into `last_error` when it fails. Give it the supervisor's `reaper`, so the
    orphan reaper leaves its exit status to asyncio.
    """

    def __init__(
        self,
        argv: tuple[str, ...],
        timeout: float,
        *,
        name: str = "probe",
        directory: str | None = None,
        environment: tuple[tuple[str, str], ...] = (),
        user: str | None = None,
        reaper: OrphanReaper | None = None,
    ) -> None:
        self.argv, self.timeout = argv, timeout
        self.name = name
        self.last_error = ""
        self.details = ""
        self.last_pid: int | None = None
        self._request = SpawnRequest(
            name=name, argv=argv, directory=directory, environment=environment, user=user
        )
        self._reaper = reaper

    async def check(self) -> Health:
        out = _Tail()
        try:
            child = await spawn(self._request, out, out, reaper=self._reaper)
        except SpawnError as exc:
            self.last_error = f"{self.argv[0]}: {exc.why}"
            return Health.UNHEALTHY
        self.last_pid = child.pid
        code: int | None = None
        try:
            async with asyncio.timeout(self.timeout):
                code = await asyncio.shield(child.exited)
        except TimeoutError:
            pass
        finally:
            # Also when cancelled: kill the group (the leader, if it is still running, and
            # anything it started), wait for the leader, and let go of the pipes.
            child.signal(signal.SIGKILL)
            await asyncio.shield(child.exited)
            await child.drain(_DRAIN_TIMEOUT)
            child.close()
        if code is None:
            self.last_error = f"{self.argv[0]} timed out after {self.timeout:g} s"
        elif code != 0:
            said = out.last_line()
            self.last_error = f"{self.argv[0]} exited {code}" + (f": {said}" if said else "")
        else:
            self.last_error = ""
            self.details = out.last_line()
            return Health.HEALTHY
        return Health.UNHEALTHY

    async def close(self) -> None:
        pass


def make_probe(spec: PublisherSpec, *, reaper: OrphanReaper | None = None) -> Probe | None:
    """The probe for a publisher, or None for kind "none". Pass the supervisor's `reaper` so
    exec probe commands are tracked like publishers."""
    p: ProbeSpec = spec.probe
    port = p.port  # config resolved it: the probe's own port, or the instance's
    if p.kind == "none":
        return None
    if p.kind == "tcp":
        assert port is not None, "config guarantees a port"
        return TcpProbe(p.host, port, p.timeout)
    if p.kind == "exec":
        return ExecProbe(
            p.command,
            p.timeout,
            name=spec.name,
            directory=spec.directory,
            environment=spec.environment,
            user=spec.user,
            reaper=reaper,
        )
    assert p.kind == "fb303", p.kind
    assert port is not None, "config guarantees a port"
    return Fb303Probe(
        p.host, port, p.timeout, p.transport, spec.data_source, name=f"{spec.name} probe"
    )

"""The HTTP side: /metrics, /healthz, /readyz, a live dashboard and plain-text logs. Read-only.

Served by aiohttp on the daemon's own event loop (no threads): `HttpServer.start()` binds
(a bind error is a StartupError, like the Thrift listeners'), `run()` is a task of the daemon's
TaskGroup that records each publisher's recent exits, `close()` ends the live streams and the
listener. TLS comes from [monitor]'s tls_cert/tls_key when given (`[http] tls = false` opts
out); with its tls_client_ca, a client certificate is asked for but not required, and a
verified one grants the logs level.

Access levels (issue 18, checked in _http_access.py; names as in access.py):
- status, without any credential: /metrics, /healthz, /readyz, the dashboard's states;
- logs: /logs/<name> and the log tail of a publisher's page. It needs a credential: the token
  of `[http] token_file` as `Authorization: Bearer <token>` (compared in constant time, as
  SHA-256 digests, so not even its length leaks), a session cookie set by POST /login (an
  HMAC of the token, HttpOnly, SameSite=Strict, Secure under TLS: changing the token ends every
  session), or a verified client certificate;
- control: nothing here; control stays on the unix socket.
Every request's Host header must name this server (the listen host, localhost, 127.0.0.1,
::1, or `[http] hosts`): a page on another site that rebinds its DNS name to 127.0.0.1 is
refused. No CORS headers; every response has a strict Content-Security-Policy (scripts and
styles from this server only, no inline ones), nosniff, no framing, no referrer to other
sites. Every refusal is counted by (listener, level) and logged at most once per peer per
minute.

The dashboard (static files in pubmon/dashboard) follows server-sent events: /events sends the
table whenever a publisher changes (and every 2 s while CPU figures move), /events/<name> one
publisher with its recent exits and, with the logs level, its log lines by cursor (the event
id is the line's sequence number, so a reconnecting browser resumes where it stopped).

It sees the daemon through `DaemonView`, what it reads of it (a Protocol defined here, where it
is used): the http layer sits below pubmon.daemon, beside pubmon.service, and imports neither.
"""

from __future__ import annotations

__all__ = ["DaemonView", "HttpServer", "ListenersView"]

import asyncio
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import fields, replace
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from pubmon.config.access import Level, Refusals
from pubmon.config.model import Config
from pubmon.core.lifecycle import PublisherState
from pubmon.core.procstats import ProcStats
from pubmon.errors import StartupError
from pubmon.host.inherited import inherited_socket
from pubmon.http.access import COOKIE, HttpAccess, read_token
from pubmon.http.counters import ChildCounters
from pubmon.http.metrics import DaemonValues, MetricsWriter, negotiate

if TYPE_CHECKING:
    from pubmon.core.publisher import Publisher
    from pubmon.core.supervisor import Supervisor

logger = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make the login form send Origin: null
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_WEDGED_MS = 5000  # /healthz fails once the loop ran a timer this late
_TICK = 2.0  # the dashboard's CPU/memory figures refresh this often while someone watches
_EXITS_KEPT = 20
_GAP = 0.2  # seconds: changes closer together than this are shown together
_LINES_FIRST = 200  # a publisher page starts with this many lines
_ASSETS = ("dashboard.js", "dashboard.css")


# --- what the pages show -----------------------------------------------------------------------


class _ExitLog:
    """Recent exits per publisher, recorded as `exits` counts go up (the daemon keeps only
    the last one)."""

    kept = _EXITS_KEPT  # per publisher

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}  # carried over by an upgrade, with `exits`
        self.exits: dict[str, deque[dict[str, object]]] = {}

    def update(self, pubs: Mapping[str, Publisher]) -> None:
        for name, pub in pubs.items():
            before = self.seen.get(name)
            self.seen[name] = pub.exits
            if before is not None and pub.exits > before:
                self.exits.setdefault(name, deque(maxlen=_EXITS_KEPT)).appendleft(
                    {
                        "time": time.time(),
                        "status": pub.last_exit,
                        "reason": pub.last_exit_reason,
                        "count": pub.exits - before,  # > 1: more exits within one _GAP
                    }
                )
        for gone in self.seen.keys() - pubs.keys():
            del self.seen[gone]
            self.exits.pop(gone, None)


def _row(pub: Publisher, procstats: ProcStats) -> dict[str, object]:
    # Its cgroup's figures when it has one (a setsid'd escapee included), else the walk's.
    fig = pub.figures(procstats.figures.get(pub.name)) if pub.pid is not None else None
    return {
        "name": pub.name,
        "program": pub.spec.program,
        "state": str(pub.state),
        "health": str(pub.health),
        "pid": pub.pid,
        "started": pub.started_wall if pub.pid is not None else None,
        "restarts": pub.restarts,
        "exits": pub.exits,
        "last_exit": pub.last_exit,
        "last_exit_reason": pub.last_exit_reason,
        "details": pub.details,
        "cpu": None if fig is None else round(fig.cpu_seconds, 2),
        "rss": None if fig is None else fig.rss_bytes,
        "fds": None if fig is None else fig.open_fds,
    }


class ListenersView(Protocol):
    """The daemon's Thrift listeners (pubmon.service.handler.Listeners), as seen from here."""

    @property
    def refusals(self) -> Refusals: ...
    def counters(self) -> dict[str, int]: ...


class DaemonView(Protocol):
    """What the HTTP side reads of the daemon (pubmon.daemon.daemon.Daemon). Read-only."""

    @property
    def supervisor(self) -> Supervisor | None: ...  # None until the publishers are set up
    @property
    def listeners(self) -> ListenersView | None: ...
    @property
    def procstats(self) -> ProcStats: ...
    @property
    def ready(self) -> asyncio.Event: ...  # the first round has settled
    @property
    def stopping(self) -> bool: ...
    @property
    def loop_lag_ms(self) -> int: ...
    @property
    def reloads(self) -> int: ...
    @property
    def reload_failures(self) -> int: ...
    def fb303_status(self) -> str: ...


class _View:
    """The daemon as metrics.MetricsSource."""

    def __init__(self, daemon: DaemonView, server: HttpServer) -> None:
        self._d = daemon
        self._s = server

    def publishers(self) -> Mapping[str, Publisher]:
        sup = self._d.supervisor
        return sup.publishers if sup is not None else {}

    def daemon_values(self) -> DaemonValues:
        d = self._d
        rpc = {k.removeprefix("rpc."): v for k, v in d.listeners.counters().items()} if (
            d.listeners is not None
        ) else {}  # fmt: skip
        return DaemonValues(
            reloads=d.reloads,
            reload_failures=d.reload_failures,
            loop_lag_ms=d.loop_lag_ms,
            ready=d.ready.is_set(),
            rpc=rpc,
        )

    def denied(self) -> Mapping[tuple[str, str], int]:
        # Every listener's refusals, counted by access.Refusals as access.denied.<listener>.<level>
        out = {}
        for key, n in self._s.access.refusals.counters().items():
            parts = key.split(".")
            if len(parts) == 4:
                out[(parts[2], parts[3])] = n
        return out

    def child_counters(self) -> Mapping[str, Mapping[str, float]]:
        return self._s.children.values


# --- the server --------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
    """[http]: one aiohttp site on the daemon's loop. See the module docstring."""

    def __init__(self, daemon: DaemonView, config: Config) -> None:
        self._daemon = daemon
        self.config = config.http
        self._monitor = config.monitor
        listeners = daemon.listeners
        self._refusals = listeners.refusals if listeners is not None else Refusals()
        self.access = self._access(config, read_token(self.config.token_file))
        self.procstats = daemon.procstats
        self.children = ChildCounters(self.config.child_counters_max)
        self.metrics = MetricsWriter(_View(daemon, self), self.procstats)
        self.exits = _ExitLog()
        self.port: int | None = None
        self.tls = False
        self.scrapes = 0
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._closed = asyncio.Event()
        self._table: tuple[tuple[int, int], bytes] | None = None
        self._assets = resources.files("pubmon.http") / "dashboard"

    def _access(self, config: Config, token: bytes | None) -> HttpAccess:
        mon = config.monitor
        mtls = mon.allow if (config.http.tls and mon.tls_client_ca) else None
        return HttpAccess(config.http, token, refusals=self._refusals, cert_allow=mtls)

    # --- lifecycle --------------------------------------------------------------------------

    def _ssl(self) -> ssl.SSLContext | None:
        mon = self._monitor
        if not (self.config.tls and mon.tls_cert and mon.tls_key):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(mon.tls_cert, mon.tls_key)
        if mon.tls_client_ca:
            # Asked for, not required: without one a browser still gets the status level.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(mon.tls_client_ca)
        return ctx

    async def start(self) -> None:
        address = self.config.address()
        assert address is not None, "HttpServer needs [http] listen"
        host, port = address
        app = web.Application(middlewares=[self._guard], client_max_size=16 * 1024)
        app.on_response_prepare.append(self._headers)
        r = app.router
        r.add_get("/", self._page("index.html"))
        r.add_get("/p/{name}", self._page("publisher.html"))
        r.add_get("/login", self._page("login.html"))
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        r.add_get("/static/{file}", self._static)
        r.add_get("/metrics", self._metrics)
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        r.add_get("/events", self._events)
        r.add_get("/events/{name}", self._publisher_events)
        r.add_get("/logs/{name}", self._logs, name="logs")
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        try:
            await self._bind(host, port)
        except StartupError:
            self._runner = None
            await runner.cleanup()
            raise

    async def _bind(self, host: str, port: int) -> None:
        assert self._runner is not None
        ctx = self._ssl()
        inherited = inherited_socket(f"http:{host}:{port}")  # [upgrade] hook
        site: web.BaseSite
        if inherited is not None:
            site = web.SockSite(self._runner, inherited, ssl_context=ctx)
        else:
            site = web.TCPSite(self._runner, host, port, ssl_context=ctx, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"http listener {self.config.listen}: {exc.strerror or exc}"
            ) from exc
        self._site = site
        self.tls = ctx is not None
        self.port = self._runner.addresses[-1][1]
        logger.info("http listening on %s:%d%s", host, self.port, " (TLS)" if ctx else "")

    async def reconfigure(self, config: Config) -> list[str]:
        """Apply a reloaded config's [http] (and [monitor] TLS) live; one line per change,
        as "http.key: old -> new" (the reload's report lists them).

        Credentials, hosts and limits apply at once. A new address or TLS setting rebinds: the
        old listener closes first (it may be the same port) and is bound again if the new one
        cannot be (the reload still succeeds; the line and the log say so). `listen = ""`
        closes it. Never raises.
        """
        old, new = self.config, config.http
        mon = config.monitor
        old_tls = (self._monitor.tls_cert, self._monitor.tls_key, self._monitor.tls_client_ca)
        new_tls = (mon.tls_cert, mon.tls_key, mon.tls_client_ca)
        lines = [
            f"http.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for f in fields(old)
            if getattr(old, f.name) != getattr(new, f.name)
        ]
        if (old.token_file, old.hosts, old.tls, old_tls, self._monitor.allow) != (
            new.token_file, new.hosts, new.tls, new_tls, mon.allow
        ):  # fmt: skip
            try:
                self.access = self._access(config, read_token(new.token_file))
            except StartupError as exc:
                lines.append(f"http.token_file: kept the previous token: {exc}")
                new = replace(new, token_file=old.token_file, hosts=old.hosts)
        self.children.cap = new.child_counters_max
        rebind = (old.listen, old.tls, old_tls) != (new.listen, new.tls, new_tls)
        if rebind and old.listen == new.listen and old.tls == new.tls:
            lines.append("http: the [monitor] TLS files changed: listener reopened")
        previous = self.config, self._monitor
        self.config, self._monitor = new, mon
        if not rebind or self._runner is None:
            return lines
        if not new.listen:
            await self.close()
            return lines
        address = new.address()
        assert address is not None
        if self._site is not None:
            await self._site.stop()
        try:
            await self._bind(*address)
        except StartupError as exc:
            logger.error("%s; listening on %s again", exc, previous[0].listen)
            self.config, self._monitor = previous
            old_address = previous[0].address()
            assert old_address is not None
            await self._bind(*old_address)
            # What is bound is the old address and TLS: keep describing that.
            kept = replace(new, listen=previous[0].listen, tls=previous[0].tls)
            self.config, self._monitor = kept, previous[1]
            lines.append(f"http.listen: kept {previous[0].listen!r}: {exc}")
        return lines

    async def run(self) -> None:
        """Record exits as they happen (the daemon's TaskGroup owns this task)."""
        await self._daemon.ready.wait()
        sup = self._daemon.supervisor
        assert sup is not None
        while True:
            self.exits.update(sup.publishers)
            await sup.changed.wait()
            # A storm of changes (1000 publishers restarting) is one O(N) scan per _GAP, not
            # one per change.
            await asyncio.sleep(_GAP)

    async def close(self) -> None:
        self._closed.set()  # live streams end their loops
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middleware -------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        level = Level.LOGS if request.match_info.route.name == "logs" else Level.STATUS
        if not self.access.host_ok(request.headers.get("Host")):
            self.access.deny(request, level, f"Host {request.headers.get('Host')!r} not allowed")
            return web.Response(
                status=421, text="misdirected request: this Host is not served here\n"
            )
        if not self.access.allowed(request, level):
            self.access.deny(request, level, "no credential")
            return web.Response(
                status=401,
                text="log lines need a credential: Authorization: Bearer <token from "
                "[http] token_file>, a session from /login, or a client certificate\n",
                headers={"WWW-Authenticate": 'Bearer realm="pubmon"'},
            )
        return await handler(request)

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(_HEADERS)
        response.headers["Server"] = "pubmon"
        response.headers.setdefault("Cache-Control", "no-store")

    # --- pages ------------------------------------------------------------------------------

    def _page(self, file: str) -> Handler:
        async def page(request: web.Request) -> web.StreamResponse:
            body = (self._assets / file).read_bytes()
            return web.Response(body=body, content_type="text/html", charset="utf-8")

        return page

    async def _static(self, request: web.Request) -> web.StreamResponse:
        file = request.match_info["file"]
        if file not in _ASSETS:
            raise web.HTTPNotFound(text="no such file\n")
        kind = "text/css" if file.endswith(".css") else "text/javascript"
        body = (self._assets / file).read_bytes()
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def _login(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not self.access.host_ok(origin.split("://", 1)[-1]):
            self.access.deny(request, Level.LOGS, f"login posted from another origin {origin!r}")
            raise web.HTTPForbidden(text="cross-origin login refused\n")
        form = await request.post()
        given = form.get("token")
        target = form.get("next")
        where = target if isinstance(target, str) and _local_path(target) else "/"
        if not isinstance(given, str) or not self.access.token_ok(given.strip()):
            self.access.deny(request, Level.LOGS, "wrong token at /login")
            body = (self._assets / "login.html").read_bytes()
            return web.Response(status=401, body=body, content_type="text/html", charset="utf-8")
        response = web.HTTPSeeOther(where)
        response.set_cookie(
            COOKIE,
            self.access.session_value,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.tls,
        )
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        return response

    # --- machine endpoints ------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        pubs = _View(self._daemon, self).publishers()
        await self.procstats.refresh({n: p.pid for n, p in pubs.items()})
        exporting = [
            (n, p.spec.probe)
            for n, p in pubs.items()
            if p.spec.probe.export_counters and p.state == PublisherState.RUNNING
        ]
        self.children.keep_only({n: None for n, _ in exporting})
        if exporting:
            await self.children.refresh(exporting)
        fmt, content_type = negotiate(request.headers.get("Accept", ""))
        body = await self.metrics.render(fmt)
        self.scrapes += 1
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        lag = self._daemon.loop_lag_ms
        if lag >= _WEDGED_MS:
            return web.Response(status=503, text=f"unhealthy: event loop ran {lag} ms late\n")
        return web.Response(text=f"ok: event loop lag {lag} ms\n")

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        d = self._daemon
        if d.stopping:
            return web.Response(status=503, text="not ready: stopping\n")
        sup = d.supervisor
        if not d.ready.is_set() or sup is None:
            return web.Response(status=503, text="not ready: the first round has not settled\n")
        if not self.config.ready_ignores_fatal:
            fatal = [n for n, p in sup.publishers.items() if p.state == PublisherState.FATAL]
            if fatal:
                shown = ", ".join(fatal[:5]) + (f" and {len(fatal) - 5} more" if fatal[5:] else "")
                return web.Response(status=503, text=f"not ready: FATAL: {shown}\n")
        return web.Response(text=f"ready: {sup.summary()}\n")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        pub = self._publisher(request)
        try:
            after = int(request.query.get("after", str(-_LINES_FIRST)))
            n = int(request.query.get("n", "1000"))
        except ValueError:
            raise web.HTTPBadRequest(text="after and n must be integers\n") from None
        out = pub.output
        chunk = out.last(-after) if after < 0 else out.tail(after, n)
        text = "".join(line.text + ("" if line.partial else "\n") for line in chunk.lines)
        return web.Response(
            text=text,
            headers={"X-Next-Seq": str(chunk.next_seq), "X-Missed": str(chunk.missed)},
        )

    def _publisher(self, request: web.Request) -> Publisher:
        sup = self._daemon.supervisor
        name = request.match_info["name"]
        pub = sup.publishers.get(name) if sup is not None else None
        if pub is None:
            raise web.HTTPNotFound(text="no publisher of that name\n")
        return pub

    # --- live streams -----------------------------------------------------------------------

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        return response

    def _leaders(self) -> dict[str, int | None]:
        sup = self._daemon.supervisor
        return {} if sup is None else {n: p.pid for n, p in sup.publishers.items()}

    def _table_json(self) -> bytes:
        sup = self._daemon.supervisor
        key = (-1 if sup is None else sup.changed.fires, self.procstats.refreshes)
        if self._table is None or self._table[0] != key:
            rows = [] if sup is None else [_row(p, self.procstats) for p in sup.publishers.values()]
            body = {"status": self._daemon.fb303_status(), "publishers": rows}
            self._table = (key, json.dumps(body, separators=(",", ":")).encode())
        return self._table[1]

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = await self._stream(request)
        try:
            sent = b""
            while not self._closed.is_set():
                await self.procstats.refresh(self._leaders())
                body = self._table_json()
                if body != sent:
                    await response.write(b"event: table\ndata: " + body + b"\n\n")
                    sent = body
                    await asyncio.sleep(_GAP)  # at most a few tables a second per browser
                else:
                    await response.write(b": idle\n\n")  # finds a closed connection
                await self._changed_or(None, _TICK)
        except ConnectionResetError:
            pass  # the browser went away
        return response

    async def _changed_or(self, extra: Awaitable[None] | None, timeout: float) -> None:
        sup = self._daemon.supervisor
        waits: list[Awaitable[object]] = [] if sup is None else [sup.changed.wait()]
        if extra is not None:
            waits.append(extra)
        waits.append(self._closed.wait())
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def _publisher_events(self, request: web.Request) -> web.StreamResponse:
        pub = self._publisher(request)
        logs = self.access.allowed(request, Level.LOGS)
        response = await self._stream(request)
        try:
            hello = {"logs": logs, "token": self.access.has_token}
            await response.write(b"event: access\ndata: " + _json(hello) + b"\n\n")
            cursor = -_LINES_FIRST
            last_id = request.headers.get("Last-Event-ID", "")
            if last_id.isdigit():
                cursor = int(last_id)
            sent = b""
            sup = self._daemon.supervisor
            while (
                not self._closed.is_set()
                and sup is not None
                and sup.publishers.get(pub.name) is pub
            ):
                self.procstats.one(pub.name, pub.pid)
                state = _row(pub, self.procstats)
                state["recent_exits"] = list(self.exits.exits.get(pub.name, ()))
                body = _json(state)
                if body != sent:
                    await response.write(b"event: state\ndata: " + body + b"\n\n")
                    sent = body
                if logs:
                    out = pub.output
                    chunk = out.last(-cursor) if cursor < 0 else out.tail(cursor, 500)
                    if chunk.lines or chunk.missed:
                        lines = [
                            {"seq": x.seq, "t": x.time, "s": x.stream, "x": x.text, "p": x.partial}
                            for x in chunk.lines
                        ]
                        data = _json({"lines": lines, "missed": chunk.missed})
                        await response.write(
                            f"id: {chunk.next_seq}\nevent: log\ndata: ".encode() + data + b"\n\n"
                        )
                    cursor = chunk.next_seq
                    await self._changed_or(out.wait_beyond(cursor), _TICK)
                else:
                    await self._changed_or(None, _TICK)
        except ConnectionResetError:
            pass  # the browser went away
        return response


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _local_path(target: str) -> bool:
    """Only a path on this server: no scheme, no "//host", no backslash tricks."""
    return target.startswith("/") and not target.startswith("//") and "\\" not in target

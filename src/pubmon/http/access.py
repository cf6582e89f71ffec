"""HTTP access checks (issue 18): the Host check and the credentials of the logs level, with
the levels, allow lists and refusal counting of `pubmon.config.access`.

- The bearer token of `[http] token_file` is compared as SHA-256 digests with
  hmac.compare_digest: equal lengths, so the time taken says nothing about the token, not even
  its length. The file is looked at again at most once a second (a rotated token takes effect
  without a restart; an unreadable or empty file keeps the old one).
- The session cookie set by /login is an HMAC of the token, not the token: it never leaves the
  server in a form that works as a bearer token, and a new token ends every session.
- A verified client certificate (mutual TLS with [monitor]'s tls_client_ca) gets the level
  `[monitor] allow` gives its subject or a SAN, as on the Thrift monitor listener.
- A request whose Host header is not the listen host, localhost, 127.0.0.1, ::1 or one of
  `[http] hosts` is refused: a site whose DNS name was rebound to 127.0.0.1 reaches the port
  but cannot name it.
"""

from __future__ import annotations

__all__ = ["COOKIE", "LISTENER", "HttpAccess", "read_token"]

import hashlib
import hmac
import logging
import os
import time
from typing import Any

from aiohttp import web

from pubmon.config.access import LEVELS, AccessList, Level, Policy, Refusals, cert_keys
from pubmon.config.model import HttpConfig
from pubmon.errors import StartupError

logger = logging.getLogger("pubmon.http.server")

LISTENER = "http"
COOKIE = "pubmon_session"


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class HttpAccess:
    """Who may see what over HTTP: the Host check, the credential checks, counted refusals.

    `refusals` is the daemon's (the Thrift listeners count theirs there too: one set of
    access.denied.<listener>.<level> counters); `cert_allow` is [monitor] allow when mutual
    TLS is on, else None.
    """

    def __init__(
        self,
        config: HttpConfig,
        token: bytes | None,
        *,
        refusals: Refusals,
        cert_allow: AccessList | None = None,
    ) -> None:
        self._token_file = config.token_file
        self._token_stat: tuple[int, int, int] | None = _stat_key(config.token_file)
        self._token_checked = time.monotonic()
        self._set_token(token)
        address = config.address()
        host = address[0] if address is not None else "127.0.0.1"
        self.hosts = frozenset({host.lower(), "localhost", "127.0.0.1", "::1", *config.hosts})
        self.refusals = refusals
        refusals.track(LISTENER)
        self._certs = (
            None
            if cert_allow is None
            else Policy(LISTENER, f"the HTTP listener {config.listen}", cert_allow, "")
        )

    def _set_token(self, token: bytes | None) -> None:
        self._token = _digest(token) if token else None
        self._session = (
            hmac.new(token, b"pubmon dashboard session", hashlib.sha256).hexdigest().encode()
            if token
            else None
        )

    def _fresh_token(self) -> None:
        """A token file replaced or rewritten (rotation) takes effect within a second, and
        ends every session of the old token. An unreadable or empty file keeps the old one."""
        now = time.monotonic()
        if self._token_file is None or now - self._token_checked < 1.0:
            return
        self._token_checked = now
        key = _stat_key(self._token_file)
        if key == self._token_stat or key is None:
            return
        try:
            token = read_token(self._token_file)
        except StartupError as exc:
            logger.warning("http: keeping the previous token: %s", exc)
            return
        self._token_stat = key
        self._set_token(token)
        logger.info("http: token file %s changed: new token in force", self._token_file)

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        host = header.lower()
        if host.startswith("["):  # [::1]:9180
            host = host[1 : host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        return host in self.hosts

    def token_ok(self, given: str) -> bool:
        # Digests of equal length: compare_digest then takes the same time for any input.
        self._fresh_token()
        if self._token is None:
            return False
        return hmac.compare_digest(_digest(given.encode()), self._token)

    def session_ok(self, cookie: str | None) -> bool:
        self._fresh_token()
        if self._session is None or not cookie:
            return False
        return hmac.compare_digest(_digest(cookie.encode()), _digest(self._session))

    @property
    def session_value(self) -> str:
        assert self._session is not None
        return self._session.decode()

    def level(self, request: web.Request) -> Level:
        """The level this request has: status always, logs with a token or session, and what
        [monitor] allow gives a verified client certificate (never control: nothing over HTTP
        changes state)."""
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and self.token_ok(given.strip()):
            return Level.LOGS
        if self.session_ok(request.cookies.get(COOKIE)):
            return Level.LOGS
        transport = request.transport
        peercert: dict[str, Any] | None = (
            transport.get_extra_info("peercert") if transport is not None else None
        )
        if peercert and self._certs is not None:
            rdns = tuple(pair for rdn in peercert.get("subject", ()) for pair in rdn)
            got = self._certs.level(cert_keys(rdns, tuple(peercert.get("subjectAltName", ()))))
            if got is not None and LEVELS.index(got) >= LEVELS.index(Level.LOGS):
                return Level.LOGS
        return Level.STATUS

    def allowed(self, request: web.Request, level: Level) -> bool:
        return LEVELS.index(self.level(request)) >= LEVELS.index(level)

    def deny(self, request: web.Request, level: Level, why: str) -> None:
        """Count the refusal; log it unless this peer was logged in the last minute."""
        peer = request.remote or "?"
        message = f"{request.method} {request.path} needs the {level} level: {why}"
        self.refusals.refuse(LISTENER, level, peer, message)


def _stat_key(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_token(path: str | None) -> bytes | None:
    """The token in `path` (None: no token file). StartupError when it cannot be read, is
    empty, or is open to every user (a secret any local user could read or swap)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode & 0o777
    except OSError as exc:
        raise StartupError(f"http.token_file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise StartupError(f"http.token_file {path} is empty")
    if mode & 0o007:
        raise StartupError(f"http.token_file {path} is open to every user (mode {mode:04o})")
    return token

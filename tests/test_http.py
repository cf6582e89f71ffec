"""The HTTP listener (issues 13 and 18): real daemon, real sockets, aiohttp as the client.

Access levels over HTTP: status without a credential (/metrics, /healthz, /readyz, states),
logs only with the bearer token, the login cookie or a client certificate; a Host header that
does not name this server is refused; no CORS headers; a CSP on every response.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from daemons import RunningDaemon, daemon_header, run_daemon, toml_publisher
from procs import descendants
from pubmon.config.load import parse_config
from pubmon.demo import free_ports
from pubmon.errors import ConfigError

TOKEN = "s3cret-token-for-tests-0123456789"
SECRET = "SECRET_TOKEN=hunter2"
PRINTS = ["sh", "-c", f"echo {SECRET}; echo '<b>bold</b>'; exec sleep 3600"]


def http_section(port: int, token: Path | None = None, **keys: object) -> str:
    text = f'[http]\nlisten = "127.0.0.1:{port}"\n'
    if token is not None:
        text += f'token_file = "{token}"\n'
    for key, value in keys.items():
        text += f"{key} = {str(value).lower() if isinstance(value, bool) else value}\n"
    return text


@asynccontextmanager
async def http_daemon(
    tmp: Path, body: str, *, http: str = "", monitor: str = "", token: bool = True
) -> AsyncIterator[tuple[RunningDaemon, str, Path]]:
    """A daemon with an [http] listener; yields (daemon, base URL, token file)."""
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    header = daemon_header(tmp)
    if monitor:
        header = header.replace('[monitor]\nlisten = ""\n', monitor)
    if not http:
        (port,) = free_ports(1)
        http = http_section(port, token_file if token else None)
    port = int(http.split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
    config = tmp / "pubmon.toml"
    config.write_text(header + http + body)
    async with run_daemon(config) as d:
        scheme = "https" if "tls_cert" in monitor else "http"
        try:
            yield d, f"{scheme}://127.0.0.1:{port}", token_file
        finally:
            if d.proc.returncode is None:
                d.signal(signal.SIGTERM)  # a graceful stop kills whole groups (SIGKILL would not)
                await d.wait_exit()
        assert d.proc.returncode == 0


async def get(
    url: str, *, headers: dict[str, str] | None = None, ssl_ctx: ssl.SSLContext | bool = True
) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(url, headers=headers or {}, allow_redirects=False, ssl=ssl_ctx) as r,
    ):
        return r.status, dict(r.headers), await r.text()


# --- config -------------------------------------------------------------------------------------


def parse(text: str, tmp: Path | None = None) -> object:
    return parse_config(text, (tmp or Path("/tmp")) / "pubmon.toml")


def test_http_is_off_by_default() -> None:
    config = parse_config('[publisher.a]\ncommand = "sleep 1"\n', "/tmp/pubmon.toml")
    assert config.http.listen == ""
    assert config.http.address() is None


def test_http_config_errors_name_their_keys(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    short.chmod(0o644)
    text = (
        '[http]\nlisten = "localhost"\ntoken_file = "short"\nhosts = ["ok.example", "a/b"]\n'
        "child_counters_max = -1\nlistne = 1\n"
        '[publisher.a]\ncommand = "sleep 1"\nprobe = { kind = "tcp", port = 9, '
        "export_counters = true }\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_config(text, tmp_path / "pubmon.toml")
    text_of = str(err.value)
    for expected in (
        'http.listen: expected "host:port"',
        "http.token_file: expected a token of at least 16 characters",
        "short is open to every user (mode 0644): chmod o-rwx",
        "http.hosts: item 2: expected a host name, got 'a/b'",
        "http.child_counters_max: expected an integer in 0..10000, got -1",
        "http.listne: unknown key (did you mean 'listen'?)",
        "publisher.a.probe.export_counters: needs kind = 'fb303'",
    ):
        assert expected in text_of, text_of


def test_http_port_may_not_be_a_publishers_port() -> None:
    with pytest.raises(ConfigError, match=r"http\.listen: port 9101 is also the port of publisher"):
        parse_config(
            '[monitor]\nlisten = ""\n[http]\nlisten = "127.0.0.1:9101"\n'
            '[publisher.a]\ncommand = "sleep 1"\nport = 9101\n',
            "/tmp/pubmon.toml",
        )


# --- status level -------------------------------------------------------------------------------


async def test_health_ready_and_metrics_need_no_credential(tmp_path: Path) -> None:
    tree = ["sh", "-c", "sleep 3600 & sleep 3600 & wait"]
    body = toml_publisher("a", PRINTS) + toml_publisher("tree", tree)
    async with http_daemon(tmp_path, body) as (d, url, _):
        status, _, text = await get(url + "/healthz")
        assert (status, text.split(":")[0]) == (200, "ok")
        status, _, text = await get(url + "/readyz")
        assert (status, text) == (200, "ready: 2/2 publishers running, 0 fatal\n")

        # RUNNING says the shell started, not that it forked its sleeps yet: wait for both, then
        # for a scrape whose (cached) /proc figures were taken after the forks.
        tree_key = ("pubmon_publisher_processes", (("publisher", "tree"),))
        async with asyncio.timeout(10):
            while len(descendants(d.publisher_pids()["tree"])) < 2:
                await asyncio.sleep(0.01)
            while True:
                status, headers, text = await get(url + "/metrics")
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in parse_text(text)
                    for s in f.samples
                }
                if samples.get(tree_key) == 3:
                    break
                await asyncio.sleep(0.05)
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        for name in ("a", "tree"):
            assert samples[("pubmon_publisher_up", (("program", name), ("publisher", name)))] == 1
            state = (("publisher", name), ("state", "RUNNING"))
            assert samples[("pubmon_publisher_state", state)] == 1
        # The tree is the shell and its two sleeps, each with its own memory.
        assert samples[tree_key] == 3
        pids = d.publisher_pids()
        page = os.sysconf("SC_PAGE_SIZE")
        rss = int(Path(f"/proc/{pids['a']}/statm").read_text().split()[1]) * page
        got = samples[("pubmon_publisher_resident_memory_bytes", (("publisher", "a"),))]
        assert abs(got - rss) < 1 << 20
        build = (("python", sys.version.split()[0]), ("version", "0.1.0"))
        assert samples[("pubmon_build_info", build)] == 1
        assert ("process_resident_memory_bytes", ()) in samples

        om = "application/openmetrics-text; version=1.0.0; charset=utf-8"
        status, headers, text = await get(url + "/metrics", headers={"Accept": om})
        assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        families = {f.name: f for f in parse_om(text)}
        assert families["pubmon_publisher_restarts"].type == "counter"
        assert families["pubmon_publisher_probe_duration_seconds"].type == "histogram"
        # No pid, exit status or start time as a label: values only.
        labels = {k for f in families.values() for s in f.samples for k in s.labels}
        assert labels <= {"publisher", "program", "state", "health", "reason", "le", "listener",
                          "level", "version", "python", "counter"}  # fmt: skip


async def test_readyz_fails_while_a_publisher_is_fatal_unless_relaxed(tmp_path: Path) -> None:
    crash = toml_publisher("crash", ["false"], crash_loop={"max_restarts": 0, "window": 60})
    body = toml_publisher("ok", ["sleep", "3600"]) + crash
    (tmp_path / "strict").mkdir()
    async with http_daemon(tmp_path / "strict", body) as (d, url, _):
        async with asyncio.timeout(10):
            while (r := await get(url + "/readyz"))[0] == 200 or "FATAL" not in r[2]:
                await asyncio.sleep(0.05)  # the crash loop runs out within a few exits
        assert r[:1] == (503,) and r[2] == "not ready: FATAL: crash\n"
    (tmp_path / "relaxed").mkdir()
    (port,) = free_ports(1)
    relaxed = http_section(port, ready_ignores_fatal=True)
    async with http_daemon(tmp_path / "relaxed", body, http=relaxed) as (d, url, _):
        async with asyncio.timeout(10):
            while "crash" not in (m := (await get(url + "/metrics"))[2]) or (
                'pubmon_publisher_state{publisher="crash",state="FATAL"} 1' not in m
            ):
                await asyncio.sleep(0.05)
        status, _, text = await get(url + "/readyz")
        assert status == 200 and text.startswith("ready:")


# --- logs level ---------------------------------------------------------------------------------


async def test_logs_need_the_token_and_refusals_are_counted(tmp_path: Path) -> None:
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS)) as (d, url, _):
        await d.wait_log("ready:")
        status, headers, text = await get(url + "/logs/a")
        assert status == 401 and SECRET not in text
        assert headers["WWW-Authenticate"] == 'Bearer realm="pubmon"'
        status, _, text = await get(url + "/logs/a", headers={"Authorization": "Bearer nope"})
        assert status == 401 and SECRET not in text
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with asyncio.timeout(10):
            while SECRET not in (r := await get(url + "/logs/a?after=0", headers=auth))[2]:
                await asyncio.sleep(0.05)  # the line is in the ring once the pipe is read
        status, headers, text = r
        assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
        assert text.splitlines() == [SECRET, "<b>bold</b>"]
        assert headers["X-Next-Seq"] == "2"
        status, _, text = await get(url + "/logs/a?after=1", headers=auth)
        assert text == "<b>bold</b>\n"
        status, _, _ = await get(url + "/logs/nope", headers=auth)
        assert status == 404

        _, _, metrics = await get(url + "/metrics")
        assert 'pubmon_access_denied_total{listener="http",level="logs"} 2' in metrics
        refusals = [line for line in d.stderr if "access denied on http" in line]
        assert len(refusals) == 1, refusals  # once per peer per minute
        assert "to 127.0.0.1: GET /logs/a needs the logs level: no credential" in refusals[0]


async def test_login_form_sets_a_strict_httponly_cookie(tmp_path: Path) -> None:
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS)) as (d, url, _):
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for an IP address host
        async with aiohttp.ClientSession(cookie_jar=jar) as s:
            async with s.get(url + "/login") as r:
                form = await r.text()
            assert '<form method="post" action="/login">' in form and "<script" not in form
            async with s.post(url + "/login", data={"token": "wrong"}, allow_redirects=False) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
            async with s.get(url + "/logs/a") as r:
                assert r.status == 401
            async with s.get(url + "/logs/a", headers={"Cookie": "pubmon_session=forged"}) as r:
                assert r.status == 401
            async with s.post(
                url + "/login", data={"token": TOKEN, "next": "//evil.example/"},
                allow_redirects=False,
            ) as r:  # fmt: skip
                assert r.status == 303 and r.headers["Location"] == "/"
                cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
            assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
            async with s.get(url + "/logs/a?after=0") as r:
                assert r.status == 200
            # A login posted from another origin (a page the operator visits) is refused.
            async with s.post(
                url + "/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"},
                allow_redirects=False,
            ) as r:  # fmt: skip
                assert r.status == 403
            async with s.post(url + "/logout", allow_redirects=False) as r:
                assert r.status == 303
            async with s.get(url + "/logs/a") as r:
                assert r.status == 401


async def test_client_certificate_grants_logs(tmp_path: Path, certs: Path) -> None:
    (mon_port,) = free_ports(1)
    monitor = (
        f'[monitor]\nlisten = "127.0.0.1:{mon_port}"\ntls_cert = "{certs / "server.pem"}"\n'
        f'tls_key = "{certs / "server.key"}"\ntls_client_ca = "{certs / "ca.pem"}"\n'
        'allow = { logs = ["CN=operator,O=pubmon"] }\n'  # the subject of certs/client.pem
    )
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS), monitor=monitor) as (d, url, _):
        plain = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        status, _, _ = await get(url + "/healthz", ssl_ctx=plain)
        assert status == 200  # TLS without a client certificate: the status level
        status, _, _ = await get(url + "/logs/a", ssl_ctx=plain)
        assert status == 401
        mutual = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        mutual.load_cert_chain(certs / "client.pem", certs / "client.key")
        status, _, text = await get(url + "/logs/a?after=0", ssl_ctx=mutual)
        assert status == 200
        # Under TLS the session cookie is Secure.
        jar = aiohttp.CookieJar(unsafe=True)
        async with (
            aiohttp.ClientSession(cookie_jar=jar) as s,
            s.post(url + "/login", data={"token": TOKEN}, ssl=plain, allow_redirects=False) as r,
        ):
            assert "Secure" in r.headers["Set-Cookie"]

        # A certificate [monitor] allow does not name for logs gets the status level only.
        d.config.write_text(d.config.read_text().replace("allow = { logs", "allow = { status"))
        d.signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while (await get(url + "/logs/a", ssl_ctx=mutual))[0] != 401:
                await asyncio.sleep(0.05)  # the reload is applied
        assert (await get(url + "/healthz", ssl_ctx=mutual))[0] == 200


# --- browsers' attack surface -------------------------------------------------------------------


async def test_foreign_host_header_is_refused(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    http = http_section(port, hosts='["pubmon.internal"]')
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS), http=http) as (d, url, _):
        for path in ("/", "/metrics", "/events", "/logs/a"):
            status, _, text = await get(url + path, headers={"Host": "attacker.example"})
            assert status == 421, path
            assert SECRET not in text
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "pubmon.internal", "[::1]"):
            status, _, _ = await get(url + "/healthz", headers={"Host": host})
            assert status == 200, host
        _, _, metrics = await get(url + "/metrics")
        assert 'pubmon_access_denied_total{listener="http",level="status"} 3' in metrics


async def test_every_response_has_a_csp_and_no_cors_headers(tmp_path: Path) -> None:
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS)) as (d, url, _):
        origin = {"Origin": "http://evil.example"}
        for path, want in (
            ("/", 200), ("/p/a", 200), ("/login", 200), ("/static/dashboard.js", 200),
            ("/metrics", 200), ("/healthz", 200), ("/logs/a", 401), ("/nope", 404),
            ("/static/../http.py", 404),
        ):  # fmt: skip
            status, headers, text = await get(url + path, headers=origin)
            assert status == want, (path, status)
            csp = headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp
            assert "unsafe-inline" not in csp
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert not [h for h in headers if h.lower().startswith("access-control-")], path
            if path in ("/", "/p/a", "/login"):
                assert "<script>" not in text and " style=" not in text  # no inline code


async def test_no_token_file_means_logs_only_over_mutual_tls(tmp_path: Path) -> None:
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS), token=False) as (d, url, _):
        status, _, _ = await get(url + "/logs/a", headers={"Authorization": "Bearer "})
        assert status == 401
        async with (
            aiohttp.ClientSession() as s,
            s.post(url + "/login", data={"token": ""}, allow_redirects=False) as r,
        ):
            assert r.status == 401


async def test_exported_child_counters_reach_metrics_with_a_cap(tmp_path: Path) -> None:
    (port, http_port) = free_ports(2)
    demo = [sys.executable, "-m", "pubmon.demo", "--pub_port={port}", "--name={name}"]
    probe = {"kind": "fb303", "interval": 0.2, "timeout": 0.2, "export_counters": True}
    body = toml_publisher("demo", demo, port=port, start_timeout=10, probe=probe)
    http = http_section(http_port, child_counters_max=2)
    async with http_daemon(tmp_path, body, http=http) as (d, url, _):
        async with asyncio.timeout(10):
            while "pubmon_child_counter{" not in (text := (await get(url + "/metrics"))[2]):
                await asyncio.sleep(0.05)  # the first fetch happens at a scrape
        samples = [
            s for f in parse_text(text) for s in f.samples if s.name == "pubmon_child_counter"
        ]
        assert len(samples) == 2  # the cap: the first two keys in sorted order
        assert all(s.labels["publisher"] == "demo" for s in samples)
        assert all(s.labels["counter"].startswith("demo.") for s in samples)


async def test_a_rotated_token_file_takes_effect_without_a_restart(tmp_path: Path) -> None:
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS)) as (d, url, token_file):
        old = {"Authorization": f"Bearer {TOKEN}"}
        assert (await get(url + "/logs/a", headers=old))[0] == 200
        new_token = "a-rotated-token-9876543210"
        fresh = tmp_path / "token.new"
        fresh.write_text(new_token + "\n")
        fresh.chmod(0o600)
        fresh.rename(token_file)  # as a secret manager replaces it
        new = {"Authorization": f"Bearer {new_token}"}
        async with asyncio.timeout(5):
            while (await get(url + "/logs/a", headers=new))[0] != 200:
                await asyncio.sleep(0.1)  # the file is looked at once a second at most
        assert (await get(url + "/logs/a", headers=old))[0] == 401
        assert any("new token in force" in line for line in d.stderr)


async def test_a_port_in_use_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "pubmon.toml"
        config.write_text(
            daemon_header(tmp_path) + http_section(port) + toml_publisher("a", ["sleep", "3600"])
        )
        async with run_daemon(config, ready=False) as d:
            assert await d.wait_exit() == 3  # EXIT_STARTUP, before any publisher was spawned
        assert any(f"http listener 127.0.0.1:{port}: " in line for line in d.stderr), d.stderr
        assert not any("spawned pid" in line for line in d.stderr)


async def test_reload_moves_the_listener_and_applies_hosts(tmp_path: Path) -> None:
    (new_port,) = free_ports(1)
    async with http_daemon(tmp_path, toml_publisher("a", PRINTS)) as (d, url, token_file):
        config = d.config.read_text()
        old = url.rsplit(":", 1)[1]
        d.config.write_text(
            config.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new_port}").replace(
                "[http]\n", '[http]\nhosts = ["pubmon.internal"]\n'
            )
        )
        d.signal(signal.SIGHUP)
        await d.wait_log(f"http listening on 127.0.0.1:{new_port}")
        new_url = f"http://127.0.0.1:{new_port}"
        status, _, _ = await get(new_url + "/healthz", headers={"Host": "pubmon.internal"})
        assert status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(url + "/healthz")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await get(new_url + "/logs/a", headers=auth))[0] == 200

        # A port that cannot be bound: the reload keeps the listener where it was.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            d.config.write_text(d.config.read_text().replace(str(new_port), str(busy)))
            d.signal(signal.SIGHUP)
            await d.wait_log(f"http listener 127.0.0.1:{busy}: ")
            back = f"http listening on 127.0.0.1:{new_port}"
            async with asyncio.timeout(5):
                while sum(back in line for line in d.stderr) < 2:
                    await asyncio.sleep(0.02)  # the old address is bound again
            assert (await get(new_url + "/healthz"))[0] == 200

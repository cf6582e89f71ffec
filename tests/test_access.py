"""Access levels (status, logs, control) on the control socket and the TCP monitor listener, and
their reload: real daemons, real sockets, real uids (setpriv), real certificates (openssl)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons import RunningDaemon, run_daemon, toml_publisher
from pubmon.config.access import _METHOD_LEVELS, AccessList, Level, level_of, unix_principal
from pubmon.errors import RpcError
from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient
from test_service import free_port, nobody_python

SECRET = [
    sys.executable,
    "-c",
    "import time; print('SECRET_TOKEN=hunter2', flush=True); time.sleep(3600)",
]
NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as other users")
needs_python = pytest.mark.skipif(
    not os.path.exists("/usr/bin/python3"), reason="needs a python other users can run"
)


# --- levels -----------------------------------------------------------------------------------


def test_every_method_of_the_service_has_a_level() -> None:
    # A method added to the IDL without a decision would fall back to control (closed); the
    # table must still name every one, so the docs say what each needs.
    served = set(idl.bind(idl.pubmon().PubmonService).methods)
    assert served == set(_METHOD_LEVELS)
    assert level_of("tailLog") == Level.LOGS
    assert {level_of(m) for m in ("getStatus", "getCounters", "listPublishers")} == {Level.STATUS}
    assert level_of("stopPublisher") == level_of("shutdown") == Level.CONTROL
    assert level_of("someFutureMethod") == Level.CONTROL


def test_levels_nest_and_reload_lines_name_the_change() -> None:
    acl = AccessList(logs=(unix_principal("@27"),), control=(unix_principal(0),))
    assert acl.level({"*", "uid:5", "gid:27"}) == Level.LOGS
    assert acl.level({"*", "uid:0"}) == Level.CONTROL  # control includes logs and status
    assert acl.level({"*", "uid:5"}) is None
    new = AccessList(logs=(unix_principal("@100"),), control=(unix_principal(0),))
    assert acl.changes(new, "control.allow") == ["control.allow: logs += @100 -= @27"]


def test_allow_uids_takes_user_names_and_is_the_control_list(tmp_path: Path) -> None:
    from pubmon.config.load import parse_config
    from pubmon.errors import ConfigError

    config = parse_config(
        '[control]\nallow_uids = [0, "nobody"]\nallow = { logs = ["@nogroup", 7] }\n',
        tmp_path / "pubmon.toml",
    )
    assert config.control.allow_uids == (0, NOBODY)
    assert [p.key for p in config.control.allow.control] == ["uid:0", f"uid:{NOBODY}"]
    assert [p.key for p in config.control.allow.logs] == [f"gid:{NOBODY}", "uid:7"]
    with pytest.raises(ConfigError) as info:
        parse_config('[control]\nallow_uids = ["@nogroup", 1.5]\n', tmp_path / "pubmon.toml")
    assert [str(p) for p in info.value.problems] == [
        "control.allow_uids: item 1: expected a uid or a user name, got '@nogroup' "
        '(groups and "*" go in [control] allow)',
        'control.allow_uids: item 2: expected a uid, a user name, @group, @gid or "*", got '
        "float 1.5",
    ]


def test_refusals_are_counted_every_time_and_logged_once_a_minute_per_peer(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pubmon.config.access import Refusals

    r = Refusals()
    r.track("control")
    assert r.counters()["access.denied.control.logs"] == 0  # listed before the first refusal
    for _ in range(5):
        r.refuse("monitor", Level.LOGS, "10.0.0.1", "no")
    r.refuse("monitor", Level.CONTROL, "10.0.0.2", "no")
    assert r.counters()["access.denied.monitor.logs"] == 5
    assert r.counters()["access.denied.monitor.control"] == 1
    assert len([x for x in caplog.records if "access denied" in x.getMessage()]) == 2
    # Peers without end (127/8 alone has 2^24 addresses) cannot grow the memory or the log.
    caplog.clear()
    monkeypatch.setattr(Refusals, "MAX_PEERS", 8)
    for i in range(100):
        r.refuse("monitor", Level.LOGS, f"127.0.1.{i}", "no")
    messages = [x.getMessage() for x in caplog.records]
    assert len(messages) == 7 and "more than 8 peers a minute" in messages[-1], messages
    assert r.counters()["access.denied.monitor.logs"] == 105


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Account:
    user: str
    uid: int
    gid: int  # its own primary group
    group: str  # a second group it is a member of (supplementary only)
    group_gid: int


@pytest.fixture(scope="module")
def account() -> Iterator[Account]:
    """A throw-away user whose primary group is its own, member of one more throw-away group."""
    if os.getuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    tag = uuid.uuid4().hex[:6]
    user, group = f"pmtest{tag}", f"pmlogs{tag}"
    subprocess.run(["groupadd", group], check=True)
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--user-group", "-G", group, "-s", "/bin/false", user],
            check=True,
        )
        try:
            import grp
            import pwd

            pw = pwd.getpwnam(user)
            yield Account(user, pw.pw_uid, pw.pw_gid, group, grp.getgrnam(group).gr_gid)
        finally:
            subprocess.run(["userdel", user], check=True)
    finally:
        subprocess.run(["groupdel", group], capture_output=True)  # userdel may have taken it


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Path, tuple[str, dict[str, str]]]]:
    """A directory every user can traverse (tmp_path is under a 0700 one), and a python with
    pubmon that every user can run (ours lives under /root)."""
    base = Path(tempfile.mkdtemp(prefix="pubmon-access-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base, nobody_python(base / "py")
    finally:
        shutil.rmtree(base)


def as_user(uid: int, gid: int, *, init_groups: bool = False) -> list[str]:
    """setpriv's prefix to run as uid:gid, with no groups or the user's own from /etc/group."""
    groups = ["--init-groups"] if init_groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *groups]


async def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd="/"
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def pubmon_as(
    prefix: list[str], py: tuple[str, dict[str, str]], *args: str
) -> tuple[int, str, str]:
    return await run(*prefix, py[0], "-m", "pubmon", *args, env=py[1])


async def pubmon(*args: str) -> tuple[int, str, str]:
    return await run(sys.executable, "-m", "pubmon", *args, env=dict(os.environ))


def write_config(
    path: Path, *, sock: Path | str, listen: str, control: str = "", monitor: str = ""
) -> None:
    path.write_text(
        f'[daemon]\nshutdown_timeout = 30\n[control]\nsocket = "{sock}"\n{control}'
        f'[monitor]\nlisten = "{listen}"\n{monitor}' + toml_publisher("a", SECRET)
    )


async def counters(sock: Path) -> dict[str, int]:
    async with await ThriftClient.connect(idl.pubmon().PubmonService, unix_socket=str(sock)) as c:
        got = await c.call("getCounters")
    assert isinstance(got, dict)
    return got


# A client that keeps one connection open and makes calls on it, line by line from stdin: what
# `pubmon tail -f` does, as another user.
HOLDER = """
import json, sys
from pubmon.thrift.blocking import BlockingClient
from pubmon.errors import RpcError
from pubmon.thrift.blocking import DeclaredException
client = BlockingClient(unix_socket=sys.argv[1], timeout=10)
for line in sys.stdin:
    method, *args = json.loads(line)
    try:
        got = client.call(method, *args)
        out = {"ok": repr(got)[:200]}
    except (DeclaredException, RpcError) as e:
        out = {"err": str(e)}
    print(json.dumps(out), flush=True)
"""


@asynccontextmanager
async def holder(
    prefix: list[str], py: tuple[str, dict[str, str]], sock: Path, script_dir: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    script = script_dir / "holder.py"
    script.write_text(HOLDER)
    script.chmod(0o644)
    proc = await asyncio.create_subprocess_exec(
        *prefix, py[0], str(script), str(sock),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=py[1], cwd="/",
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def ask(proc: asyncio.subprocess.Process, method: str, *args: object) -> dict[str, str]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((json.dumps([method, *args]) + "\n").encode())
    await proc.stdin.drain()
    async with asyncio.timeout(20):
        line = await proc.stdout.readline()
    assert line, "the holder died"
    got: dict[str, str] = json.loads(line)
    return got


# --- TCP without client certificates -----------------------------------------------------------


@needs_root
@needs_python
async def test_tcp_gives_nobody_status_but_not_logs(
    shared: tuple[Path, tuple[str, dict[str, str]]],
) -> None:
    base, py = shared
    d_path = Path(tempfile.mkdtemp(dir=base))
    port = free_port()
    config = d_path / "pubmon.toml"
    write_config(config, sock=d_path / "pubmon.sock", listen=f"127.0.0.1:{port}")
    tcp = ["--host", "127.0.0.1", "--port", str(port)]
    nobody = as_user(NOBODY, NOBODY)
    async with run_daemon(config) as d:
        rc, out, err = await pubmon_as(nobody, py, "status", *tcp)
        assert rc == 0 and "RUNNING" in out, err
        for _ in range(3):  # refused each time, logged once
            rc, out, err = await pubmon_as(nobody, py, "tail", "a", "-n", "5", *tcp)
            assert rc == 5, (rc, out, err)
            assert "hunter2" not in out + err
            assert "tailLog needs the logs level" in err and "status level only" in err
        rc, _, err = await pubmon_as(nobody, py, "stop", "a", *tcp)
        assert rc == 5 and "stopPublisher needs the control level" in err
        # root's own tail over the control socket does see the line: it was there to leak
        rc, out, _ = await pubmon("tail", "a", "-n", "5", "--socket", str(d_path / "pubmon.sock"))
        assert rc == 0 and "SECRET_TOKEN=hunter2" in out
        got = await counters(d_path / "pubmon.sock")
        assert got["access.denied.monitor.logs"] == 3
        assert got["access.denied.monitor.control"] == 1
        assert got["access.denied.monitor.status"] == got["access.denied.control.logs"] == 0
    denials = [line for line in d.stderr if "access denied on monitor to 127.0.0.1" in line]
    assert len(denials) == 1, denials  # once per peer per minute
    assert not [line for line in d.stderr if "called by" in line]  # refused: not a call


# --- unix socket: groups -----------------------------------------------------------------------


@needs_root
@needs_python
async def test_unix_socket_logs_group_reads_logs_but_cannot_stop(
    shared: tuple[Path, tuple[str, dict[str, str]]], account: Account
) -> None:
    base, py = shared
    d_path = Path(tempfile.mkdtemp(dir=base))
    d_path.chmod(0o755)
    sock = d_path / "pubmon.sock"
    config = d_path / "pubmon.toml"
    write_config(
        config, sock=sock, listen="", control=f'allow = {{ logs = ["@{account.group}"] }}\n'
    )
    # Its primary group is its own: the logs group comes from SO_PEERGROUPS (supplementary).
    member = as_user(account.uid, account.gid, init_groups=True)
    outsider = as_user(account.uid, account.gid)  # the same user, its groups dropped
    nobody = as_user(NOBODY, NOBODY)
    async with run_daemon(config):
        assert sock.stat().st_mode & 0o777 == 0o666  # others are named: SO_PEERCRED is the gate
        async with asyncio.timeout(20):  # until the daemon has read the publisher's line
            while True:
                tail = ("tail", "a", "-n", "5", "--socket", str(sock))
                rc, out, err = await pubmon_as(member, py, *tail)
                if rc != 0 or out:
                    break
        assert rc == 0 and "SECRET_TOKEN=hunter2" in out, err
        rc, out, err = await pubmon_as(member, py, "status", "--socket", str(sock))
        assert rc == 0 and "RUNNING" in out, err  # logs includes status
        rc, _, err = await pubmon_as(member, py, "stop", "a", "--socket", str(sock))
        assert rc == 5, err
        assert f"stopPublisher needs the control level on the control socket {sock}" in err
        assert f"uid {account.uid} has logs" in err and "[control] allow.control" in err
        rc, out, err = await pubmon_as(outsider, py, "tail", "a", "--socket", str(sock))
        assert rc == 5 and f"uid {account.uid} has no access level" in err
        assert "hunter2" not in out + err
        rc, _, err = await pubmon_as(nobody, py, "status", "--socket", str(sock))
        assert rc == 5 and "uid 65534 has no access level" in err
        got = await counters(sock)
        assert got["access.denied.control.control"] == 1
        assert got["access.denied.control.status"] == 2  # refused at connect: no level at all
        assert got["access.denied.control.logs"] == 0


# --- mutual TLS ---------------------------------------------------------------------------------


@asynccontextmanager
async def tls_daemon(
    base: Path, certs: Path, server: str = "server"
) -> AsyncIterator[tuple[RunningDaemon, int, Path]]:
    port = free_port()
    config = base / "pubmon.toml"
    write_config(
        config,
        sock=base / "pubmon.sock",
        listen=f"127.0.0.1:{port}",
        monitor=(
            f'tls_cert = "{certs / f"{server}.pem"}"\ntls_key = "{certs / f"{server}.key"}"\n'
            f'tls_client_ca = "{certs / "ca.pem"}"\n'
            'allow = { control = ["CN=operator,O=pubmon"], logs = ["DNS:dash.example"] }\n'
        ),
    )
    async with run_daemon(config) as d:
        yield d, port, base / "pubmon.sock"


def tls_args(certs: Path, name: str | None, port: int, host: str = "127.0.0.1") -> list[str]:
    args = ["--host", host, "--port", str(port), "--tls-ca", str(certs / "ca.pem")]
    if name is not None:
        args += ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}.key")]
    return args


async def test_mutual_tls_subjects_and_sans_map_to_levels(tmp_path: Path, certs: Path) -> None:
    async with tls_daemon(tmp_path, certs) as (d, port, sock):
        # the operator's subject: control (and so logs)
        rc, out, err = await pubmon("restart", "a", *tls_args(certs, "client", port))
        assert rc == 0 and "a: RUNNING" in out, err
        await d.wait_log("restartPublisher called by O=pubmon,CN=operator")
        rc, out, err = await pubmon("tail", "a", "-n", "1", *tls_args(certs, "client", port))
        assert rc == 0 and "hunter2" in out, err
        # the dashboard's SAN: logs, not control
        rc, out, err = await pubmon("tail", "a", "-n", "1", *tls_args(certs, "viewer", port))
        assert rc == 0 and "hunter2" in out, err
        rc, _, err = await pubmon("stop", "a", *tls_args(certs, "viewer", port))
        assert rc == 5 and "stopPublisher needs the control level" in err
        assert "certificate O=pubmon,CN=viewer has logs" in err
        assert '"DNS:dash.example"' in err and "[monitor] allow.control" in err
        # signed by the same CA, named nowhere: status only
        rc, out, err = await pubmon("status", *tls_args(certs, "stranger", port))
        assert rc == 0 and "RUNNING" in out, err
        rc, out, err = await pubmon("tail", "a", *tls_args(certs, "stranger", port))
        assert rc == 5 and "hunter2" not in out and "has status" in err
        # the operator's subject on a certificate made for servers (EKU without clientAuth)
        rc, out, err = await pubmon("status", *tls_args(certs, "serveronly", port))
        assert rc == 4 and out == "" and "closed the TLS connection before answering" in err
        # no client certificate at all: the handshake fails
        rc, out, err = await pubmon("status", *tls_args(certs, None, port))
        assert rc == 4 and out == "" and "closed the TLS connection before answering" in err
        got = await counters(sock)
        assert got["access.denied.monitor.control"] == 1
        assert got["access.denied.monitor.logs"] == 1


async def test_cli_checks_the_daemons_name_over_tls(tmp_path: Path, certs: Path) -> None:
    # A server certificate for CN=stranger and IP:127.0.0.1: good for 127.0.0.1, not localhost.
    async with tls_daemon(tmp_path, certs, server="stranger") as (_, port, _):
        rc, out, err = await pubmon("status", *tls_args(certs, "client", port))
        assert rc == 0 and "RUNNING" in out, err
        rc, out, err = await pubmon("status", *tls_args(certs, "client", port, host="localhost"))
        assert rc == 4 and out == "" and "Hostname mismatch" in err, err
        # a CA that did not sign it
        rc, _, err = await pubmon(
            "status", "--host", "127.0.0.1", "--port", str(port),
            "--tls-ca", str(certs / "client.pem"),
            "--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key"),
        )  # fmt: skip
        assert rc == 4 and "certificate verify failed" in err, err
        rc, _, err = await pubmon("status", "--tls-ca", str(certs / "ca.pem"))
        assert rc == 64 and "go with --host" in err  # a usage error


# --- reload -------------------------------------------------------------------------------------


@needs_root
@needs_python
async def test_reload_applies_allow_lists_at_once_and_closes_demoted_peers(
    shared: tuple[Path, tuple[str, dict[str, str]]], account: Account
) -> None:
    base, py = shared
    d_path = Path(tempfile.mkdtemp(dir=base))
    d_path.chmod(0o755)
    sock = d_path / "pubmon.sock"
    config = d_path / "pubmon.toml"
    member = as_user(account.uid, account.gid, init_groups=True)
    nobody = as_user(NOBODY, NOBODY)
    first = f'allow_uids = [0, "nobody"]\nallow = {{ logs = ["@{account.group}"] }}\n'
    write_config(config, sock=sock, listen="", control=first)
    async with (
        run_daemon(config) as d,
        holder(member, py, sock, d_path) as reader,
        holder(nobody, py, sock, d_path) as operator,
    ):
        assert "hunter2" in (await ask(reader, "tailLog", "a", -5, 10))["ok"]
        assert "RUNNING" in (await ask(operator, "getPublisher", "a"))["ok"]
        # nobody leaves allow_uids (control) for status; the member's group loses logs
        write_config(config, sock=sock, listen="", control='allow = { status = ["nobody"] }\n')
        rc, out, err = await pubmon("reload", "--socket", str(sock))
        assert rc == 0, err
        assert f"control.allow: logs -= @{account.group}" in out
        assert "control.allow: status += nobody" in out
        assert "control.allow: control -= nobody" in out
        assert "closed 2 connection(s)" in out
        # both open connections were closed; new ones get what the new lists say
        for held in (reader, operator):
            got = await ask(held, "getStatus")
            assert "closed" in got["err"], got
        rc, out, err = await pubmon_as(member, py, "tail", "a", "--socket", str(sock))
        assert rc == 5 and "has no access level" in err and "hunter2" not in out
        rc, out, err = await pubmon_as(nobody, py, "status", "--socket", str(sock))
        assert rc == 0 and "RUNNING" in out, err
        rc, out, err = await pubmon_as(nobody, py, "tail", "a", "--socket", str(sock))
        assert rc == 5 and "tailLog needs the logs level" in err
        # back to root only: the socket closes its door again
        assert sock.stat().st_mode & 0o777 == 0o666
        write_config(config, sock=sock, listen="")
        rc, out, err = await pubmon("reload", "--socket", str(sock))
        assert rc == 0 and "control.socket: mode 0600" in out, (out, err)
        assert sock.stat().st_mode & 0o777 == 0o600
        await d.wait_log("reload: control.allow: status -= nobody")


async def test_reload_rebinds_listeners_and_a_bind_failure_keeps_the_old_ones(
    tmp_path: Path,
) -> None:
    sock_a, sock_b, sock_c = (tmp_path / f"{x}.sock" for x in "abc")
    p1, p2 = free_port(), free_port()
    config = tmp_path / "pubmon.toml"
    write_config(config, sock=sock_a, listen=f"127.0.0.1:{p1}")
    svc = idl.pubmon().PubmonService
    async with run_daemon(config):
        write_config(config, sock=sock_b, listen=f"127.0.0.1:{p2}", monitor="idle_timeout = 60\n")
        rc, out, err = await pubmon("reload", "--socket", str(sock_a))
        assert rc == 0, err
        assert "monitor.idle_timeout: 300.0 -> 60.0" in out
        assert f"control.socket: {sock_a} -> {sock_b}" in out
        assert f"monitor.listen: 127.0.0.1:{p1} -> 127.0.0.1:{p2}" in out
        assert not sock_a.exists()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p1), timeout=5).close()
        async with await ThriftClient.connect(svc, host="127.0.0.1", port=p2) as c:
            assert idl.FbStatus(await c.call("getStatus")) == idl.FbStatus.ALIVE
        # a port someone else holds: the reload fails, naming it; nothing changes
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            p3 = squatter.getsockname()[1]
            write_config(config, sock=sock_c, listen=f"127.0.0.1:{p3}")
            rc, out, err = await pubmon("reload", "--socket", str(sock_b))
        assert rc == 2, (out, err)
        assert f"monitor.listen: cannot listen on 127.0.0.1:{p3}" in err
        assert "in use" in err
        assert not sock_c.exists()  # bound for the reload, closed again when it failed
        rc, out, err = await pubmon("status", "--socket", str(sock_b))
        assert rc == 0 and "RUNNING" in out, err
        rc, out, err = await pubmon("status", "--host", "127.0.0.1", "--port", str(p2))
        assert rc == 0 and "RUNNING" in out, err
        got = await counters(sock_b)
        assert got["daemon.reload_failures"] == 1


def served_subject(port: int, certs: Path) -> str:
    """The CN of the certificate the monitor listener presents now."""
    ctx = ssl.create_default_context(cafile=certs / "ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain(certs / "client.pem", certs / "client.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    return str(dict(pair for rdn in cert["subject"] for pair in rdn)["commonName"])


async def test_reload_rebuilds_tls_on_the_same_port_or_keeps_the_old_one(
    tmp_path: Path, certs: Path
) -> None:
    async with tls_daemon(tmp_path, certs) as (_, port, sock):
        assert served_subject(port, certs) == "localhost"
        config = tmp_path / "pubmon.toml"
        text = config.read_text()
        garbage = tmp_path / "garbage.pem"
        garbage.write_text("not a certificate\n")
        config.write_text(text.replace(str(certs / "server.pem"), str(garbage)))
        rc, out, err = await pubmon("reload", "--socket", str(sock))
        assert rc == 2 and "monitor.tls_cert: cannot load" in err, (out, err)
        assert served_subject(port, certs) == "localhost"  # the old listener, untouched
        # rotated to another certificate at the same address
        config.write_text(
            text.replace(str(certs / "server.pem"), str(certs / "stranger.pem")).replace(
                str(certs / "server.key"), str(certs / "stranger.key")
            )
        )
        rc, out, err = await pubmon("reload", "--socket", str(sock))
        assert rc == 0 and "monitor: TLS settings or files changed" in out, err
        assert served_subject(port, certs) == "stranger"
        rc, out, err = await pubmon("tail", "a", "-n", "1", *tls_args(certs, "viewer", port))
        assert rc == 0 and "hunter2" in out, err
        # The dashboard's SAN loses logs: its open connection closes, its next one gets status.
        ctx = ssl.create_default_context(cafile=certs / "ca.pem")
        ctx.check_hostname = False
        ctx.load_cert_chain(certs / "viewer.pem", certs / "viewer.key")
        svc = idl.pubmon().PubmonService
        async with await ThriftClient.connect(
            svc, host="127.0.0.1", port=port, ssl_context=ctx
        ) as viewer:
            chunk = await viewer.call("tailLog", "a", -1, 1)
            assert "hunter2" in chunk.lines[0].text
            config.write_text(
                config.read_text().replace('logs = ["DNS:dash.example"]', "logs = []")
            )
            rc, out, err = await pubmon("reload", "--socket", str(sock))
            assert rc == 0 and "monitor.allow: logs -= DNS:dash.example" in out, err
            assert "closed 1 connection(s)" in out
            with pytest.raises(RpcError):
                await viewer.call("getStatus")
        rc, out, err = await pubmon("tail", "a", *tls_args(certs, "viewer", port))
        assert rc == 5 and "hunter2" not in out and "O=pubmon,CN=viewer has status" in err

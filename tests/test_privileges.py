"""A publisher run as another user (needs root): its credentials, the parent-death signal still
armed after the switch, and the daemon's own files keeping safe modes."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from control import control
from daemons import run_daemon, toml_publisher
from procs import environ, wait_gone

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

SYSTEM_PY = Path("/usr/bin/python3")  # the venv's interpreter lives under /root: not for nobody
# No braces: {…} in a command are pubmon's placeholders.
REPORT = (
    "import ctypes, os, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "sig = ctypes.c_int(-1)\n"
    "libc.prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
    "print('uid=%d euid=%d gid=%d egid=%d groups=%s pdeathsig=%d home=%s user=%s' % (\n"
    "    os.getuid(), os.geteuid(), os.getgid(), os.getegid(),\n"
    "    ','.join(map(str, sorted(os.getgroups()))), sig.value,\n"
    "    os.environ.get('HOME'), os.environ.get('USER')), flush=True)\n"
    "time.sleep(3600)\n"
)


def proc_ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


async def test_publisher_as_nobody_keeps_pdeathsig_and_files_stay_private(tmp_path: Path) -> None:
    if not SYSTEM_PY.exists():
        pytest.skip(f"{SYSTEM_PY} is needed (an interpreter the user nobody can run)")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    groups = sorted(os.getgrouplist("nobody", nobody.pw_gid))
    logs, sock = tmp_path / "logs", tmp_path / "run" / "pubmon.sock"
    config = tmp_path / "pubmon.toml"
    config.write_text(
        f'[daemon]\nlog_dir = "{logs}"\n[control]\nsocket = "{sock}"\n[monitor]\nlisten = ""\n'
        + toml_publisher("np", [str(SYSTEM_PY), "-S", "-c", REPORT], user="nobody", directory="/")
    )
    umask = os.umask(0o022)  # the modes below are the daemon's choice under the usual umask
    try:
        daemon = run_daemon(config)
        d = await daemon.__aenter__()
    finally:
        os.umask(umask)
    try:
        pid = (await d.wait_publishers(1))["np"]
        log = logs / "np.log"
        async with asyncio.timeout(10):
            while not (log.exists() and log.read_text().endswith("\n")):
                await asyncio.sleep(0.02)
        got = dict(item.split("=", 1) for item in log.read_text().split())
        assert got == {
            "uid": str(nobody.pw_uid),
            "euid": str(nobody.pw_uid),
            "gid": str(nobody.pw_gid),
            "egid": str(nobody.pw_gid),
            "groups": ",".join(map(str, groups)),  # nobody's own groups, not root's
            "pdeathsig": str(int(signal.SIGKILL)),  # armed after the switch, not cleared by it
            "home": nobody.pw_dir,
            "user": "nobody",
        }
        ids = proc_ids(pid)
        assert ids["Uid"] == [nobody.pw_uid] * 4 and ids["Gid"] == [nobody.pw_gid] * 4
        assert sorted(ids["Groups"]) == groups
        for path, mode in ((logs, 0o750), (log, 0o640), (sock, 0o600)):
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
            assert (st.st_uid, st.st_gid) == (0, 0), path
        # kill -9 of the daemon: the kernel's parent-death signal ends the child as nobody.
        d.signal(signal.SIGKILL)
        await d.wait_exit()
        await wait_gone([pid], timeout=2)
    finally:
        await daemon.__aexit__(None, None, None)


# --- case 9: the directory is entered as the publisher's user; its environment is its own ----

PRINT_CWD = "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(3600)\n"


async def test_the_directory_is_entered_after_the_switch_to_user(tmp_path: Path) -> None:
    if not SYSTEM_PY.exists():
        pytest.skip(f"{SYSTEM_PY} is needed (an interpreter the user nobody can run)")
    secret = tmp_path / "secret"  # only root can enter it
    secret.mkdir(mode=0o700)
    cmd = [str(SYSTEM_PY), "-S", "-c", PRINT_CWD]
    config = tmp_path / "pubmon.toml"
    config.write_text(
        f'[daemon]\nlog_dir = "{tmp_path / "logs"}"\n[control]\nsocket = "{tmp_path / "s"}"\n'
        '[monitor]\nlisten = ""\n'
        + toml_publisher("locked", cmd, user="nobody", directory=str(secret))
        + toml_publisher("open", cmd, user="nobody", directory="/var/tmp")
        + toml_publisher("mine", cmd, user="root", directory=str(secret))
    )
    async with run_daemon(config) as d, control(tmp_path / "s") as c:
        pids = await d.wait_publishers(2)
        assert set(pids) == {"open", "mine"}
        infos = {i.name: i for i in await c.call("listPublishers")}
        assert infos["locked"].state == "FATAL"
        assert infos["locked"].statusDetails.endswith(
            f"cannot enter directory {secret} as user nobody: Permission denied"
        )
        assert os.readlink(f"/proc/{pids['open']}/cwd") == "/var/tmp"
        assert os.readlink(f"/proc/{pids['mine']}/cwd") == str(secret)
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0


async def test_publishers_get_their_own_environment_not_the_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "s3cret")  # the daemon inherits our environment
    monkeypatch.setenv("KEEP_ME", "kept")
    monkeypatch.setenv("LANG", "C.UTF-8")
    cmd = ["/bin/sleep", "3600"]
    nobody = pwd.getpwnam("nobody")
    config = tmp_path / "pubmon.toml"
    config.write_text(
        f'[daemon]\ninherit_environment = ["KEEP_ME"]\nlog_dir = "{tmp_path / "logs"}"\n'
        '[control]\nsocket = ""\n[monitor]\nlisten = ""\n'
        + toml_publisher("plain", cmd, user="nobody", inherit_environment=False)
        + toml_publisher("default", cmd, user="nobody", environment={"MINE": "1"})
        + toml_publisher("everything", cmd, user="nobody", inherit_environment=True)
    )
    async with run_daemon(config) as d:
        pids = await d.wait_publishers(3)
        envs = {
            name: dict(item.decode().split("=", 1) for item in environ(pid) if item)
            for name, pid in pids.items()
        }
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0
    assert envs["plain"] == {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "HOME": nobody.pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "SHELL": nobody.pw_shell,
        "PUBMON_PUBLISHER": "plain",
    }
    assert envs["default"] == {**envs["plain"], "PUBMON_PUBLISHER": "default", "KEEP_ME": "kept",
                               "MINE": "1"}  # fmt: skip
    assert envs["everything"]["SECRET_TOKEN"] == "s3cret"
    assert "NOTIFY_SOCKET" not in envs["everything"]


@pytest.fixture
def public_lib() -> Iterator[Path]:
    """pubmon's sources where nobody can import them (pytest's tmp_path is root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="pubmon-lib-"))
    try:
        src = Path(__file__).parents[1] / "src" / "pubmon"
        shutil.copytree(src, base / "pubmon", ignore=shutil.ignore_patterns("__pycache__"))
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        yield base
    finally:
        shutil.rmtree(base)


def test_a_daemon_that_is_not_root_names_the_cause_of_a_failed_switch(public_lib: Path) -> None:
    if not SYSTEM_PY.exists():
        pytest.skip(f"{SYSTEM_PY} is needed (an interpreter the user nobody can run)")
    lib = public_lib
    code = (
        "import asyncio\n"
        "from pubmon.core.process import SpawnRequest, spawn\n"
        "from pubmon.errors import SpawnError\n"
        "class Sink:\n"
        "    def feed(self, data): pass\n"
        "    def eof(self): pass\n"
        "async def main():\n"
        "    try:\n"
        "        await spawn(SpawnRequest('p', ('/bin/true',), user='root'), Sink(), Sink())\n"
        "    except SpawnError as exc:\n"
        "        print(exc.permanent, exc.why)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--",
         str(SYSTEM_PY), "-S", "-c", code],
        env={"PYTHONPATH": str(lib), "PATH": "/usr/bin:/bin"}, cwd="/",
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert done.stdout.startswith(
        "True cannot switch to user root (uid 0): Operation not permitted; the daemon runs as "
        "uid 65534, and only root (or CAP_SETUID and CAP_SETGID) can run a publisher as another "
        "user"
    ), done.stdout + done.stderr


async def test_publishers_do_not_inherit_the_daemons_oom_protection(tmp_path: Path) -> None:
    # As under the unit's OOMScoreAdjust=-500: the daemon inherits our score from us.
    own = Path("/proc/self/oom_score_adj")
    before = own.read_text()
    config = tmp_path / "pubmon.toml"
    config.write_text(
        f'[daemon]\nlog_dir = "{tmp_path / "logs"}"\n[control]\nsocket = ""\n'
        '[monitor]\nlisten = ""\n'
        + toml_publisher("rooted", ["/bin/sleep", "3600"], user="root")  # the setpriv wrapper
        + toml_publisher("nobodys", ["/bin/sleep", "3600"], user="nobody", directory="/")
    )
    try:
        own.write_text("-500")
    except PermissionError:
        pytest.skip("lowering an OOM score needs CAP_SYS_RESOURCE, which this sandbox lacks")
    try:
        async with run_daemon(config) as d:
            pids = await d.wait_publishers(2)
            scores = {
                n: Path(f"/proc/{p}/oom_score_adj").read_text().strip() for n, p in pids.items()
            }
            daemon_score = Path(f"/proc/{d.pid}/oom_score_adj").read_text().strip()
            d.signal(signal.SIGTERM)
            assert await d.wait_exit() == 0
    finally:
        own.write_text(before)
    assert daemon_score == "-500"
    assert scores == {"rooted": "0", "nobodys": "0"}

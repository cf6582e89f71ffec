"""A publisher run as another user (needs root): its credentials, the parent-death signal still
armed after the switch, and the daemon's own files keeping safe modes."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import stat
from pathlib import Path

import pytest

from daemons import run_daemon, toml_publisher
from procs import wait_gone

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

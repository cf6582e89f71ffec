"""Suite-wide guards: no test may leave a process of its own behind."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procs import alive, descendants, state

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphaned grandchildren of anything a test starts are re-parented to pytest itself, so the
    # leak check below sees them however they were orphaned.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_zombie_children() -> None:
    for pid in descendants(os.getpid()):
        if state(pid) == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


@pytest.fixture(autouse=True)
def no_stolen_exit_statuses(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """asyncio reports 255 when someone else reaped its child: always a pubmon bug."""
    yield
    stolen = [r.getMessage() for r in caplog.records if "returncode 255" in r.getMessage()]
    assert not stolen, stolen


@pytest.fixture(scope="session")
def spared_pids() -> list[Callable[[], set[int]]]:
    """Pid sources the leak check spares: a wider-scoped fixture whose processes outlive single
    tests on purpose (tests/systemd's nested systemd) adds one, and must tear them down itself."""
    return []


@pytest.fixture(autouse=True)
def no_leaked_processes(spared_pids: list[Callable[[], set[int]]]) -> Iterator[None]:
    before = descendants(os.getpid())
    yield
    # Give processes that were already told to exit a moment to finish dying (pdeathsig, killpg).
    deadline = time.monotonic() + 3.0
    while True:
        spared = set().union(*(source() for source in spared_pids))
        leaked = {p for p in descendants(os.getpid()) - before - spared if alive(p)}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap_zombie_children()
    if leaked:
        cmds = {}
        for pid in leaked:
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                cmds[pid] = raw.replace(b"\0", b" ")[:120]
            except OSError:
                cmds[pid] = b"?"
        pytest.fail(f"test left {len(leaked)} process(es) running: {cmds}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    (d / "viewer.ext").write_text("subjectAltName=DNS:dash.example\nextendedKeyUsage=clientAuth\n")
    # The control subject, but a certificate made for servers: its EKU lacks clientAuth.
    (d / "serveronly.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for name, subject, ext in (
        ("server", "/CN=localhost", "san.ext"),
        ("client", "/O=pubmon/CN=operator", "san.ext"),  # no EKU extension at all
        ("viewer", "/O=pubmon/CN=viewer", "viewer.ext"),
        ("stranger", "/O=elsewhere/CN=stranger", "san.ext"),
        ("serveronly", "/O=pubmon/CN=operator", "serveronly.ext"),
    ):
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
        sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", ext]
        run("x509", "-req", "-in", f"{name}.csr", *sign, "-out", f"{name}.pem", "-days", "2")
    yield d


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """A log directory not yet created (the output tests' OutputLog makes it)."""
    return tmp_path / "logs"

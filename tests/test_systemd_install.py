"""systemd/README.md, followed to the letter (issue 17): its shell blocks, run verbatim in order
under a real systemd, on this Debian 12 host, from scratch and back.

The README cannot rot: the test reads the ```sh blocks of "Install", "Upgrade" and "Uninstall"
from the file and runs each one with `sh -ex` inside the namespace-booted systemd
(tests/systemd), where /etc, /opt and /usr/local are overlays on a tmpfs (ns_init.py): adduser,
the venv, the unit file and the config land there and the host never sees them. Between the
blocks the test checks what the README promises (the unit active, `pubmon status` answering,
a reload keeping the main pid, the upgrade restarting it, nothing left after the uninstall).

Offline. Three things a fresh host fetches from the network are supplied locally, the way the
README tells an operator without internet access to do it:
- `apt-get`: a stand-in that checks the packages asked for are installed (dpkg -s);
- `git clone URL DIR` / `git pull`: a stand-in that copies this checkout's working tree;
- pip: `PIP_NO_INDEX=1 PIP_FIND_LINKS=<wheelhouse>` in the environment (pip takes every option
  from the environment too). The wheelhouse holds wheels of the dependencies and of the build
  backend, repacked from this checkout's .venv (same cp311 ABI as Debian's python3.11): a
  `pip wheel` of them would need the network.
Measured here (2 cores shared, load average 12): 18 s in all; `python3 -m venv` + the first
`pip install` 6 s (ensurepip; pubmon's wheel built by hatchling in an isolated environment),
the upgrade block 5 s, `systemctl enable --now` 2.6 s (the example's start_timeout). With
PIP_NO_COMPILE unset and the load at 20 the same run took 38 s.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from systemd import NestedSystemd, cannot_boot_reason, wait_for

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[1]
README = REPO / "systemd" / "README.md"
SERVICE = "pubmon.service"
SECTIONS = ("Install", "Upgrade", "Uninstall")
SCRATCH = ("/etc", "/opt", "/usr/local")

APT_GET = """\
#!/bin/sh
# apt-get, offline: `update` does nothing; `install` checks that the packages are installed.
[ "$1" = update ] && exit 0
shift
for p in "$@"; do
  case "$p" in -*) continue ;; esac
  dpkg -s "$p" >/dev/null 2>&1 || { echo "apt-get (test): $p is not installed" >&2; exit 100; }
done
"""
GIT = """\
#!/bin/sh
# git, offline: `clone URL DIR` and `pull` unpack the working tree of the checkout under test,
# packed next to this script by the host (the checkout itself may be under the host's /tmp,
# which the namespace does not see).
set -e
copy() {
  tar -C "$1" -xf "$(dirname "$0")/checkout.tar"
}
case "$1" in
  clone) mkdir -p "$3"; copy "$3" ;;
  pull) copy . ;;
  *) echo "git (test): only clone and pull" >&2; exit 1 ;;
esac
"""


# --- the README's blocks ------------------------------------------------------------------------


def readme_blocks(text: str) -> dict[str, list[str]]:
    """The ```sh blocks of each section in SECTIONS, dedented, in order."""
    out: dict[str, list[str]] = {}
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2], strict=True):
        word = title.split()[0]  # "Install (Debian 12, from scratch, as root)"
        if word in SECTIONS:
            found = re.findall(r"^( *)```sh\n(.*?)^\1```$", body, flags=re.M | re.S)
            out[word] = [textwrap.dedent(block) for _, block in found]
    return out


def logrotate_snippet(text: str) -> str:
    """The file the README says to put in /etc/logrotate.d/pubmon."""
    found = re.search(r"^( *)```\n(\1/var/log/pubmon/\*\.log \{.*?)^\1```$", text, re.M | re.S)
    assert found, "no logrotate snippet in systemd/README.md"
    return textwrap.dedent(found.group(2))


def test_the_readme_blocks_are_found() -> None:
    """The extraction itself: a README reworded so that no block matches must fail loudly."""
    blocks = readme_blocks(README.read_text())
    assert list(blocks) == list(SECTIONS)
    install = "\n".join(blocks["Install"])
    for step in ("python3 -m venv /opt/pubmon", "adduser --system", "systemctl enable --now"):
        assert step in install
    assert "pip install --upgrade" in "\n".join(blocks["Upgrade"])
    assert "systemctl disable --now pubmon" in "\n".join(blocks["Uninstall"])
    assert "postrotate" in logrotate_snippet(README.read_text())


# --- a wheelhouse without the network ------------------------------------------------------------


def _closure(names: list[str]) -> list[Distribution]:
    """The installed distributions `names` need (markers evaluated for this interpreter)."""
    seen: dict[str, Distribution] = {}
    todo = list(names)
    while todo:
        req = Requirement(todo.pop())
        key = req.name.lower().replace("_", "-")
        if key in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed in {sys.prefix}: run `make install`")
        seen[key] = dist
        todo += dist.requires or []
    return list(seen.values())


def repack(dist: Distribution, into: Path) -> Path:
    """A wheel of an installed distribution: its files under site-packages, its dist-info with a
    fresh RECORD (scripts are made again by pip from entry_points.txt)."""
    wheel_meta = dist.read_text("WHEEL") or "Tag: py3-none-any\n"
    tags = [t.split("-") for t in re.findall(r"^Tag: (\S+)", wheel_meta, re.M)]
    assert tags, wheel_meta
    # The compressed tag set of the file name: py2-none-any + py3-none-any = py2.py3-none-any.
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))
    name = re.sub(r"[-.]+", "_", dist.metadata["Name"])
    path = into / f"{name}-{dist.version}-{tag}.whl"
    skip = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")
    files = [
        f for f in dist.files or ()
        if not str(f).startswith("..") and "__pycache__" not in f.parts
        and not (f.parts[0].endswith(".dist-info") and f.name in skip)
    ]  # fmt: skip
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as whl:
        for f in files:
            whl.write(dist.locate_file(f), str(f))
            writer.writerow([str(f), "", ""])
        writer.writerow([f"{info}/RECORD", "", ""])
        whl.writestr(f"{info}/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pubmon = distribution("pubmon")
    runtime = [r for r in pubmon.requires or () if "extra ==" not in r]
    build = ["hatchling>=1.18"]  # pyproject.toml [build-system] requires
    house = tmp_path_factory.mktemp("wheelhouse")
    for dist in _closure(runtime + build):
        if dist.metadata["Name"].lower() != "pubmon":
            repack(dist, house)
    house.chmod(0o755)
    return house


@pytest.fixture(scope="module")
def shims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shims")
    for name, text in (("apt-get", APT_GET), ("git", GIT)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    excludes = ["./.git", "./.venv", "./bench/.venv-supervisor", "./bench/results", "*cache*"]
    subprocess.run(
        ["tar", "-C", str(REPO), *(f"--exclude={x}" for x in excludes), "-cf",
         str(folder / "checkout.tar"), "."],
        check=True,
    )  # fmt: skip
    (folder / "checkout.tar").chmod(0o644)
    folder.chmod(0o755)
    return folder


# --- the host -----------------------------------------------------------------------------------


@pytest.fixture
def host(
    tmp_path: Path,
    wheelhouse: Path,
    shims: Path,
    spared_pids: list[Callable[[], set[int]]],
) -> Iterator[NestedSystemd]:
    if reason := cannot_boot_reason():
        pytest.skip(f"cannot boot a nested systemd on this machine: {reason}")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no Debian python3 (/usr/bin/python3)")
    with NestedSystemd.boot(
        tmp_path / "systemd", share=[wheelhouse, shims], scratch=SCRATCH
    ) as machine:
        spared_pids.append(machine.pids)
        try:
            yield machine
        finally:
            spared_pids.remove(machine.pids)


def _sh(host: NestedSystemd, script: str, env: dict[str, str]) -> str:
    done = host.run("sh", "-exc", f"cd /\n{script}", check=False, timeout=60, env=env)
    assert done.returncode == 0, (
        f"README block failed (exit {done.returncode}):\n{script}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    return done.stdout


def test_install_start_reload_upgrade_uninstall_as_the_readme_says(
    host: NestedSystemd, wheelhouse: Path, shims: Path
) -> None:
    text = README.read_text()
    blocks = readme_blocks(text)
    env = {
        "PATH": f"{shims}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_NO_CACHE_DIR": "1",  # pip would write to the host's /root/.cache
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_COMPILE": "1",  # no .pyc at install: a third of the time of each pip run
        "PIP_CONFIG_FILE": "/dev/null",  # this host's pip.conf names local indexes
        "HOME": "/root",
    }
    # An operator account exists on the host before step 3 adds it to pubmon-ops.
    host.run("useradd", "-M", "-s", "/usr/sbin/nologin", "alice")
    for block in blocks["Install"]:
        _sh(host, block, env)
    assert host.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    status = _sh(host, "pubmon status", env)
    assert re.search(r"^(\d+) publishers: \1 RUNNING$", status, re.M), status
    groups = host.run("id", "-nG", "alice").stdout.split()
    assert "pubmon-ops" in groups
    assert _sh(host, "man -w pubmon", env).strip().endswith("/share/man/man1/pubmon.1")
    _sh(host, "test -f /usr/local/share/man/man1/pubmon.1", env)  # the link resolves

    main_pid = host.show(SERVICE, "MainPID")["MainPID"]
    _sh(host, "systemctl reload pubmon", env)
    assert host.show(SERVICE, "MainPID")["MainPID"] == main_pid

    # Step 7: the logrotate snippet as the file it says; a forced rotation runs its postrotate
    # (USR1 to the main process through systemd), after which the daemon has made every
    # rotated file again. (The state file goes to /run: /var/lib is the host's.)
    snippet = logrotate_snippet(text)
    _sh(host, f"cat > /etc/logrotate.d/pubmon <<'EOF'\n{snippet}EOF", env)
    if shutil.which("logrotate") is None:
        pytest.fail("logrotate is missing: make apt-cli (apt-get install logrotate)")
    _sh(host, "logrotate -s /run/logrotate.status -f /etc/logrotate.d/pubmon", env)
    rotated = _sh(host, "cd /var/log/pubmon && ls *.log.1", env).split()
    assert rotated, "logrotate rotated nothing"
    wanted = {r.removesuffix(".1") for r in rotated}
    wait_for(
        f"the daemon to make {sorted(wanted)} again",
        lambda: wanted <= set(_sh(host, "cd /var/log/pubmon && ls", env).split()),
        10,
    )
    assert host.show(SERVICE, "MainPID")["MainPID"] == main_pid

    for block in blocks["Upgrade"]:
        _sh(host, block, env)
    assert host.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    assert host.show(SERVICE, "MainPID")["MainPID"] != main_pid  # a restart, as it says

    for block in blocks["Uninstall"]:
        _sh(host, block, env)
    wait_for("the unit to be gone", lambda: _gone(host), 10)
    paths = "/opt/pubmon /usr/local/bin/pubmon /etc/pubmon /etc/systemd/system/pubmon.service"
    left = host.run(
        "sh", "-c", f"ls -d {paths} 2>/dev/null; getent passwd feed; getent group pubmon-ops",
        check=False,
    ).stdout  # fmt: skip
    assert left == ""


def _gone(host: NestedSystemd) -> bool:
    state = host.show(SERVICE, "LoadState", "ActiveState")
    return state.get("LoadState") == "not-found" and state.get("ActiveState") == "inactive"

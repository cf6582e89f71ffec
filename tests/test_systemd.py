"""pubmon under a real systemd (issue 4): systemd/pubmon.service, driven by systemctl.

One nested systemd per module (tests/systemd: PID 1 of private namespaces, about 0.2 s to boot).
The unit under test is the repo's own file, unchanged; a drop-in points ExecStart at this
checkout's venv and a config in tmp, and makes those paths visible through the unit's sandbox
(the interpreter may live under /root, which ProtectHome= hides). Each test starts from a
stopped, reset unit with no test drop-ins, and leaves it that way.

Waits are for systemctl itself (start/stop/reload return when systemd says so) or polls of
external state (`systemctl show`, /proc) under a deadline: there is no event to wait on.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from procs import alive, environ
from systemd import NestedSystemd, cannot_boot_reason, wait_for

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "pubmon.service"
EXAMPLE_CONFIG = REPO / "systemd" / "pubmon.toml"
VENV_PUBMON = REPO / ".venv" / "bin" / "pubmon"
SERVICE = "pubmon.service"

# `systemd-analyze security --offline=true` on systemd/pubmon.service (systemd 252). The rest
# is what supervision needs: root with CAP_SETUID/SETGID/KILL, the host network,
# AF_INET sockets, /proc of other users' processes. Lower it when the unit gets tighter.
MAX_EXPOSURE = 2.3

SLOW_START = 0.5  # ticker's start_timeout: READY=1 cannot come before it has passed


def base_config(home: Path) -> str:
    return f"""\
[daemon]
log_dir = "/var/log/pubmon"
shutdown_timeout = 10

[control]
socket = "/run/pubmon/pubmon.sock"

[monitor]
listen = ""

[publisher.ticker]
command = ["/bin/sh", "-c", "echo ticker says hello; echo ticker complains >&2; exec sleep 3600"]
start_timeout = {SLOW_START}
log = {{ echo = true }}

[publisher.nobody]
command = ["/bin/sleep", "3600"]
user = "nobody"
directory = "{home}"
start_timeout = 0

[publisher.worker]
command = ["/bin/sleep", "3600"]
start_timeout = 0
"""


def needed_paths(config: Path) -> set[Path]:
    """What the daemon reads: this checkout (venv, sources), its interpreter, the config."""
    interpreter = Path(os.path.realpath(REPO / ".venv" / "bin" / "python"))
    return {REPO, interpreter.parents[1], config.parent}


def checkout_dropin(config: Path) -> str:
    """ExecStart at this checkout's pubmon, and the paths it needs made visible in the sandbox."""
    needed = needed_paths(config)
    # Drop paths inside others (one bind covers them).
    binds = sorted(p for p in needed if not any(q != p and q in p.parents for q in needed))
    text = (
        "# Test only: this checkout's pubmon on a test config.\n[Service]\nExecStart=\n"
        f"ExecStart={VENV_PUBMON} daemon --config {config}\n"
        f"BindReadOnlyPaths={' '.join(map(str, binds))}\n"
    )
    hidden = (Path("/home"), Path("/root"), Path("/run/user"))
    if any(h == p or h in p.parents for p in binds for h in hidden):
        # ProtectHome=yes leaves no way to bind a path below /root back in; tmpfs does.
        text += "ProtectHome=tmpfs\n"
    return text


@pytest.fixture(scope="module")
def nobody() -> pwd.struct_passwd:
    """The user a publisher switches to, proving the sandbox allows it."""
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, nobody: pwd.struct_passwd) -> Path:
    path = tmp_path_factory.mktemp("pubmon-config") / "pubmon.toml"
    # Only nobody may enter it, and it is entered as nobody (the unit has no
    # CAP_DAC_READ_SEARCH): nobody must be able to reach it, so its parent lets others pass.
    path.parent.chmod(0o711)
    home = path.parent / "nobody-home"
    home.mkdir(mode=0o700)
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    return path


@pytest.fixture(scope="module")
def machine(
    tmp_path_factory: pytest.TempPathFactory,
    config: Path,
    spared_pids: list[Callable[[], set[int]]],
) -> Iterator[NestedSystemd]:
    if reason := cannot_boot_reason():
        pytest.skip(f"cannot boot a nested systemd on this machine: {reason}")
    assert VENV_PUBMON.exists(), f"{VENV_PUBMON} is missing: run `make install` first"
    state = tmp_path_factory.mktemp("systemd")
    with NestedSystemd.boot(state, [UNIT], share=needed_paths(config)) as m:
        spared_pids.append(m.pids)  # the leak check spares them; shutdown() ends them all
        try:
            m.write_dropin(SERVICE, "50-checkout", checkout_dropin(config))
            m.enable(SERVICE)
            yield m
        finally:
            spared_pids.remove(m.pids)


class Pubmon:
    """The pubmon unit in `machine`, and its processes seen from the host."""

    def __init__(
        self, machine: NestedSystemd, config: Path, home: Path, nobody: pwd.struct_passwd
    ) -> None:
        self.machine = machine
        self.config = config
        self.home = home
        self.nobody = nobody
        self.dropins: list[str] = []

    def systemctl(self, verb: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.machine.systemctl(verb, SERVICE, check=check)

    def show(self, *props: str) -> dict[str, str]:
        return self.machine.show(SERVICE, *props)

    def dropin(self, name: str, text: str) -> None:
        self.machine.write_dropin(SERVICE, name, f"[Service]\n{text}")
        self.dropins.append(name)
        self.machine.daemon_reload()

    def main_pid(self) -> int:
        """MainPID as the host sees it (systemd reports it in the namespace's numbering)."""
        ns_pid = int(self.show("MainPID")["MainPID"])
        assert ns_pid, "no main process"
        pid = self.machine.host_pid(ns_pid)
        assert pid is not None, f"MainPID {ns_pid} is not in the namespace"
        return pid

    def publishers(self) -> dict[str, int]:
        """Host pids of the main process's children that carry PUBMON_PUBLISHER, by name."""
        main = self.main_pid()
        found = {}
        for pid in self.machine.unit_pids(SERVICE):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                env = environ(pid)
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) != main or not alive(pid):
                continue
            for item in env:
                if item.startswith(b"PUBMON_PUBLISHER="):
                    found[item.split(b"=", 1)[1].decode()] = pid
        return found

    def journal(self) -> list[str]:
        """This run's journal lines: the daemon's stderr (and publisher echo) and systemd's."""
        invocation = self.show("InvocationID")["InvocationID"]
        return self.machine.journal(SERVICE, invocation=invocation)

    def wait_journal(self, *texts: str, timeout: float = 5) -> list[str]:
        # journald reads the daemon's stderr stream on its own schedule: poll it.
        def has_all() -> list[str] | None:
            lines = self.journal()
            return lines if all(any(t in line for line in lines) for t in texts) else None

        return wait_for(f"journal lines {texts}", has_all, timeout, every=0.05)


@pytest.fixture
def pubmon(machine: NestedSystemd, config: Path, nobody: pwd.struct_passwd) -> Iterator[Pubmon]:
    home = config.parent / "nobody-home"
    config.write_text(base_config(home))
    p = Pubmon(machine, config, home, nobody)
    try:
        yield p
    finally:
        p.systemctl("stop", check=False)
        machine.systemctl("reset-failed", check=False)
        for name in p.dropins:
            machine.remove_dropin(SERVICE, name)
        if p.dropins:
            machine.daemon_reload()
        assert not machine.unit_pids(SERVICE), "processes left in pubmon.service's cgroup"


def wait_gone(pids: Iterable[int], timeout: float) -> float:
    """Wait until none of `pids` is alive; return how long it took."""
    t0 = time.monotonic()
    pids = list(pids)
    wait_for(f"pids {pids} to end", lambda: not any(alive(p) for p in pids), timeout)
    return time.monotonic() - t0


def uid(pid: int) -> int:
    """The real uid of `pid`."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^Uid:\s+(\d+)\s", status, re.M)
    assert found, status
    return int(found.group(1))


def test_start_returns_after_ready_with_every_publisher_running(pubmon: Pubmon) -> None:
    t0 = time.monotonic()
    pubmon.systemctl("start")
    took = time.monotonic() - t0
    props = pubmon.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    # READY=1 carried this STATUS=, sent once the first autostart round settled: it waited for
    # ticker's start_timeout, and the daemon counted every publisher RUNNING.
    assert props["StatusText"] == "3/3 publishers running, 0 fatal"
    assert took >= SLOW_START
    pubs = pubmon.publishers()
    assert set(pubs) == {"ticker", "nobody", "worker"}
    # The sandbox still lets it switch users (CAP_SETUID/SETGID), then enter, as that user, a
    # directory only that user may enter.
    assert uid(pubs["nobody"]) == pubmon.nobody.pw_uid
    assert os.readlink(f"/proc/{pubs['nobody']}/cwd") == str(pubmon.home)
    # The control socket lives in RuntimeDirectory=pubmon, where the CLI finds it by default.
    status_table = pubmon.machine.run(str(VENV_PUBMON), "status").stdout
    assert all(name in status_table for name in pubs), status_table
    # The unit's system call filter lets the spawn wrapper (setpriv) arm PDEATHSIG: no fallback.
    assert not [line for line in pubmon.journal() if "cannot arm" in line]


def test_reload_applies_a_change_in_the_same_main_process(pubmon: Pubmon) -> None:
    pubmon.systemctl("start")
    main, before = pubmon.main_pid(), pubmon.publishers()
    config = pubmon.config.read_text()
    worker_old = '[publisher.worker]\ncommand = ["/bin/sleep", "3600"]'
    worker_new = '[publisher.worker]\ncommand = ["/bin/sleep", "3601"]'
    assert worker_old in config
    config = config.replace(worker_old, worker_new)
    config += '\n[publisher.extra]\ncommand = ["/bin/sleep", "3600"]\nstart_timeout = 0\n'
    pubmon.config.write_text(config)

    pubmon.systemctl("reload")

    def applied() -> dict[str, int] | None:
        pubs = pubmon.publishers()
        status = pubmon.show("StatusText")["StatusText"]
        if set(pubs) == {"ticker", "nobody", "worker", "extra"} and status.startswith("4/4 "):
            return pubs
        return None

    after = wait_for("the reload to take effect", applied, 10)
    assert pubmon.main_pid() == main
    assert pubmon.show("StatusText")["StatusText"] == "4/4 publishers running, 0 fatal"
    assert after["worker"] != before["worker"] and not alive(before["worker"])
    assert after["ticker"] == before["ticker"] and after["nobody"] == before["nobody"]
    pubmon.wait_journal("1 added, 0 removed, 1 restarted, 0 updated, 2 unchanged")


def test_upgrade_keeps_main_pid_unit_active_and_every_publisher(pubmon: Pubmon) -> None:
    extra = (
        '\n[publisher.many]\ncommand = ["/bin/sleep", "3600"]\nnumprocs = 47\nstart_timeout = 0\n'
    )
    pubmon.config.write_text(pubmon.config.read_text() + extra)
    pubmon.systemctl("start")
    main, before = pubmon.main_pid(), pubmon.publishers()
    assert len(before) == 50
    out = pubmon.machine.run(str(VENV_PUBMON), "upgrade").stdout
    assert "50 publishers carried over" in out, out
    # SIGUSR2 to the main process only, as systemd/README.md says.
    pubmon.machine.systemctl("kill", "--kill-whom=main", "-s", "USR2", SERVICE)
    lines = pubmon.wait_journal("upgraded from pubmon", timeout=30)
    wait_for(
        "the second upgrade",
        lambda: sum("upgraded from pubmon" in x for x in pubmon.journal()) == 2,
        30,
    )
    assert pubmon.main_pid() == main
    props = pubmon.show("ActiveState", "SubState", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["StatusText"] == "50/50 publishers running, 0 fatal"
    assert pubmon.publishers() == before
    assert not [x for x in lines if "cannot" in x or "ERROR" in x]
    # With Delegate=yes each publisher has a cgroup: the new image must not sweep those.
    journal = pubmon.journal()
    assert sum("publishers run in cgroups below" in x for x in journal) == 3, journal
    assert not [x for x in journal if "left in" in x]


def test_journal_has_the_daemon_log_and_publisher_output(pubmon: Pubmon) -> None:
    pubmon.systemctl("start")
    lines = pubmon.wait_journal(
        "ticker| ticker says hello",
        "ticker| ticker complains",
        "INFO pubmon.daemon.daemon: ready: 3/3 publishers running, 0 fatal",
        "STARTING -> RUNNING",
        "Started pubmon.service",  # systemd's own line about the unit
    )
    # JOURNAL_STREAM is set: the journal stamps lines, so the daemon does not.
    daemon_lines = [line for line in lines if "pubmon.daemon.daemon:" in line]
    assert daemon_lines and all(line.startswith("INFO ") for line in daemon_lines)
    # Every line also lands in its file under LogsDirectory=pubmon.
    log = pubmon.machine.run("cat", "/var/log/pubmon/ticker.log").stdout
    assert "ticker says hello" in log and "ticker complains" in log


def test_stop_ends_with_success_and_no_publisher(pubmon: Pubmon) -> None:
    pubmon.systemctl("start")
    main, pubs = pubmon.main_pid(), pubmon.publishers()
    pubmon.systemctl("stop")  # returns when the unit is inactive
    props = pubmon.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",  # CLD_EXITED: it exited by itself (status 0), not by a signal
        "ExecMainStatus": "0",
    }
    assert not alive(main)
    assert not any(alive(p) for p in pubs.values())
    assert not pubmon.machine.unit_pids(SERVICE)
    # The daemon logs its own pid, in the namespace's numbering, as systemd reports it.
    ns_main = pubmon.show("ExecMainPID")["ExecMainPID"]
    pubmon.wait_journal("SIGTERM: stopping gracefully", f"pubmon {ns_main} stopped")


def test_a_wedged_loop_is_killed_by_the_watchdog(pubmon: Pubmon) -> None:
    # A long RestartSec keeps the unit in auto-restart, where Result still reads "watchdog"
    # (a restart would reset it); kill -9 below shows the restart itself.
    pubmon.dropin("wedge", "Environment=PUBMON_TEST_WEDGE=1\nWatchdogSec=2\nRestartSec=1h\n")
    pubmon.systemctl("start")
    main, pubs = pubmon.main_pid(), pubmon.publishers()
    os.kill(main, signal.SIGUSR2)  # the daemon's loop now blocks for good
    t0 = time.monotonic()
    wait_for("Result=watchdog", lambda: pubmon.show("Result")["Result"] == "watchdog", 10)
    took = time.monotonic() - t0
    assert 0.9 < took < 5, took  # the last ping was at most WatchdogSec/2 before the wedge
    # Result is set when the watchdog fires; the kill (stop-watchdog, final-sigterm/-sigkill)
    # takes a moment more before the unit waits to restart (Restart=on-failure).
    wait_for(
        "SubState=auto-restart",
        lambda: pubmon.show("SubState")["SubState"] == "auto-restart",
        10,
    )
    assert not alive(main)
    assert not any(alive(p) for p in pubs.values())
    assert not pubmon.machine.unit_pids(SERVICE)
    pubmon.wait_journal("Watchdog timeout (limit 2s)!", "Failed with result 'watchdog'")


def test_kill_9_of_the_main_process_takes_publishers_and_restarts(pubmon: Pubmon) -> None:
    pubmon.dropin("fast-restart", "RestartSec=0.2\n")
    pubmon.systemctl("start")
    main, pubs = pubmon.main_pid(), pubmon.publishers()
    assert len(pubs) == 3
    os.kill(main, signal.SIGKILL)
    # Their parent-death signal: KillMode=mixed alone would leave them for TimeoutStopSec.
    assert wait_gone(pubs.values(), timeout=10) < 10  # not TimeoutStopSec

    def restarted() -> dict[str, int] | None:
        props = pubmon.show("ActiveState", "SubState", "NRestarts", "StatusText", "MainPID")
        if (props["ActiveState"], props["SubState"]) != ("active", "running"):
            return None
        if props["MainPID"] == str(main):  # systemd has not yet seen the kill (a loaded host)
            return None
        assert props["NRestarts"] == "1"
        assert props["StatusText"] == "3/3 publishers running, 0 fatal"
        return pubmon.publishers()

    again = wait_for("systemd to restart pubmon", restarted, 10)
    assert set(again) == set(pubs)
    assert pubmon.main_pid() != main


def test_the_example_config_runs_as_it_is(pubmon: Pubmon) -> None:
    # Its monitor port is 127.0.0.1:9090: a network namespace of its own keeps it off the host's.
    exec_start = f"ExecStart=\nExecStart={VENV_PUBMON} daemon --config {EXAMPLE_CONFIG}\n"
    pubmon.dropin("example", exec_start + "PrivateNetwork=yes\n")
    pubmon.systemctl("start")
    assert pubmon.show("StatusText")["StatusText"] == "3/3 publishers running, 0 fatal"
    pubs = pubmon.publishers()
    assert set(pubs) == {"feed:0", "feed:1", "heartbeat"}
    assert {uid(pid) for pid in pubs.values()} == {pubmon.nobody.pw_uid}
    # The sandbox lets it bind its TCP monitor port (listening: state 0A in /proc/net/tcp).
    tcp = Path(f"/proc/{pubmon.main_pid()}/net/tcp").read_text()
    assert re.search(r"^\s*\d+: 0100007F:2382 00000000:0000 0A ", tcp, re.M), tcp
    pubmon.wait_journal("heartbeat| alive")


# --- the unit file, offline ---------------------------------------------------------------


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart exists here (verify checks that it is executable)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze on this machine")
    text = UNIT.read_text()
    assert "\nExecStart=/usr/local/bin/pubmon daemon " in text
    copy = tmp_path / SERVICE
    copy.write_text(text.replace("ExecStart=/usr/local/bin/pubmon ", f"ExecStart={VENV_PUBMON} "))
    return copy


def test_systemd_analyze_verify_is_silent(runnable_unit: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(runnable_unit)], capture_output=True, text=True
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_security_exposure_does_not_rise(runnable_unit: Path) -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(runnable_unit)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for pubmon\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


def test_the_example_config_is_valid() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pubmon", "check-config", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


# A daemonizing child: its own child calls setsid and forks the grandchild, which prints its
# pid and lives on outside the publisher's process group and session.
ESCAPER = (
    "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        print('escapee', os.getpid(), flush=True)\n"
    "        time.sleep(3600)\n"
    "    os._exit(0)\n"
    "time.sleep(3600)\n"
)


def cgroup_of(pid: int) -> str:
    """The cgroup2 path of `pid` as the host sees it."""
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x[:3] == "0::")
    return line[3:]


def test_publishers_run_in_cgroups_of_their_own_below_the_unit(pubmon: Pubmon) -> None:
    # Delegate=yes: the daemon moves into pubmon.service/supervisor, each publisher gets
    # pubmon.service/pub-<name>; the escapee stays in its publisher's cgroup, so a stop of
    # that publisher (and `systemctl stop`) leaves nothing.
    python = os.path.realpath(REPO / ".venv" / "bin" / "python")
    argv = json.dumps([python, "-c", ESCAPER])  # JSON strings are TOML basic strings
    escaper = f"[publisher.escaper]\ncommand = {argv}\nstart_timeout = 0\nlog = {{ echo = true }}\n"
    pubmon.config.write_text(pubmon.config.read_text() + "\n" + escaper)
    pubmon.systemctl("start")
    assert cgroup_of(pubmon.main_pid()).endswith("/pubmon.service/supervisor")
    pubs = pubmon.publishers()
    assert set(pubs) == {"ticker", "nobody", "worker", "escaper"}
    for name, pid in pubs.items():
        assert cgroup_of(pid).endswith(f"/pubmon.service/pub-{name}"), (name, cgroup_of(pid))
    lines = pubmon.wait_journal("escaper| escapee ")
    line = next(x for x in lines if "escaper| escapee " in x)
    escapee = pubmon.machine.host_pid(int(line.rsplit(" ", 1)[1]))
    assert escapee is not None and cgroup_of(escapee).endswith("/pubmon.service/pub-escaper")
    tree = pubmon.machine.run("systemd-cgls", "--no-pager", "-u", SERVICE).stdout
    assert all(f"pub-{name}" in tree for name in pubs) and "supervisor" in tree, tree
    pubmon.machine.run(str(VENV_PUBMON), "pause", "worker")
    assert "PAUSED" in pubmon.machine.run(str(VENV_PUBMON), "status", "worker").stdout
    pubmon.machine.run(str(VENV_PUBMON), "stop", "escaper")
    assert not alive(escapee) and not alive(pubs["escaper"])
    pubmon.systemctl("stop")
    assert pubmon.show("Result")["Result"] == "success"
    assert not any(alive(p) for p in pubs.values())
    assert not pubmon.machine.unit_pids(SERVICE)

"""A real systemd for tests: PID 1 of private PID/mount/UTS/IPC/cgroup namespaces on this host.

    with NestedSystemd.boot(state_dir, units=[unit_file]) as machine:
        machine.systemctl("start", "pubmon.service")
        machine.show("pubmon.service", "ActiveState", "StatusText")

How it boots (about 0.3 s here):
1. The unit set: STATE/units holds only what `write_unit_set` copies from /lib/systemd/system
   (journald, the shutdown and exit targets) plus stub sysinit/basic targets, a
   `pubmon-test.target` to boot into, and the units under test. No host service starts.
2. A cgroup2 directory of its own, under the test process's cgroup. The launcher moves itself
   there before `unshare`, so the new cgroup namespace is rooted at it and the nested manager
   owns that subtree; the host's hierarchy outside it is never touched.
3. `setpriv --pdeathsig KILL unshare --pid --fork --kill-child ...`: if pytest dies, unshare
   dies, and the kernel kills the namespace's init and with it every process inside.
4. ns_init.py, the namespace's first PID 1, mounts what systemd needs privately (see its
   docstring) and execs /lib/systemd/systemd with `container=` set.
Control goes through `nsenter` into its namespaces; as root, systemctl talks to
/run/systemd/private, so no D-Bus is needed. Its processes are plain host processes too:
`unit_pids()` reads a unit's cgroup.procs from the host side, in host pids.

Teardown (`shutdown()`, about 2 s, mostly the kernel tearing down the PID namespace):
`systemctl exit` stops every unit and ends the manager; a SIGKILL of init is the fallback.
Then the cgroup subtree is removed, and whatever was left behind (processes, cgroups, mounts)
is cleaned up and reported as an error. Nothing is written to the host's /run, /dev, /tmp,
/var/tmp or /var/log: the namespace has its own (ns_init.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

SYSTEMD = Path("/lib/systemd/systemd")
SYSTEM_UNITS = Path("/lib/systemd/system")
NS_INIT = Path(__file__).with_name("ns_init.py")
TARGET = "pubmon-test.target"

# Copied from the host: the journal, and what `systemctl exit` / poweroff go through.
_HOST_UNITS = (
    "sockets.target", "paths.target", "timers.target", "slices.target",
    "network-pre.target", "network.target", "network-online.target",
    "shutdown.target", "final.target", "umount.target", "exit.target", "halt.target",
    "poweroff.target", "reboot.target", "systemd-exit.service", "systemd-halt.service",
    "systemd-poweroff.service", "systemd-reboot.service", "systemd-journald.service",
    "systemd-journald.socket", "systemd-journald-dev-log.socket",
)  # fmt: skip
_STUB_UNITS = {
    "sysinit.target": "[Unit]\nDescription=sysinit (test stub)\nWants=systemd-journald.service\n",
    "basic.target": (
        "[Unit]\nDescription=basic (test stub)\nRequires=sysinit.target sockets.target\n"
        "After=sysinit.target sockets.target\n"
    ),
    TARGET: (
        "[Unit]\nDescription=pubmon test boot\nRequires=basic.target\nAfter=basic.target\n"
        "AllowIsolate=yes\n"
    ),
}
_NSENTER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

T = TypeVar("T")


class HarnessError(Exception):
    """The nested systemd did not boot, a command in it failed, or teardown left something."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, *, every: float = 0.02) -> T:
    """Poll `probe` (external state: there is no event to wait on) until it returns a value
    other than None/False; raise TimeoutError naming `what` if none comes within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(every)


def cannot_boot_reason() -> str | None:
    """Why this machine cannot boot a nested systemd, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mounts, cgroups and namespaces)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no {SYSTEMD}"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"no `{tool}` (util-linux)"
    try:
        parent = _cgroup_parent()
    except HarnessError as exc:
        return str(exc)
    probe = parent / f"pubmon-test-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cgroup2 at {parent} is not writable: {exc}"
    try:
        subprocess.run(
            ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup", "true"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except subprocess.CalledProcessError as exc:
        return f"cannot create namespaces: {exc.stderr.decode(errors='replace').strip()}"
    return None


def _cgroup_parent() -> Path:
    """The host directory of this process's own cgroup2 group: the nested cgroup goes below."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            mount = Path(fields[4])
            break
    if mount is None:
        raise HarnessError("no cgroup2 hierarchy mounted")
    own = next(
        (line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
         if line.startswith("0::")),
        None,
    )  # fmt: skip
    if own is None:
        raise HarnessError("this process is in no cgroup2 group")
    return mount / own.lstrip("/")


def write_unit_set(units_dir: Path, units: Iterable[Path]) -> None:
    """The only units the nested manager will see: a minimal boot, plus `units`."""
    units_dir.mkdir(parents=True)
    for name in _HOST_UNITS:
        shutil.copy(SYSTEM_UNITS / name, units_dir / name)
    for name, text in _STUB_UNITS.items():
        (units_dir / name).write_text(text)
    (units_dir / "default.target").symlink_to(TARGET)
    wants = units_dir / "sockets.target.wants"
    wants.mkdir()
    for sock in ("systemd-journald.socket", "systemd-journald-dev-log.socket"):
        (wants / sock).symlink_to(f"../{sock}")
    for unit in units:
        shutil.copy(unit, units_dir / unit.name)


def _remove_cgroup_tree(top: Path) -> bool:
    """rmdir `top` and its sub-groups, deepest first; False while a process is still in one."""
    groups = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    try:
        for group in [*groups, top]:
            group.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _remove_stale_cgroups(parent: Path) -> None:
    # A test run killed outright (SIGKILL) takes its namespace with it (pdeathsig), but
    # leaves the empty cgroup directories behind: remove those of runs that are gone.
    for group in parent.glob("pubmon-test-*-*"):
        owner = group.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _remove_cgroup_tree(group)


def _under_tmp(paths: Iterable[Path]) -> list[str]:
    """The real paths among `paths` that lie under /tmp, without those inside another."""
    tmp = Path("/tmp").resolve()
    real = {Path(os.path.realpath(p)) for p in paths}
    real = {p for p in real if tmp in p.parents}
    return sorted(str(p) for p in real if not any(q in p.parents for q in real))


class NestedSystemd:
    """One booted manager. Make it with `boot()`; `shutdown()` (or leaving `with`) ends it."""

    def __init__(self, state: Path, cgroup: Path, launcher: subprocess.Popen[bytes]) -> None:
        self.state = state
        self.units = state / "units"
        self.cgroup = cgroup  # host path of the namespace's root cgroup
        self.launcher = launcher  # `unshare`, a child of this process, outside the namespace
        self.init_pid = 0  # host pid of the namespace's PID 1
        self.unit_path = str(self.units)  # SYSTEMD_UNIT_PATH of the manager and of systemctl

    # --- boot and teardown --------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        state: Path,
        units: Iterable[Path] = (),
        *,
        share: Iterable[Path] = (),
        scratch: Iterable[str] = (),
        timeout: float = 20,
    ) -> NestedSystemd:
        """Boot a manager whose unit set is the minimal boot plus `units`, keeping its files in
        `state`. The namespace gets a /tmp of its own: host paths under /tmp that it must see
        (besides `state`) go in `share`. `scratch` paths (/etc, /opt, ...) become writable in
        the namespace only (ns_init.py); with /etc, /etc/systemd/system is in the unit path."""
        state.mkdir(parents=True, exist_ok=True)
        write_unit_set(state / "units", units)
        scratch = list(scratch)
        if scratch:
            (state / "scratch").write_text("\n".join(scratch) + "\n")
        (state / "empty").mkdir()
        (state / "console.log").touch()
        parent = _cgroup_parent()
        _remove_stale_cgroups(parent)
        cgroup = parent / f"pubmon-test-{os.getpid()}-{time.monotonic_ns()}"
        cgroup.mkdir()
        argv = [
            "/bin/sh", "-c", 'echo $$ > "$1" || exit 1; shift; exec "$@"', "sh",
            str(cgroup / "cgroup.procs"),
            "setpriv", "--pdeathsig", "KILL",
            "unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts", "--ipc",
            "--cgroup", "--mount-proc", "--propagation", "private",
            sys.executable, str(NS_INIT), str(state), *_under_tmp([state, *share]),
        ]  # fmt: skip
        with open(state / "unshare.log", "wb") as log:
            launcher = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        machine = cls(state, cgroup, launcher)
        if "/etc" in scratch:
            machine.unit_path = f"/etc/systemd/system:{machine.units}"
        try:
            machine.init_pid = wait_for("the namespace's init", machine._find_init, timeout)
            wait_for("systemd reaching 'running'", machine._booted, timeout, every=0.05)
        except BaseException:
            machine.shutdown(check=False)
            raise
        return machine

    def _find_init(self) -> int | None:
        if self.launcher.poll() is not None:
            raise HarnessError(f"unshare exited {self.launcher.returncode}: {self._logs()}")
        children = Path(f"/proc/{self.launcher.pid}/task/{self.launcher.pid}/children")
        try:
            pids = children.read_text().split()
        except FileNotFoundError:
            return None
        return int(pids[0]) if pids else None

    def _booted(self) -> bool:
        if self.launcher.poll() is not None:
            raise HarnessError(f"the nested systemd exited: {self._logs()}")
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        if state == "degraded":
            failed = self.systemctl("list-units", "--failed", "--no-legend", check=False).stdout
            raise HarnessError(f"the nested systemd booted degraded; failed units:\n{failed}")
        return state == "running"

    def _logs(self) -> str:
        parts = []
        for name in ("unshare.log", "console.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.state / name).read_text()[-4000:]}")
        return "\n".join(parts)

    def __enter__(self) -> NestedSystemd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(check=exc is None)

    def shutdown(self, *, timeout: float = 15, check: bool = True) -> None:
        """End the manager and everything in it; remove its cgroups. With `check`, raise
        HarnessError if anything had to be cleaned up by force (it is cleaned up either way)."""
        problems: list[str] = []
        if self.launcher.poll() is None and self.init_pid:
            # Container semantics: stop every unit, then the manager exits and the kernel
            # kills what is left in the namespace.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run("systemctl", "--no-block", "exit", check=False, timeout=5)
            try:
                self.launcher.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"systemd did not exit within {timeout} s; killed it")
        if self.launcher.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid or self.launcher.pid, signal.SIGKILL)
            try:
                self.launcher.wait(10)
            except subprocess.TimeoutExpired:
                self.launcher.kill()
                self.launcher.wait()
        if left := self.pids():
            problems.append(f"processes outlived the namespace: {sorted(left)}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        try:
            # rmdir fails while a process is still leaving a group: poll until it can.
            wait_for("the test cgroups to be removable", self._remove_cgroups, 5)
        except TimeoutError:
            problems.append(f"cgroup {self.cgroup} could not be removed")
        mounts = [
            line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(self.state) in line
        ]  # fmt: skip
        if mounts:
            problems.append(f"mounts left on the host: {mounts}")
        if problems and check:
            raise HarnessError("; ".join(problems))

    def _remove_cgroups(self) -> bool:
        return not self.cgroup.exists() or _remove_cgroup_tree(self.cgroup)

    # --- driving it ---------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespaces (as root, in the nested manager's view), with
        `env` added to its environment."""
        cmd = ["nsenter", "-t", str(self.init_pid), "-m", "-p", "-u", "-i", "-C", "--", *argv]
        env = {**_NSENTER_ENV, "SYSTEMD_UNIT_PATH": self.unit_path, **(env or {})}
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} exited {done.returncode}\n"
                f"stdout: {done.stdout.strip()}\nstderr: {done.stderr.strip()}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, *, invocation: str | None = None) -> list[str]:
        """The unit's journal as message text: its processes' output and systemd's lines about
        it. With `invocation` (the InvocationID property), only that run of the unit."""
        if invocation:
            match = [f"_SYSTEMD_INVOCATION_ID={invocation}", "+", f"INVOCATION_ID={invocation}"]
        else:
            match = ["-u", unit]
        out = self.run("journalctl", "--no-pager", "-q", "-o", "cat", *match).stdout
        return out.splitlines()

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def enable(self, unit: str) -> None:
        """What `systemctl enable` means for tests: the boot target wants `unit`. That keeps it
        loaded while inactive, so its Result= and exit status stay readable after a stop, as on
        a host where it is enabled (an unreferenced inactive unit is unloaded at once). Written
        into the test unit set, never the host's /etc; it does not start the unit."""
        wants = self.units / f"{TARGET}.wants"
        wants.mkdir(exist_ok=True)
        (wants / unit).symlink_to(f"../{unit}")
        self.daemon_reload()

    def write_dropin(self, unit: str, name: str, text: str) -> Path:
        """STATE/units/UNIT.d/NAME.conf; takes effect at the next daemon_reload()."""
        folder = self.units / f"{unit}.d"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.conf"
        path.write_text(text)
        return path

    def remove_dropin(self, unit: str, name: str) -> bool:
        path = self.units / f"{unit}.d" / f"{name}.conf"
        if not path.exists():
            return False
        path.unlink()
        return True

    # --- its processes, seen from the host -----------------------------------------------------

    def pids(self) -> set[int]:
        """Every live process of the namespace (and its launcher), in host pids."""
        found = set(self._cgroup_procs(self.cgroup))
        if self.launcher.poll() is None:
            found.add(self.launcher.pid)
        return found

    def unit_pids(self, unit: str) -> set[int]:
        """Host pids of the processes in `unit`'s cgroup (and below it)."""
        group = self.show(unit, "ControlGroup")["ControlGroup"]
        return set(self._cgroup_procs(self.cgroup / group.lstrip("/"))) if group else set()

    @staticmethod
    def _cgroup_procs(top: Path) -> Iterator[int]:
        if not top.exists():
            return
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                yield from (int(p) for p in procs.read_text().split())

    def host_pid(self, ns_pid: int) -> int | None:
        """The host pid of the namespace's `ns_pid`, if that process exists."""
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:"):
                        ids = line.split()[1:]
                        if len(ids) > 1 and int(ids[-1]) == ns_pid:
                            return pid
        return None

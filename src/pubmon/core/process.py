"""Starting children safely, signalling them by pidfd and group, and reaping orphans.

Every publisher is started by `spawn()`:
- in its own process group (`process_group=0`), so a stop reaches its whole tree;
- with PR_SET_PDEATHSIG = SIGKILL armed, so it dies with the daemon even after `kill -9`, and a
  check, after arming, that the daemon did not die first (then nobody would send the signal).
  Usually by an exec wrapper, `setpriv --pdeathsig KILL -- sh -c CHECK`, which keeps CPython's
  vfork fast path (a real fork costs ~4 ms more per spawn and grows with the daemon's RSS);
  else (another user, an executable we cannot vouch for, no setpriv) by a minimal preexec hook
  (`_make_arm`), which also does the switch of user itself and arms the signal after it, so the
  switch cannot clear it;
- with the OOM score 0 when the daemon's is lower (the unit's OOMScoreAdjust=-500 protects the
  daemon, not its publishers: a child would inherit it);
- one fork per loop pass when many start at once (`fork_turn()`): signals, RPC and watchdog
  pings are served between forks;
- stdin from /dev/null, stdout and stderr as pipes read by an `OutputLog`;
- in its `directory`, entered *after* the switch to its `user` (in the preexec hook, as that
  user): a publisher cannot start in a directory its user could not enter, and the daemon needs
  no CAP_DAC_READ_SEARCH for it;
- with its own environment, not the daemon's (which may hold secrets): see `child_environment`.
  Whatever the config says, it never carries NOTIFY_SOCKET, WATCHDOG_* or LISTEN_*.
- in its cgroup, when it has one (pubmon.core.cgroup), before it execs the command: the wrapper's
  `sh` writes `0` (itself) to the group's cgroup.procs; the preexec hook does the same as root,
  before any switch of user (CLONE_INTO_CGROUP is out of reach of subprocess). Measured here
  (spawn and exit of `true`, 300 each, interleaved, load average 7 on 2 cores): median 5.0 ms
  without, 5.4 ms with the join (p90 12 vs 22 ms: moving a task takes a cgroup-wide lock);
- with the rlimits of `[publisher.X.limits]` (nofile, core, nproc, as), soft = hard, set by the
  preexec hook: a publisher with rlimits always takes that path (prlimit(1) forks, which the
  wrapper's parent check refuses, and `ulimit` flags and units differ between shells). A hard
  limit above the daemon's own needs CAP_SYS_RESOURCE: without it, a permanent spawn error.

Exit is learnt from asyncio's child watcher (the pidfd watcher on 3.11, no thread per child) via
`SubprocessProtocol.process_exited`, not from `Process.wait()`, which also waits for every holder
of the pipes (a grandchild can keep them open for ever).

The daemon is a child subreaper: orphaned grandchildren are re-parented to it. `OrphanReaper`
(in `reaper`) reaps those, and only those.
"""

from __future__ import annotations

__all__ = [
    "Child",
    "OrphanReaper",
    "SpawnRequest",
    "become_subreaper",
    "describe_exit",
    "fork_turn",
    "install_child_watcher",
    "spawn",
]

import asyncio
import ctypes
import errno
import fcntl
import functools
import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from pubmon.core.reaper import OrphanReaper
from pubmon.errors import SpawnError

logger = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20

# Variables that belong to the daemon's own supervisor (systemd) and must never reach a child:
# a child that inherits NOTIFY_SOCKET could tell systemd that *it* is ready.
_SCRUBBED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
_SCRUBBED_PREFIXES = ("LISTEN_FDNAMES",)


class Sink(Protocol):
    def feed(self, data: bytes) -> None: ...
    def eof(self) -> None: ...


def become_subreaper() -> None:
    """Make orphaned descendants re-parent to this process instead of PID 1."""
    if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def install_child_watcher() -> None:
    """Use asyncio's pidfd child watcher for the running loop (3.11 defaults to a thread per child).

    Idempotent per loop. On 3.12+ asyncio picks the pidfd watcher by itself.
    """
    loop = asyncio.get_running_loop()
    if not hasattr(asyncio, "PidfdChildWatcher"):  # pragma: no cover - 3.14 removed the API
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        current = policy.get_child_watcher()
        if (
            isinstance(current, asyncio.PidfdChildWatcher)
            and getattr(current, "_loop", None) is loop
        ):
            return
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(loop)
        policy.set_child_watcher(watcher)


# What a failed preexec hook was doing (see _reported).
_STEP_SWITCH, _STEP_CHDIR, _STEP_CGROUP, _STEP_RLIMIT = 1, 2, 3, 4


def _make_arm(
    parent: int,
    *,
    creds: tuple[int, int, list[int]] | None = None,
    directory: str | None = None,
    oom_reset: bool = False,
    report: int | None = None,
    cgroup_procs: str | None = None,
    rlimits: tuple[tuple[int, int], ...] = (),
) -> Callable[[], None]:
    """The preexec hook: reset the OOM score, join the cgroup, set the rlimits, switch to
    `creds`, arm the parent-death signal, enter `directory`, in that order.

    The score first: raising it needs no privilege, but after a switch of user /proc/self is
    root's and no longer ours to write. The switch is ours, not CPython's (`user=` would run
    before any hook, and after its `cwd=`, which would chdir as root). The signal after the
    switch, which clears it. The directory last, as the user.

    Runs in the forked child before exec: no allocation-heavy work, no imports, no logging,
    only names bound here in the parent (see asyncio-gotchas §1.4, §2.1). A failure writes
    "<step> <errno>" to `report` and raises, which makes CPython abort the spawn
    (SubprocessError in the parent, which then reads what failed).
    """
    prctl, getppid, exit_, chdir, write = _prctl, os.getppid, os._exit, os.chdir, os.write
    open_, close = os.open, os.close
    setgroups, setregid, setreuid = os.setgroups, os.setregid, os.setreuid
    setrlimit = resource.setrlimit

    def arm() -> None:
        step = 0
        try:
            if oom_reset:
                try:
                    fd = open_("/proc/self/oom_score_adj", os.O_WRONLY)
                    write(fd, b"0")
                    close(fd)
                except OSError:
                    pass  # a sandbox without /proc: the daemon's score stays
            if cgroup_procs is not None:  # as root: after the switch it may not write there
                step = _STEP_CGROUP
                fd = open_(cgroup_procs, os.O_WRONLY)
                write(fd, b"0")
                close(fd)
            step = _STEP_RLIMIT
            for res, value in rlimits:
                setrlimit(res, (value, value))
            if creds is not None:
                step = _STEP_SWITCH
                setgroups(creds[2])
                setregid(creds[1], creds[1])
                setreuid(creds[0], creds[0])
            if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                exit_(127)
            if getppid() != parent:  # the daemon died before prctl ran: nobody sends the signal
                exit_(127)
            if directory is not None:
                step = _STEP_CHDIR
                chdir(directory)
        except OSError as exc:
            if report is not None:
                write(report, b"%d %d" % (step, exc.errno or 0))
            raise

    return arm


@functools.cache
def _oom_reset_wanted() -> bool:
    """True when the daemon's OOM score is below 0 (the unit's OOMScoreAdjust=-500): children
    inherit it, and must not, so that the kernel kills a publisher before the daemon. Read
    once: systemd sets it before the daemon starts."""
    try:
        with open("/proc/self/oom_score_adj", "rb") as f:
            return int(f.read()) < 0
    except (OSError, ValueError):
        return False


_SETPRIV = shutil.which("setpriv")
_SH = "/bin/sh"
# pubmon's own wrapper (src/pubmon/_arm.c), built at install when a C compiler was there: the
# same arming, check, OOM reset and cgroup join in one exec of a static binary instead of
# setpriv + sh (bench_spawn.py: 3.15 ms a spawn of `true` against 6.19). Else setpriv and sh.
_BUILT_ARM = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_arm")
_ARM: str | None = _BUILT_ARM if os.access(_BUILT_ARM, os.X_OK) else None
# Run as `sh -c _CHECK <daemon pid> argv...` once setpriv armed the signal: a daemon that died
# before the prctl would never send it, so the child must not go on. _CHECK_OOM also resets the
# OOM score inherited from the daemon (see _oom_reset_wanted).
_CHECK = 'test "$PPID" = "$0" || exit 111; exec "$@"'
_CHECK_OOM = 'test "$PPID" = "$0" || exit 111; echo 0 >/proc/self/oom_score_adj; exec "$@"'
# With a cgroup (pubmon.core.cgroup), sh moves itself ("0" = the writer) into it before the exec, so
# the command and all it starts are born there: `sh -c _JOIN <daemon pid> <cgroup.procs> argv`.
_JOIN = 'echo 0 >"$1" || exit 112; shift; '
_EXIT_JOIN_FAILED = 112
# rlimits are set by the preexec hook (setrlimit before exec): the wrapper has no portable way
# (prlimit(1) forks, so the PPID check fails; sh's ulimit flags and units differ by shell).
_RLIMIT_KEYS = {
    resource.RLIMIT_NOFILE: "nofile",
    resource.RLIMIT_CORE: "core",
    resource.RLIMIT_NPROC: "nproc",
    resource.RLIMIT_AS: "as",
}
_EXEC_MAGIC = (b"\x7fELF", b"#!")


def wrapped(
    argv: tuple[str, ...],
    parent: int,
    *,
    oom_reset: bool = False,
    cgroup_procs: str | None = None,
) -> list[str]:
    """`argv` behind the parent-death-signal wrapper, for a child of `parent`; joining the
    cgroup whose `cgroup.procs` is given before the exec. `_arm` when it was built, else
    setpriv and sh; both exit 111 when the parent died before the signal was armed, and 112
    when the cgroup cannot be joined."""
    if _ARM is not None:
        return [_ARM, str(parent), "1" if oom_reset else "0", cgroup_procs or "", *argv]
    assert _SETPRIV is not None
    check = _CHECK_OOM if oom_reset else _CHECK
    if cgroup_procs is None:
        return [_SETPRIV, "--pdeathsig", "KILL", "--", _SH, "-c", check, str(parent), *argv]
    check = check.replace("exec ", _JOIN + "exec ", 1)
    return [_SETPRIV, "--pdeathsig", "KILL", "--", _SH, "-c", check, str(parent), cgroup_procs,
            *argv]  # fmt: skip


def _rlim(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def rlimit_problem(rlimits: tuple[tuple[int, int], ...]) -> str | None:
    """Why these rlimits cannot be set in a child of this process, or None: a hard limit
    above the daemon's own needs CAP_SYS_RESOURCE (the unit does not grant it)."""
    if not rlimits or _has_cap_sys_resource():
        return None
    for res, value in rlimits:
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            return (
                f"limits.{_RLIMIT_KEYS[res]} = {_rlim(value)} is above pubmon's own "
                f"hard limit {hard}, and pubmon lacks CAP_SYS_RESOURCE to raise it"
            )
    return None


def _has_cap_sys_resource() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> 24 & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


_wrapper_works: bool | None = None  # unknown until the first spawn tries it


def _wrapper_usable() -> bool:
    """Whether the wrapper can run here: a sandbox may forbid what setpriv does (systemd's
    SystemCallFilter=~@privileged denies its capset), a noexec mount may hold `_arm`. Tried
    once, with a blocking run of a few milliseconds (no loop callback can run meanwhile, so no
    reaper can take its status): `_arm` first, then setpriv and sh."""
    global _wrapper_works, _ARM
    if _wrapper_works is None:
        if _ARM is not None and (why := _try_wrapper()) is not None:
            logger.warning(
                "%s cannot arm the parent-death signal here (%s); trying setpriv", _ARM, why
            )
            _ARM = None
        if _ARM is not None:
            _wrapper_works = True
        elif _SETPRIV is None:
            _wrapper_works = False
        elif (why := _try_wrapper()) is not None:
            logger.warning(
                "%s cannot arm the parent-death signal here (%s); publishers are spawned "
                "through a preexec hook instead (a real fork: a few ms more per spawn)",
                _SETPRIV,
                why,
            )
            _wrapper_works = False
        else:
            _wrapper_works = True
    return _wrapper_works


def _try_wrapper() -> str | None:
    """Run `wrapped(sh -c "exit 0")` once: None when it works, else why not."""
    try:
        done = subprocess.run(
            wrapped((_SH, "-c", "exit 0"), os.getpid()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    return done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"


def _find(argv0: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """The file execvp would run for `argv0`, or None when there is none."""
    # What os.get_exec_path(env) gives, without its warnings.catch_warnings (60 µs a spawn).
    dirs = [""] if "/" in argv0 else env.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        path = os.path.join(cwd or "", d, argv0)
        if os.path.exists(path):
            return path
    return None


def _wrapper_can_run(path: str | None, cwd: str | None) -> bool:
    """True when `path` surely execs: the wrapper's `exec` then fails no differently than ours.

    Anything else (missing, not executable, a format we do not know) takes the preexec path,
    where the failure comes back as the exact OSError (a permanent spawn error: FATAL).
    """
    if path is None or (cwd is not None and not os.path.isdir(cwd)):
        return False
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
            return False  # execvp would stop with EACCES here
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_EXEC_MAGIC)


def interpreter_problem(path: str) -> str | None:
    """Why the `#!` interpreter of the script at `path` cannot run, or None (no script, or fine).

    execve fails with ENOENT for a missing interpreter, but behind the wrapper's `sh` that is
    exit 127 after the fork, which looks like a crash and would loop until the crash window
    gives up: found here, it is a permanent spawn error, FATAL at once with the reason.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None  # not ours to judge: exec reports it
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    if not words:
        return f"{path}: empty #! line"
    interp = os.fsdecode(words[0])
    try:
        st = os.stat(interp)
    except OSError as exc:
        return f"{path}: its interpreter {interp} cannot be used: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode) or not os.access(interp, os.X_OK):
        return f"{path}: its interpreter {interp} is not an executable file"
    return None


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def fork_turn() -> AsyncIterator[None]:
    """Hold the loop's one turn to fork. Alone, it is taken at once; when many spawns are due
    (the first round of 1000 publishers) they fork one per loop pass, in order, instead of all
    in one pass that would hold up signals, RPC and watchdog pings for seconds."""
    loop = asyncio.get_running_loop()
    lock = _turns.get(loop)
    if lock is None:
        lock = _turns[loop] = asyncio.Lock()
    async with lock:
        yield


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    name: str
    argv: tuple[str, ...]
    directory: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    cgroup_procs: str | None = None  # join this cgroup (its cgroup.procs) before the exec
    rlimits: tuple[tuple[int, int], ...] = ()  # (RLIMIT_*, soft = hard; RLIM_INFINITY)


# systemd's default PATH for services, used when the daemon has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LOCALE = ("LANG", "LANGUAGE", "TZ")  # and every LC_*


def _scrubbed(name: str) -> bool:
    return name in _SCRUBBED or name.startswith(_SCRUBBED_PREFIXES)


def child_environment(
    req: SpawnRequest, base: Mapping[str, str] | None = None
) -> tuple[dict[str, str], tuple[int, int, list[int]] | None]:
    """The child's environment, and (uid, gid, groups) when it runs as another user.

    The daemon's own environment (`base`, default os.environ) is *not* passed on: it may hold
    secrets, and a publisher running as nobody has no business reading root's. A child gets:
    - PATH: the daemon's (so that a command found at load is found at exec), else DEFAULT_PATH;
    - LANG, LANGUAGE, TZ and LC_* when the daemon has them (how text and time are shown);
    - HOME, USER, LOGNAME and SHELL of the user it runs as (the daemon's own without `user`);
    - PUBMON_PUBLISHER: its instance name;
    - then `req.environment`, which holds what the config asked for: the names it inherits from
      the daemon (`inherit_environment`) overlaid with its `environment` table. Those may
      override anything above.
    NOTIFY_SOCKET, WATCHDOG_*, LISTEN_* are removed last, whatever the config says.
    """
    base = os.environ if base is None else base
    env = {"PATH": base.get("PATH") or DEFAULT_PATH}
    for name in base:  # names only: .items() of os.environ decodes every value (12 µs a spawn)
        if name in _LOCALE or name.startswith("LC_"):
            env[name] = base[name]
    creds = None
    pw: pwd.struct_passwd | None
    if req.user is not None:
        try:
            pw = pwd.getpwnam(req.user)
        except KeyError:
            raise SpawnError(
                req.name, f"user {req.user!r} does not exist", permanent=True
            ) from None
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        creds = (pw.pw_uid, pw.pw_gid, groups)
    else:
        pw = _own_account()
    if pw is not None:
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell)
    env["PUBMON_PUBLISHER"] = req.name
    env.update(req.environment)
    return {k: v for k, v in env.items() if not _scrubbed(k)}, creds


_own: list[pwd.struct_passwd | None] = []  # looked up once: the daemon's uid does not change


def _own_account() -> pwd.struct_passwd | None:
    if not _own:
        try:
            _own.append(pwd.getpwuid(os.geteuid()))
        except KeyError:
            _own.append(None)
    return _own[0]


class _ChildProtocol(asyncio.SubprocessProtocol):
    """Feeds both pipes to their sinks as chunks arrive; reports exit and end of both pipes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sinks: dict[int, Sink]) -> None:
        self._sinks = sinks
        self._open = set(sinks)
        self.exited: asyncio.Future[int] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        # logio: a sink whose log file writer falls behind pauses the pipe it reads.
        for fd, sink in self._sinks.items():
            pipe = transport.get_pipe_transport(fd)
            attach = getattr(sink, "attach_pipe", None)
            if attach is not None and isinstance(pipe, asyncio.ReadTransport):
                attach(pipe)

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        assert isinstance(data, bytes)
        self._sinks[fd].feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self._open:
            self._open.discard(fd)
            self._sinks[fd].eof()
        if not self._open and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        assert self.transport is not None
        code = self.transport.get_returncode()
        assert code is not None
        if not self.exited.done():
            self.exited.set_result(code)


class Child:
    """One running child process: its pid, group, pidfd and the futures that report its end."""

    def __init__(self, name: str, transport: asyncio.SubprocessTransport, proto: _ChildProtocol):
        self.name = name
        self.pid: int = transport.get_pid()
        self.pgid = self.pid  # process_group=0: the child leads a group named after its pid
        self._transport = transport
        self._proto = proto
        self.started = time.monotonic()
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already exited and reaped: signals go nowhere
            self._pidfd = None

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code (negative = killed by that signal) once reaped."""
        return self._proto.exited

    @property
    def returncode(self) -> int | None:
        return self._proto.exited.result() if self._proto.exited.done() else None

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's process group, which holds the leader too.

        Once: a second SIGTERM means "force" to many programs. Only a leader that left its group
        (setsid) is signalled directly, by pidfd, which can never hit a recycled pid.
        """
        if self._pidfd is not None and self.returncode is None:
            try:
                left = os.getpgid(self.pid) != self.pgid  # not reaped yet: the pid is still ours
            except ProcessLookupError:
                left = False
            if left:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:
                    pass
                except PermissionError as exc:  # no CAP_KILL over another user's process
                    logger.warning("cannot signal %s pid %d: %s", self.name, self.pid, exc)
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass  # the group is empty
        except PermissionError as exc:  # no CAP_KILL over another user's processes
            logger.warning("cannot signal %s group %d: %s", self.name, self.pgid, exc)

    async def drain(self, timeout: float) -> bool:
        """Wait until both pipes reach EOF (every holder is gone). False if `timeout` passed."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._proto.pipes_closed)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Release the transport and pidfd. Pipes still open are closed (their sinks get EOF)."""
        try:
            # Closes the pipes, then SIGKILLs a child that still runs: that may be refused
            # (no CAP_KILL over another user's process); the caller has already said so.
            self._transport.close()
        except PermissionError:
            pass
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __repr__(self) -> str:
        return f"<Child {self.name!r} pid={self.pid} returncode={self.returncode}>"


def _enlarge_pipes(transport: asyncio.SubprocessTransport) -> None:
    # 64 KiB pipes halve the throughput of a chatty child; 1 MiB is the unprivileged maximum.
    for fd in (1, 2):
        pipe = transport.get_pipe_transport(fd)
        if pipe is None:
            continue
        fileobj = pipe.get_extra_info("pipe")
        try:
            fcntl.fcntl(fileobj.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
        except (OSError, ValueError):
            pass  # at the limit, or already at EOF and closed (a child that exited at once)


_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EPERM}


async def spawn(
    req: SpawnRequest,
    stdout: Sink,
    stderr: Sink,
    *,
    reaper: OrphanReaper | None = None,
) -> Child:
    """Start `req` and return once its pid is known. Raises SpawnError (permanent or not)."""
    loop = asyncio.get_running_loop()
    env, creds = child_environment(req)
    proto = _ChildProtocol(loop, {1: stdout, 2: stderr})
    path = _find(req.argv[0], env, req.directory)
    problem = path and interpreter_problem(path)
    if problem:
        raise SpawnError(req.name, problem, permanent=True)
    oom_reset = _oom_reset_wanted()
    limits_problem = rlimit_problem(req.rlimits)
    if limits_problem:
        raise SpawnError(req.name, limits_problem, permanent=True)
    # With another user, the preexec hook switches and then enters the directory as that user.
    cwd, report = req.directory, None
    fast = creds is None and not req.rlimits and _wrapper_usable()
    if fast and _wrapper_can_run(path, req.directory):
        argv = wrapped(req.argv, os.getpid(), oom_reset=oom_reset, cgroup_procs=req.cgroup_procs)
        arm = None
    else:
        report = os.pipe()  # close-on-exec: the child's end is gone once it execs
        argv = list(req.argv)
        arm = _make_arm(
            os.getpid(),
            creds=creds,
            directory=cwd if creds is not None else None,
            oom_reset=oom_reset,
            report=report[1],
            cgroup_procs=req.cgroup_procs,
            rlimits=req.rlimits,
        )
        if creds is not None:
            cwd = None
    if reaper is not None:
        reaper.spawning += 1
    try:
        try:
            transport, _ = await loop.subprocess_exec(
                lambda: proto,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                process_group=0,
                preexec_fn=arm,
                cwd=cwd,
                env=env,
            )
        except OSError as exc:
            what = exc.strerror or str(exc)
            target = exc.filename or req.argv[0]
            raise SpawnError(
                req.name, f"{target}: {what}", permanent=exc.errno in _PERMANENT_ERRNOS
            ) from exc
        except Exception as exc:  # SubprocessError from the preexec hook, KeyError, ...
            step, code = _reported(report)
            if code:
                what = os.strerror(code)
                if step == _STEP_SWITCH and creds is not None:
                    why = _switch_failed(req.user, creds[0], what)
                elif step == _STEP_CHDIR:
                    why = f"cannot enter directory {req.directory} as user {req.user}: {what}"
                elif step == _STEP_CGROUP:
                    why = f"cannot join its cgroup ({req.cgroup_procs}): {what}"
                else:
                    why = f"cannot set its rlimits: {what}"
                raise SpawnError(req.name, why, permanent=code in _PERMANENT_ERRNOS) from exc
            raise SpawnError(req.name, f"{type(exc).__name__}: {exc}", permanent=False) from exc
        finally:
            if report is not None:
                os.close(report[0])
                os.close(report[1])
        assert isinstance(transport, asyncio.SubprocessTransport)
        _enlarge_pipes(transport)
        child = Child(req.name, transport, proto)
        if reaper is not None:
            # Owned before the deferred sweep below runs: a child that already exited is a
            # zombie that asyncio, not the reaper, must collect (else its status reads 255).
            reaper.track(child)
    finally:
        if reaper is not None:
            reaper.spawn_done()
    return child


def _switch_failed(user: str | None, uid: int, what: str) -> str:
    why = f"cannot switch to user {user} (uid {uid}): {what}"
    if os.geteuid() != 0:
        why += (
            f"; the daemon runs as uid {os.geteuid()}, and only root (or CAP_SETUID and "
            "CAP_SETGID) can run a publisher as another user: remove `user` or run the daemon "
            "as root"
        )
    return why


def _reported(report: tuple[int, int] | None) -> tuple[int, int]:
    """(step, errno) that a failed preexec hook wrote (it is done by now), or (0, 0)."""
    if report is None:
        return 0, 0
    os.set_blocking(report[0], False)
    try:
        step, _, code = os.read(report[0], 32).partition(b" ")
    except BlockingIOError:
        return 0, 0
    return (int(step), int(code)) if step.isdigit() and code.isdigit() else (0, 0)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"

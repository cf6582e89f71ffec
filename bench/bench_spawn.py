"""What arming PR_SET_PDEATHSIG costs per spawn, candidate by candidate: bench/bench_spawn.py

    .venv/bin/python bench/bench_spawn.py [--spawns 100] [--rounds 5]

Each candidate starts `true` `--spawns` times, one after the other, from an asyncio loop the way
pubmon does (`loop.subprocess_exec`, `process_group=0`, stdin from /dev/null, output to pipes
read to EOF) and waits for its exit. Rounds run the candidates interleaved (A, B, C, A, B, C...)
so that the machine's load falls on all alike; the table has, per spawn, the median and min-max
over rounds of:
- wall: from the call to the exit of `true` (the spawn, every exec of the chain, the exit);
- loop: how long `subprocess_exec` held the loop (CPython's fork_exec: a vfork until the child
  execs, or a real fork when there is a preexec hook);
- CPU: the parent's own CPU plus the reaped children's (RUSAGE_CHILDREN), per spawn.

Candidates (pubmon picks "wrapper" when it can, else "preexec"):
- bare: no parent-death signal at all (the floor; its children outlive a `kill -9`);
- wrapper: `setpriv --pdeathsig KILL -- sh -c 'test "$PPID" = "$0" || exit 111; exec "$@"'`
  (two extra execs: setpriv, then sh, which checks the daemon did not die before the prctl);
- setpriv-only: `setpriv --pdeathsig KILL -- true`: one extra exec and no race check, so
  *not* safe; the least any exec-based arming can cost;
- preexec: pubmon's preexec hook (`_make_arm`): prctl + getppid in the child, which makes
  CPython fork instead of vfork;
- helper: a static C helper doing prctl + getppid check + execvp (one extra exec, safe), built
  here with `cc -static` when a compiler exists. pubmon does not ship it (that would mean a
  binary per architecture in the wheel); it shows what one would save.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pubmon.core import process

HELPER_C = r"""
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {  /* helper PARENT_PID argv... */
    if (argc < 3) return 111;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return 111;
    if (getppid() != (pid_t)atol(argv[1])) return 111;
    execvp(argv[2], argv + 2);
    return 127;
}
"""

Argv = Callable[[list[str]], tuple[list[str], Callable[[], None] | None]]


def _candidates(helper: str | None) -> dict[str, Argv]:
    me = os.getpid()
    setpriv = shutil.which("setpriv")
    out: dict[str, Argv] = {"bare": lambda argv: (argv, None)}
    if setpriv:
        out["wrapper"] = lambda argv: (process.wrapped(tuple(argv), me), None)
        out["setpriv-only"] = lambda argv: ([setpriv, "--pdeathsig", "KILL", "--", *argv], None)
    out["preexec"] = lambda argv: (argv, process._make_arm(me))
    if helper:
        out["helper"] = lambda argv: ([helper, str(me), *argv], None)
    return out


class _Proto(asyncio.SubprocessProtocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done, self.open, self.exited = done, 2, False

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.open -= 1
        self._check()

    def process_exited(self) -> None:
        self.exited = True
        self._check()

    def _check(self) -> None:
        if self.exited and self.open == 0 and not self.done.done():
            self.done.set_result(None)


async def _spawns(make: Argv, count: int) -> tuple[float, float, float]:
    """(wall, loop-held, CPU) seconds per spawn."""
    loop = asyncio.get_running_loop()
    argv, hook = make(["true"])
    walls, held = [], []
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(count):
        done: asyncio.Future[None] = loop.create_future()
        t0 = time.perf_counter()
        transport, _ = await loop.subprocess_exec(
            functools.partial(_Proto, done), *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            process_group=0, preexec_fn=hook,
        )  # fmt: skip
        held.append(time.perf_counter() - t0)
        await done
        walls.append(time.perf_counter() - t0)
        code = transport.get_returncode()
        transport.close()
        if code != 0:
            raise RuntimeError(f"{argv[:3]}...: exit {code}")
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) + (
        c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    )
    return statistics.median(walls), statistics.median(held), cpu / count


def _build_helper(tmp: Path) -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, out = tmp / "helper.c", tmp / "pdeathsig-helper"
    src.write_text(HELPER_C)
    done = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(src)], capture_output=True)
    return str(out) if done.returncode == 0 else None


async def _main(args: argparse.Namespace, helper: str | None) -> dict[str, list[tuple[float, ...]]]:
    process.install_child_watcher()
    cands = _candidates(helper)
    got: dict[str, list[tuple[float, ...]]] = {name: [] for name in cands}
    for r in range(args.rounds):
        for name, make in cands.items():
            got[name].append(await _spawns(make, args.spawns))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {1e3 * v[-1][0]:.2f}" for n, v in got.items()))
    return got


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spawns", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine)")
    with tempfile.TemporaryDirectory(prefix="pubmon-bench-spawn-") as tmp:
        helper = _build_helper(Path(tmp))
        got = asyncio.run(_main(args, helper))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\nper spawn of `true`, ms: median over rounds (min-max)")
    print("| candidate    | wall               | loop held          | CPU (parent + child) |")
    print("|--------------|--------------------|--------------------|----------------------|")
    for name, rows in got.items():
        cells = []
        for i in range(3):
            vals = [1e3 * r[i] for r in rows]
            cells.append(f"{statistics.median(vals):.3f} ({min(vals):.2f}-{max(vals):.2f})")
        print(f"| {name:12} | {cells[0]:18} | {cells[1]:18} | {cells[2]:20} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

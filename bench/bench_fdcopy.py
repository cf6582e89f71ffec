"""What one spawn costs against the number of descriptors the spawning process holds.

    .venv/bin/python bench/bench_fdcopy.py [--fds 0,4000,8000,16000] [--spawns 200]

The daemon holds 4 descriptors per publisher (two pipes, a pidfd, a log file), and every
spawn pays for all of them in the kernel: vfork copies the descriptor table, and the child
closes every inherited descriptor (`close_fds`, one `close_range`) before it execs. So the
cost of a spawn grows with N, and starting N publishers is O(N^2) in the kernel whatever the
supervisor does (bench/floor.py shows it too). This measures it alone: `/bin/true` spawned
as pubmon spawns (`subprocess`, own process group, stdin from /dev/null) from this process
holding K descriptors (pipes), the median wall time of a spawn (until `Popen` returns: the
child has exec'd) and this process's CPU per spawn. Needs RLIMIT_NOFILE above the largest K.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def spawn_cost(spawns: int) -> tuple[float, float]:
    """(median wall s, median CPU s of this process) per spawn of /bin/true."""
    walls, cpus = [], []
    for _ in range(spawns):
        t, c = time.perf_counter(), time.process_time()
        child = subprocess.Popen(["/bin/true"], process_group=0, stdin=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        child.wait()
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fds", default="0,4000,8000,16000")
    p.add_argument("--spawns", type=int, default=200)
    args = p.parse_args()
    sizes = [int(x) for x in args.fds.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(sizes) + 64 > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(sizes) + 64), hard))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    held: list[int] = []
    try:
        for k in sizes:
            while len(held) < k:
                held.extend(os.pipe())
            wall, cpu = spawn_cost(args.spawns)
            print(f"{len(held):6} fds held: {1e6 * wall:7.1f} µs wall, {1e6 * cpu:6.1f} µs CPU")
    finally:
        for fd in held:
            os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())

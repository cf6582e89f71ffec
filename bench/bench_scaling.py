"""How pubmon's costs grow with N, and A/B runs of two source trees on a shared machine.

    .venv/bin/python bench/bench_scaling.py [--n 100,1000,4000] [--repeat 2] [--window 5]
        [--src OTHER/src[,ANOTHER/src]] [--only spawn,idle,status,restart,stop]

For each N, one daemon start per repeat with N `sleep 3600` publishers (the same config as
`run.py`'s fleet: `start_timeout = 0`, no rotation, the control socket only), measured in order:
- spawn: start -> the status answer that lists all N RUNNING (`Contender.wait_running`);
- idle: CPU (% of one core) over `--window` s after a 1 s settle, RSS (MiB) and open fds at
  its end (4 per publisher: two pipes, a pidfd, a log file: 5000 publishers need a
  RLIMIT_NOFILE above 20000, this machine's hard limit, hence 4000 as the top size);
- status: median wall time of 20 `listPublishers` calls on one open connection (the Cython
  client, as run.py), and the daemon's CPU per call over those calls (µs); then its parts:
  the same call sent raw on a socket, timed to the reply's first byte (the daemon's share:
  the reply is encoded whole before it is sent), and the client's decode of that reply
  alone (thriftpy2's Cython codec). The rest of the wall time is moving the reply;

- restart: SIGKILL of 5 different children, each timed until a new `sleep` child appears
  (busy-polling /proc, nobody calling the API meanwhile): the median, ms;
- stop: SIGTERM -> the daemon and every child gone.

With `--src`, each tree named (and the installed one, "this") runs in turn for every N and
repeat: A, B, A, B, so that a change in the machine's load falls on both alike. The table has
each figure's median and min-max per tree; for one tree it also has the growth per 10x of N
(from each N to the next, the ratio scaled to a 10x step: x10 = linear, x1 = flat).
The machine is shared: the load average is printed before and after, and the CPU that other
processes used meanwhile, as run.py does.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procfs  # noqa: E402
from contenders.base import Program  # noqa: E402
from contenders.pubmon import Pubmon  # noqa: E402
from scenario_faults import _new_child  # noqa: E402

FIGURES = {  # name: (unit, label)
    "spawn": ("s", "spawn N -> all RUNNING"),
    "idle_cpu": ("%", "idle CPU"),
    "idle_rss": ("MiB", "idle RSS"),
    "idle_fds": ("fds", "open fds of the daemon"),
    "status": ("ms", "status via API, one call"),
    "status_cpu": ("µs", "daemon CPU per status call"),
    "status_daemon": ("ms", "status: to the reply's first byte"),
    "status_decode": ("ms", "status: client decode alone"),
    "restart": ("ms", "restart after SIGKILL, p50"),
    "stop": ("s", "stop: SIGTERM -> all gone"),
}
KILLS = 5
PER_PROGRAM = 1000
STATUS_CALLS = 20


def _tree(label: str, src: Path | None) -> type[Pubmon]:
    return type(f"Pubmon_{label}", (Pubmon,), {"src": src})


def one_run(
    cls: type[Pubmon], n: int, root: Path, only: set[str], window: float, calls: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix=f"n{n}-", dir=root))
    c = cls(work)
    # numprocs is at most 1000: N above it is several programs of 1000 (s, s1, s2, ...).
    programs = [
        Program(f"s{j or ''}", ("sleep", "3600"), numprocs=min(PER_PROGRAM, n - j * PER_PROGRAM))
        for j in range(math.ceil(n / PER_PROGRAM))
    ]
    names = [name for p in programs for name in p.instances()]
    try:
        start = time.monotonic()
        c.start(programs)
        ready, status = c.wait_running(names, timeout=600)
        out["spawn"] = ready - start
        if "idle" in only:
            time.sleep(1.0)
            cpu0, t0 = procfs.cpu_seconds(c.pid), time.monotonic()
            time.sleep(window)
            cpu1, t1 = procfs.cpu_seconds(c.pid), time.monotonic()
            out["idle_cpu"] = 100 * (cpu1 - cpu0) / (t1 - t0)
            out["idle_rss"] = procfs.rss_mib(c.pid)
            out["idle_fds"] = len(os.listdir(f"/proc/{c.pid}/fd"))
        if "status" in only:
            conn = c.connect()
            try:
                conn.status()  # the first call encodes every PublisherInfo once
                walls = []
                cpu0 = procfs.cpu_seconds(c.pid)
                for _ in range(calls):
                    t = time.perf_counter()
                    got = conn.status()
                    walls.append(time.perf_counter() - t)
                    assert len(got) == n
                cpu = procfs.cpu_seconds(c.pid) - cpu0
            finally:
                conn.close()
            out["status"] = 1000 * statistics.median(walls)
            out["status_cpu"] = 1e6 * cpu / calls
            first, decode = _status_parts(c.socket, n, calls)
            out["status_daemon"], out["status_decode"] = 1000 * first, 1000 * decode
        if "restart" in only:
            delays = []
            for k in range(min(KILLS, n)):
                before = procfs.children(c.pid)
                t = time.monotonic()
                os.kill(status[f"s:{k}"][1], signal.SIGKILL)
                _, seen = _new_child(c.pid, before, "sleep", timeout=30)
                delays.append(1000 * (seen - t))
                time.sleep(0.1)
            out["restart"] = statistics.median(delays)
        if "stop" in only:
            pids = procfs.descendants(c.pid)
            t = time.monotonic()
            c.terminate()
            while not procfs.exited(c.pid):
                time.sleep(0.001)
            if procfs.wait_gone(pids, 60):
                out["stop"] = time.monotonic() - t
    finally:
        procfs.cleanup()
    return out


def _status_parts(path: Path, n: int, calls: int) -> tuple[float, float]:
    """(median s to the first byte of a raw listPublishers reply, median s to decode it)."""
    import socket
    import struct

    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.protocol.cybin import TCyBinaryProtocolFactory
    from thriftpy2.thrift import TMessageType
    from thriftpy2.transport import TMemoryBuffer
    from thriftpy2.transport.memory import TCyMemoryBuffer

    from pubmon.thrift import idl

    service = idl.pubmon().PubmonService
    buf = TMemoryBuffer()
    proto = TBinaryProtocolFactory().get_protocol(buf)
    proto.write_message_begin("listPublishers", TMessageType.CALL, 1)
    service.listPublishers_args().write(proto)
    proto.write_message_end()
    request = struct.pack("!i", len(buf.getvalue())) + buf.getvalue()

    def take(sock: socket.socket, size: int) -> bytes:
        got = bytearray()
        while len(got) < size:
            chunk = sock.recv(size - len(got))
            if not chunk:
                raise EOFError("the daemon closed the connection")
            got += chunk
        return bytes(got)

    firsts, decodes, body = [], [], b""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        for _ in range(calls):
            t = time.perf_counter()
            sock.sendall(request)
            head = take(sock, 4)
            firsts.append(time.perf_counter() - t)
            body = take(sock, struct.unpack("!i", head)[0])
    for _ in range(calls):
        t = time.perf_counter()
        proto = TCyBinaryProtocolFactory().get_protocol(TCyMemoryBuffer(body))
        proto.read_message_begin()
        result = service.listPublishers_result()
        result.read(proto)
        decodes.append(time.perf_counter() - t)
        assert len(result.success) == n
    return statistics.median(firsts), statistics.median(decodes)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through one_run's cleanup: nothing left running


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.median(values)
    return f"{m:.3g} ({min(values):.3g}-{max(values):.3g})" if len(values) > 1 else f"{m:.3g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", default="100,1000,4000")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--window", type=float, default=5.0, help="idle CPU window, s")
    p.add_argument("--src", default="", help="other source trees, comma-separated (A/B)")
    p.add_argument("--only", default="spawn,idle,status,restart,stop")
    p.add_argument("--calls", type=int, default=STATUS_CALLS, help="status calls per daemon")
    args = p.parse_args()
    sizes = [int(x) for x in args.n.split(",")]
    only = set(args.only.split(","))
    trees: list[tuple[str, Path | None]] = [("this", None)]
    trees += [
        (Path(s).resolve().parent.name or s, Path(s).resolve()) for s in args.src.split(",") if s
    ]
    signal.signal(signal.SIGTERM, _on_sigterm)
    procfs.become_subreaper()
    load0 = os.getloadavg()
    print(f"load average {load0[0]:.1f} on {os.cpu_count()} cores at the start (a shared machine)")
    results: dict[tuple[str, str, int], list[float]] = {}
    foreign = procfs.ForeignCpu()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pubmon-scaling-") as tmp:
        for rep in range(args.repeat):
            for n in sizes:
                for label, src in trees:
                    got = one_run(_tree(label, src), n, Path(tmp), only, args.window, args.calls)
                    cells = ", ".join(f"{k} {v:.4g}" for k, v in got.items())
                    print(f"  run {rep + 1} n={n} {label}: {cells}", flush=True)
                    for k, v in got.items():
                        results.setdefault((k, label, n), []).append(v)
    noise = foreign.percent()
    print(f"\n{time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end;"
          f" other processes used {noise or 0:.0f} % of one core meanwhile")  # fmt: skip
    labels = [label for label, _ in trees]
    head = ["figure", "unit", *[f"{lab} n={n}" for n in sizes for lab in labels]]
    if len(trees) == 1 and len(sizes) > 1:
        head += [f"growth {a}->{b} per 10x" for a, b in itertools.pairwise(sizes)]
    rows = []
    for key, (unit, text) in FIGURES.items():
        cells = [_cell(results.get((key, lab, n), [])) for n in sizes for lab in labels]
        if all(c == "-" for c in cells):
            continue
        row = [text, unit, *cells]
        if len(trees) == 1 and len(sizes) > 1:
            for a, b in itertools.pairwise(sizes):
                va, vb = results.get((key, "this", a)), results.get((key, "this", b))
                if va and vb and statistics.median(va) > 0:
                    ratio = statistics.median(vb) / statistics.median(va)
                    # growth per 10x of N: ratio ** (1 / log10(b / a))
                    row.append(f"x{ratio ** (1 / math.log10(b / a)):.2f}")
                else:
                    row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

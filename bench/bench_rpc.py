"""Micro benchmark: getStatus calls/s through pubmon.thrift.server, server in its own process.

Prints one JSON line per scenario:
  seq-tcp / seq-unix  one client, one connection, one call at a time (getStatus, a plain def)
  conc8-tcp           8 connections in one client process, each one call at a time
  seq-tcp-async       like seq-tcp, but getName, an async def handler (a task per call)
  seq-tcp-sync-client thriftpy2's blocking cybin client instead of ours
Fields: calls/s, latency percentiles (µs, per call as the client sees it) and the server's CPU
time per call (utime + stime from /proc, µs), the best measure of server cost on a small box
where the client process is the bottleneck.

``--codec`` instead prints the codec's own cost, in process (best of 9 repeats, CPU time):
  codec  a getStatus request decoded and its reply encoded (the server's part of a call), a
         listPublishers reply of 1000 PublisherInfo encoded from thriftpy2 objects, and decoded
         into the CLI's plain classes and into thriftpy2's (the async client's)

    python bench/bench_rpc.py [--seconds 3] [--codec]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient, ThriftServer

_TICK = os.sysconf("SC_CLK_TCK")


class _Handler:
    def getStatus(self) -> int:
        return idl.FbStatus.ALIVE

    async def getName(self) -> str:  # the same call through the async-handler path
        return "bench"


async def _serve(sock_path: str) -> None:
    # The server's speed, not its per-peer rate limits (0.1 s of handler time per second per
    # TCP address would cap one client near 2000 getStatus/s; bench/floods.py measures those).
    server = ThriftServer(
        idl.pubmon().PubmonService, _Handler(), name="bench", peer_share=10.0, total_share=10.0
    )
    port = await server.start_tcp("127.0.0.1", 0)
    await server.start_unix(sock_path)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await server.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _worker(
    client: ThriftClient, method: str, deadline: float, latencies: list[float]
) -> None:
    while (start := time.perf_counter()) < deadline:
        await client.call(method)
        latencies.append(time.perf_counter() - start)


async def _scenario(
    name: str, pid: int, seconds: float, n: int, method: str = "getStatus", **where: object
) -> None:
    service = idl.pubmon().PubmonService
    clients = [await ThriftClient.connect(service, **where) for _ in range(n)]  # type: ignore[arg-type]
    for c in clients:  # warm up
        await c.call(method)
    latencies: list[float] = []
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for c in clients:
            tg.create_task(_worker(c, method, t0 + seconds, latencies))
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.close()
    _report(name, method, n, latencies, elapsed, pid, cpu0)


def _sync_scenario(pid: int, port: int, seconds: float) -> None:
    """thriftpy2's blocking cybin client: shows what the server does when the client is cheap."""
    import thriftpy2.rpc
    from thriftpy2.transport import TFramedTransportFactory

    client = thriftpy2.rpc.make_client(
        idl.pubmon().PubmonService, "127.0.0.1", port, trans_factory=TFramedTransportFactory()
    )
    latencies = []
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    while (start := time.perf_counter()) < t0 + seconds:
        client.getStatus()
        latencies.append(time.perf_counter() - start)
    _report("seq-tcp-sync-client", "getStatus", 1, latencies, time.perf_counter() - t0, pid, cpu0)
    client.close()


def _report(
    name: str, method: str, n: int, latencies: list[float], elapsed: float, pid: int, cpu0: float
) -> None:
    cpu = _cpu_seconds(pid) - cpu0
    q = statistics.quantiles(latencies, n=100)
    record = {
        "scenario": name,
        "method": method,
        "connections": n,
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / elapsed),
        "p50_us": round(q[49] * 1e6),
        "p99_us": round(q[98] * 1e6),
        "server_cpu_us_per_call": round(cpu / len(latencies) * 1e6, 1),
    }
    print(json.dumps(record), flush=True)


async def _run_all(pid: int, port: int, sock: str, seconds: float) -> None:
    await _scenario("seq-tcp", pid, seconds, 1, host="127.0.0.1", port=port)
    await _scenario("seq-unix", pid, seconds, 1, unix_socket=sock)
    await _scenario("conc8-tcp", pid, seconds, 8, host="127.0.0.1", port=port)
    await _scenario("seq-tcp-async", pid, seconds, 1, "getName", host="127.0.0.1", port=port)


def _codec() -> None:
    import timeit

    from pubmon.thrift.codec import Service

    pm = idl.pubmon()
    bound, plain = idl.bind(pm.PubmonService), Service("PubmonService")
    infos = [
        pm.PublisherInfo(
            name=f"feed:{i}", program="feed", state="RUNNING", pid=4242 + i, health="HEALTHY",
            restarts=2, lastExit=-9, lastExitReason="killed by SIGKILL", uptime=12.5, port=9101,
            statusDetails="ok", cpuSeconds=1.5, memoryBytes=1 << 20, openFds=5, startedAt=1.0,
            stateSince=2.0, probe="none",
        )
        for i in range(1000)
    ]  # fmt: skip
    call = bound.encode_call("getStatus", 1, ())[4:]
    listing = bound.method("listPublishers")

    def serve_get_status() -> None:
        _, _, seqid, method, reader = bound.decode_call(call)
        assert method is not None
        bound.decode_args(reader, method)
        bound.encode_reply(method, seqid, "success", 2)

    def encode_1000() -> bytes:
        return bound.encode_reply(listing, 1, "success", infos)

    reply = encode_1000()[4:]

    def best_us(fn: Callable[[], object], number: int) -> float:
        timer = timeit.Timer(fn, timer=time.process_time)
        return min(timer.repeat(number=number, repeat=9)) / number * 1e6

    record = {
        "scenario": "codec",
        "getStatus_serve_us": round(best_us(serve_get_status, 2000), 2),
        "encode_1000_infos_ms": round(best_us(encode_1000, 5) / 1000, 2),
        "decode_1000_infos_plain_ms": round(
            best_us(lambda: plain.decode_reply(reply, plain.method("listPublishers"), 1), 5) / 1000,
            2,
        ),
        "decode_1000_infos_thriftpy2_ms": round(
            best_us(lambda: bound.decode_reply(reply, listing, 1), 5) / 1000, 2
        ),
        "reply_bytes": len(reply),
    }
    print(json.dumps(record), flush=True)


def _main(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "bench.sock")
        with subprocess.Popen(
            [sys.executable, __file__, "--serve", sock],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                port = int(proc.stdout.readline())
                asyncio.run(_run_all(proc.pid, port, sock, seconds))
                _sync_scenario(proc.pid, port, seconds)
            finally:
                proc.stdin.close()  # the server exits at EOF on stdin


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--codec", action="store_true", help="the codec's cost, in process")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.codec:
        _codec()
    elif opts.serve:
        asyncio.run(_serve(opts.serve))
    else:
        _main(opts.seconds)

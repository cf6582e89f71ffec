"""The demo publisher (pubmon.demo): its Thrift service in process, its status and options, the
demo config (three healthy publishers under a real Supervisor), and `pubmon demo` cleaning up."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
from pathlib import Path

import pytest

from demos import client, in_process_demo, option_is
from pubmon.config.load import parse_config
from pubmon.core.lifecycle import Health, PublisherState
from pubmon.core.probe import Fb303Probe
from pubmon.demo import DEMO_DATA_SOURCE, Demo, demo_config, free_ports, serve
from pubmon.errors import RpcError
from pubmon.thrift.idl import FbStatus
from supervised import supervising, until

S = PublisherState


async def test_demo_serves_buffered_in_process_and_stops_on_shutdown() -> None:
    demo = Demo("buffered", out=io.StringIO(), startup_delay=30)
    (port,) = free_ports(1)
    server = asyncio.ensure_future(serve(demo, port, "buffered"))
    try:
        probe = Fb303Probe("127.0.0.1", port, 1.0, "buffered")
        try:
            async with asyncio.timeout(5):
                while probe.status is None:  # until it listens
                    assert await probe.check() == Health.UNHEALTHY
                    await asyncio.sleep(0.01)
            assert probe.status == FbStatus.STARTING
            assert probe.last_error.startswith("child reports STARTING: STARTING: warming up")
        finally:
            await probe.close()
        async with client(port, "buffered") as c:
            assert await c.call("getName") == "buffered"
            counters = await c.call("getCounters")
            assert isinstance(counters, dict)
            assert set(counters) >= {"demo.ticks", "demo.messages", "demo.status_calls"}
            await c.call("shutdown")
        async with asyncio.timeout(5):
            await server
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def test_demo_refuses_an_unknown_status() -> None:
    async with in_process_demo() as (demo, _, port), client(port) as c:
        with pytest.raises(RpcError, match="status must be one of"):
            await c.call("setOption", "status", "SLEEPY")
    assert "status" not in demo.options


async def test_demo_config_runs_three_healthy_publishers(tmp_path: Path) -> None:
    ports = free_ports(4)
    text = demo_config(tmp_path, ports)
    cfg = parse_config(text, tmp_path / "demo.toml")
    assert [p.name for p in cfg.publishers] == ["quotes", "trades", "news"]
    assert [p.port for p in cfg.publishers] == ports[:3]
    assert all(p.probe.kind == "fb303" and p.probe.interval == 1 for p in cfg.publishers)
    assert all(p.probe.timeout == 0.5 and p.probe.failure_threshold == 3 for p in cfg.publishers)
    assert cfg.control.socket == str(tmp_path / "pubmon.sock")
    assert cfg.daemon.log_dir is not None and cfg.daemon.log_dir.startswith(str(tmp_path))
    assert cfg.monitor.listen == f"127.0.0.1:{ports[3]}"
    assert parse_config(demo_config(tmp_path, ports[:3]), tmp_path / "d.toml").monitor.listen == ""
    async with supervising(cfg) as sup:
        for name in ("quotes", "trades", "news"):
            pub = sup.get(name)
            await until(pub, lambda p=pub: p.state == S.RUNNING and p.health == Health.HEALTHY)
        await option_is(ports[0], "data_source", DEMO_DATA_SOURCE)
    assert os.path.exists(tmp_path / "logs" / "quotes.log")


async def test_demo_removes_its_temp_dir_when_stopped() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pubmon", "demo",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = (await proc.stdout.readline()).decode()
        folder = Path(first.split("config ", 1)[1].strip()).parent
        async with asyncio.timeout(30):
            while b"ready:" not in await proc.stderr.readline():
                pass
        assert folder.is_dir()
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await proc.communicate()
        assert proc.returncode == 0
        assert not folder.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""/metrics scraped by a real Prometheus (Debian's `prometheus`, installed by `make test`).

The server runs on a free loopback port with a 100 ms scrape interval and its storage in tmp.
Prometheus asks for OpenMetrics first, so this also checks that format against its own parser.
Waits are polls of Prometheus's query API under a deadline: Prometheus has no event to wait on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from daemons import daemon_header, run_daemon, toml_publisher
from pubmon.demo import free_ports

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None, reason="needs Debian's prometheus package (make test installs it)"
    ),
]


@asynccontextmanager
async def prometheus(tmp: Path, target: str) -> AsyncIterator[str]:
    """A Prometheus scraping `target` (host:port) every 100 ms; yields its base URL."""
    assert PROMETHEUS is not None
    (port,) = free_ports(1)
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": "100ms", "scrape_timeout": "90ms"},
                "scrape_configs": [
                    {"job_name": "pubmon", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{base}/api/v1/query?{urlencode({'query': promql})}") as r:
            if r.status == 503:  # listening, but its storage is not open yet ("not ready")
                return []
            body = await r.json()
    except aiohttp.ClientConnectionError:
        return []  # still starting
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def poll(
    session: aiohttp.ClientSession, base: str, promql: str, done: Any, timeout: float = 20
) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while not done(result := await query(session, base, promql)):
            await asyncio.sleep(0.1)  # one scrape interval
    return result


async def test_prometheus_scrapes_every_publisher_and_sees_a_restart(tmp_path: Path) -> None:
    (http_port,) = free_ports(1)
    names = ["alpha", "beta", "gamma:0", "gamma:1"]
    config = tmp_path / "pubmon.toml"
    config.write_text(
        daemon_header(tmp_path)
        + f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        + toml_publisher("alpha", ["sleep", "3600"])
        + toml_publisher("beta", ["sleep", "3600"])
        + toml_publisher("gamma", ["sleep", "3600"], numprocs=2)
    )
    async with (
        run_daemon(config) as d,
        prometheus(tmp_path, f"127.0.0.1:{http_port}") as base,
        aiohttp.ClientSession() as s,
    ):
        # Two scrapes in, every publisher has its series.
        await poll(s, base, 'count_over_time(up{job="pubmon"}[1m]) >= 2', bool)
        up = await poll(s, base, "pubmon_publisher_up", lambda r: len(r) == len(names))
        assert sorted(x["metric"]["publisher"] for x in up) == names
        assert all(x["value"][1] == "1" for x in up)
        assert {x["metric"]["program"] for x in up} == {"alpha", "beta", "gamma"}
        async with s.get(f"{base}/api/v1/targets") as r:
            (target,) = (await r.json())["data"]["activeTargets"]
        assert (target["health"], target["lastError"]) == ("up", "")

        # The daemon restarts a killed publisher: Prometheus sees the counter go up.
        before = d.publisher_pids()["beta"]
        os.kill(before, signal.SIGKILL)
        inc = await poll(
            s,
            base,
            'increase(pubmon_publisher_restarts_total{publisher="beta"}[1m])',
            lambda r: r and float(r[0]["value"][1]) > 0,
        )
        assert float(inc[0]["value"][1]) > 0
        signal_exits = await query(s, base, 'pubmon_publisher_exits_total{reason="signal"}')
        by_name = {x["metric"]["publisher"]: x["value"][1] for x in signal_exits}
        assert by_name["beta"] == "1" and by_name["alpha"] == "0"
        d.signal(signal.SIGTERM)
        assert await d.wait_exit() == 0

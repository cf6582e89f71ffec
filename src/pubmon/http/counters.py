"""A publisher's own fb303 counters, for `pubmon_child_counter{publisher,counter}`.

A probe with `export_counters = true` (fb303 only) makes its publisher's `getCounters()` part of
/metrics. `fetch_counters` is one call on a fresh connection under a timeout, never raising: a
child that does not answer just has no counters this time (its probe judges its health).
`ChildCounters` keeps the last answer per publisher, fetched at most once per probe interval
and only when a scrape asks, so /metrics renders without waiting on children it already
asked recently. The cap keeps a child that exports a million keys from growing every scrape
(and Prometheus) without bound: the first `cap` keys in sorted order are kept, and the number
cut is logged once per publisher.

The probe itself may call `fetch_counters` on its own connection later (one connection per
child); the store is independent of who fetches.
"""

from __future__ import annotations

__all__ = ["ChildCounters", "fetch_counters"]

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping

from pubmon.config.model import ProbeSpec
from pubmon.errors import RpcError
from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient

logger = logging.getLogger(__name__)


async def fetch_counters(probe: ProbeSpec, cap: int) -> dict[str, float] | None:
    """The child's getCounters(), at most `cap` keys (sorted); None when it did not answer."""
    if probe.port is None:
        return None
    try:
        async with asyncio.timeout(probe.timeout):
            client = await ThriftClient.connect(
                idl.fb303().FacebookService,
                host=probe.host,
                port=probe.port,
                timeout=probe.timeout,
                transport=probe.transport,
            )
            async with client:
                raw = await client.call("getCounters")
    except (RpcError, TimeoutError, OSError):
        return None
    if not isinstance(raw, dict):
        return None
    out: dict[str, float] = {}
    for key in sorted(raw)[:cap]:
        value = raw[key]
        if isinstance(key, str) and isinstance(value, int | float) and math.isfinite(value):
            out[key] = value
    return out


class ChildCounters:
    """The last counters of each publisher that exports them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.values: dict[str, dict[str, float]] = {}
        self._fetched: dict[str, float] = {}  # name -> time.monotonic() of the last fetch

    async def refresh(self, due: Iterable[tuple[str, ProbeSpec]]) -> None:
        """Fetch, concurrently, every (name, probe) not fetched within its probe interval."""
        now = time.monotonic()
        todo = [
            (name, probe)
            for name, probe in due
            if now - self._fetched.get(name, -math.inf) >= probe.interval
        ]
        if not todo:
            return
        for name, _ in todo:
            self._fetched[name] = now
        async with asyncio.TaskGroup() as tg:
            tasks = {name: tg.create_task(fetch_counters(p, self.cap)) for name, p in todo}
        for name, task in tasks.items():
            got = task.result()
            if got is not None:
                self.values[name] = got

    def keep_only(self, names: Mapping[str, object]) -> None:
        """Forget publishers that are gone or no longer running."""
        for gone in self.values.keys() - names.keys():
            del self.values[gone]
            self._fetched.pop(gone, None)

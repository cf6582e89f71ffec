"""Talking to a test daemon over its control socket, and bits of the host it runs on (mounts)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from pubmon.thrift import idl
from pubmon.thrift.server import ThriftClient


@asynccontextmanager
async def control(socket: Path, timeout: float = 30) -> AsyncIterator[Any]:
    async with await ThriftClient.connect(
        idl.pubmon().PubmonService, unix_socket=str(socket), timeout=timeout
    ) as client:
        yield client


async def poll(check: Callable[[], Any], what: str, timeout: float = 10, step: float = 0.05) -> Any:
    """Await `check()` (a coroutine function) until it returns something truthy; return that."""
    try:
        async with asyncio.timeout(timeout):
            while not (got := await check()):
                await asyncio.sleep(step)
            return got
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def call_frame(method: str, *args: object, seqid: int = 1) -> bytes:
    """One framed binary-protocol CALL of a PubmonService method, as a client sends it."""
    return idl.bind("PubmonService").encode_call(method, seqid, args)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` on `path` (created) for the block; skip the test if we can't."""
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {got.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazy: a process we failed to stop must not leave the mount behind.
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """chattr +i (stops even root from writing) for the block; skip the test if we can't."""
    got = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if got.returncode != 0:
        subprocess.run(["chattr", "-i", *map(str, paths)], capture_output=True)
        pytest.skip(f"cannot make files immutable: {got.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def fill(path: Path) -> int:
    """Write `path` until its filesystem is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 64, 1):
            block = b"\0" * size
            try:
                while True:
                    written += os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return written


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))

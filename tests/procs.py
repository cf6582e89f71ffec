"""Process inspection for tests: descendants of a pid, zombies, waiting for pids to vanish."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a pid, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def state(pid: int) -> str | None:
    st = proc_stat(pid)
    return st[0] if st else None


def alive(pid: int) -> bool:
    """True while the pid exists and is not a zombie."""
    st = state(pid)
    return st is not None and st != "Z"


def children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        out.update(int(p) for p in text.split())
    return out


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def in_group(pgid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st and st[2] == pgid and st[0] != "Z":
                out.add(int(entry))
    return out


async def wait_gone(pids: set[int] | list[int], timeout: float = 5.0, step: float = 0.01) -> None:
    """Wait until none of `pids` is alive (zombies count as gone). Raises TimeoutError."""
    async with asyncio.timeout(timeout):
        while any(alive(p) for p in pids):
            await asyncio.sleep(step)


def environ(pid: int) -> list[bytes]:
    """The environment of `pid`. A publisher that was just spawned may still be going through
    the exec chain of the spawn wrapper (setpriv, sh, the command): in the middle of an exec
    the kernel shows an empty environment for a moment, so an empty one is read again."""
    deadline = time.monotonic() + 1.0
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        if raw or time.monotonic() > deadline:
            return raw.split(b"\0")
        time.sleep(0.001)

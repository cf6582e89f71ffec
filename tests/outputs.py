"""Output fed to an `OutputLog` in the output tests: numbered lines, random chunking, line texts."""

from __future__ import annotations

import random

from pubmon.core.output import LogLine, StreamSink


def feed_randomly(sink: StreamSink, data: bytes, rng: random.Random, sizes: list[int]) -> None:
    i = 0
    while i < len(data):
        k = rng.randint(1, rng.choice(sizes))
        sink.feed(data[i : i + k])
        i += k


def numbered(first: int, last: int, tag: str = "line") -> bytes:
    return "".join(
        f"{tag} {i:07d} of the numbered lines\n" for i in range(first, last + 1)
    ).encode()


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]

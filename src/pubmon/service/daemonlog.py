"""The daemon's own recent log records, kept in memory for ``pubmon log`` (``tailDaemonLog``).

supervisorctl has ``maintail``; under systemd the journal has everything, but an operator on the
control socket may not be allowed to read the journal, and a daemon started by hand logs to a
terminal that is gone. So the last ``SIZE`` records stay in a ring, numbered like a publisher's
output lines, and the CLI reads them with the same cursor rules as ``tailLog``.

Formatting is done here, once per record, on the thread that logs (the event loop): a record is
a few hundred bytes and the daemon logs a line per state change, so 1000 of them cost ~0.3 MB.
"""

from __future__ import annotations

__all__ = ["SIZE", "DaemonLogRing", "install"]

import logging
from collections import deque
from typing import NamedTuple

SIZE = 1000


class Record(NamedTuple):
    seq: int
    time: float
    level: str
    text: str


class DaemonLogRing(logging.Handler):
    """A logging handler that keeps the last `size` records, numbered from 1."""

    def __init__(self, size: int = SIZE) -> None:
        super().__init__(logging.DEBUG)
        self.records: deque[Record] = deque(maxlen=size)
        self.seq = 0
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad %-format in someone's call: logging's own policy
            self.handleError(record)
            return
        self.seq += 1
        self.records.append(Record(self.seq, record.created, record.levelname, text))

    def tail(self, after: int, n: int) -> tuple[list[Record], int, int]:
        """(records with seq > after, at most n, oldest first; the next cursor; how many after
        `after` fell out of the ring). after < 0: the last -after records. A cursor beyond the
        newest (the daemon restarted) resynchronises to the newest, as tailLog does."""
        recs = self.records
        if not recs:
            return [], self.seq, 0
        first = recs[0].seq
        if after < 0:
            after = max(first - 1, self.seq + after)
        if after > self.seq:
            return [], self.seq, 0
        missed = max(0, first - 1 - after)
        start = max(0, after + 1 - first)
        out = [recs[i] for i in range(start, min(len(recs), start + n))]
        return out, out[-1].seq if out else after, missed


_ring: DaemonLogRing | None = None


def install() -> DaemonLogRing:
    """The process's ring, added to the root logger on first use."""
    global _ring
    if _ring is None:
        _ring = DaemonLogRing()
        logging.getLogger().addHandler(_ring)
    return _ring

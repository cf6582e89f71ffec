"""The chaos publisher: writes numbered lines and records, out of band, how many it wrote.

    python -S chaos_child.py --state DIR [--rate R] [--ignore-term]

Stdlib only and no `site`, so it starts in ~30 ms. Its name is PUBMON_PUBLISHER (set by pubmon).

Every line it writes is numbered, per run and per stream, from 1::

    C <run> o <seq> <hex>\\n                 a short stdout line (hex = checksum of the seq)
    C <run> o <seq> L<n> <n payload bytes>\\n a long stdout line (payload from LONG_ALPHABET)
    C <run> o <seq> B <bad utf-8 bytes>\\n    invalid UTF-8 (exact bytes from bad_bytes(seq))
    C <run> e <seq> <hex>\\n                 a short stderr line

`<run>` is "<pid>.<ns>", unique per start. After each write it overwrites the run's record file
`DIR/<name>/<run>.run` with "<stdout lines> <stderr lines>": every line counted there was handed
to the pipe whole before the count was stored, so it must be in pubmon's log files.

Commands: the driver writes `DIR/<name>/<pid>.cmd` (atomically) and sends SIGUSR1. SIGUSR1 is
blocked and taken with sigtimedwait, so the child reacts at once. A SIGUSR1 sent before it is
blocked would kill the child, so it then ignores SIGUSR2 as a sign, visible in SigIgn of
/proc/PID/status, that it takes commands (SigBlk can't tell: sigtimedwait unblocks what it waits
for while it waits). Commands:

    exit N                               exit at once with status N
    burst SHORT LONG LONG_LEN BAD        SHORT lines in one write, LONG long lines, BAD bad ones
    fork CODE T1[:flags] T2[:flags] ...  fork grandchildren that sleep Ti s, then exit CODE;
                                         flags: s = setsid (escape the group), q = stdout and
                                         stderr to /dev/null (a daemonizing child)
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

LONG_ALPHABET = b"0123456789abcdef"
_BAD = bytes([0xFF, 0xFE, 0xC3, 0x28, 0xA0, 0xA1, 0xE2, 0x28, 0xA1, 0xF0, 0x90, 0x28, 0xBC, 0x80])


def checksum(seq: int) -> bytes:
    return b"%08x" % (seq * 2654435761 % 2**32)


def bad_bytes(seq: int) -> bytes:
    n = 3 + seq % 11
    return _BAD[seq % 5 :] + bytes((0x80 + (seq * 7 + i) % 0x7F) for i in range(n))


def long_payload(n: int) -> bytes:
    reps = n // len(LONG_ALPHABET) + 1
    return (LONG_ALPHABET * reps)[:n]


class Child:
    def __init__(self, state: str, rate: float) -> None:
        self.name = os.environ.get("PUBMON_PUBLISHER", "unnamed")
        self.dir = os.path.join(state, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.pid = os.getpid()
        self.run = f"{self.pid}.{time.time_ns()}"
        self.rate = rate
        self.out = 0
        self.err = 0
        self.rng = random.Random(self.run)
        self.record_fd = os.open(
            os.path.join(self.dir, self.run + ".run"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644
        )
        self.record()

    def record(self) -> None:
        os.pwrite(self.record_fd, b"%012d %012d\n" % (self.out, self.err), 0)

    def head(self, stream: bytes, seq: int) -> bytes:
        return b"C %s %s %d " % (self.run.encode(), stream, seq)

    def short(self) -> bytes:
        self.out += 1
        return self.head(b"o", self.out) + checksum(self.out) + b"\n"

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def tick(self) -> None:
        n = self.rng.randint(1, 4)
        self.write(1, b"".join(self.short() for _ in range(n)))
        if self.rng.random() < 0.2:
            self.err += 1
            self.write(2, self.head(b"e", self.err) + checksum(self.err) + b"\n")
        self.record()

    def burst(self, short: int, long: int, long_len: int, bad: int) -> None:
        self.write(1, b"".join(self.short() for _ in range(short)))
        for _ in range(long):
            self.out += 1
            size = self.rng.randint(long_len // 2, long_len)
            head = self.head(b"o", self.out) + b"L%d " % size
            self.write(1, head + long_payload(size) + b"\n")
        for _ in range(bad):
            self.out += 1
            self.write(1, self.head(b"o", self.out) + b"B " + bad_bytes(self.out) + b"\n")
        self.record()

    def fork(self, code: int, specs: list[str]) -> None:
        for spec in specs:
            seconds, _, flags = spec.partition(":")
            pid = os.fork()
            if pid == 0:
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, ())
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
                    if "s" in flags:
                        os.setsid()
                    if "q" in flags:
                        null = os.open(os.devnull, os.O_WRONLY)
                        os.dup2(null, 1)
                        os.dup2(null, 2)
                    os.execvp("sleep", ["sleep", seconds])
                finally:
                    os._exit(127)
        os._exit(code)

    def command(self) -> None:
        path = os.path.join(self.dir, f"{self.pid}.cmd")
        try:
            with open(path) as f:
                words = f.read().split()
            os.unlink(path)
        except FileNotFoundError:
            return
        if not words:
            return
        if words[0] == "exit":
            os._exit(int(words[1]))
        elif words[0] == "burst":
            self.burst(*(int(w) for w in words[1:5]))
        elif words[0] == "fork":
            self.fork(int(words[1]), words[2:])

    def main(self) -> None:
        wait = 1.0 / self.rate
        while True:
            got = signal.sigtimedwait([signal.SIGUSR1], self.rng.uniform(0.5, 1.5) * wait)
            if got is not None:
                self.command()
            else:
                self.tick()


def main(argv: list[str]) -> None:
    state, rate = "", 5.0
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--state":
            state, i = argv[i + 1], i + 1
        elif arg == "--rate":
            rate, i = float(argv[i + 1]), i + 1
        elif arg == "--ignore-term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        i += 1
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    child = Child(state, rate)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # "ready for commands"
    child.main()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The publisher the model runs: says hello, listens on a port, exits when told by a signal.

    python -S model_child.py PORT TERM_DELAY STUCK_PATH

Stdlib only and no `site`, so it starts in a few tens of ms. It prints three lines, then binds
and listens on 127.0.0.1:PORT (a live target for a TCP probe), then waits for signals:

    SIGUSR1   exit 0 at once        SIGUSR2   exit 3 at once
    SIGWINCH  stat STUCK_PATH: on the model's stuck file system, stuck in the kernel for good
    SIGTERM   TERM_DELAY = 0: dies by the signal; TERM_DELAY > 0: ignores it for TERM_DELAY
              seconds, then exits 0 (a publisher that is slow to stop)

Once its handlers are in place it writes its name to `PID.start` in the `marks` folder next to
STUCK_PATH's folder, and to `PID.term` when SIGTERM arrives or `PID.exit` when told to exit: the
model checks that every publisher that ended was either told to exit, SIGKILLed by the test, or
sent its stop signal by the daemon (an ordered stop), never just SIGKILLed by it.

The model sends SIGUSR1, SIGUSR2 and SIGWINCH only once SigCgt in /proc/PID/status shows all
three are caught: a signal sent earlier (while the spawn wrapper's exec chain still runs) would
kill it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time


def main(argv: list[str]) -> None:
    port, term_delay, stuck = int(argv[0]), float(argv[1]), argv[2]
    name = os.environ.get("PUBMON_PUBLISHER", "?")
    for i in range(3):
        sys.stdout.write(f"{name} pid {os.getpid()} line {i}\n")
    sys.stdout.flush()
    listener: socket.socket | None = socket.socket()
    assert listener is not None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
    except OSError as exc:
        sys.stderr.write(f"cannot listen on {port}: {exc}\n")
        listener = None
    marks = os.path.join(os.path.dirname(os.path.dirname(stuck)), "marks")

    def mark(what: str) -> None:
        try:
            fd = os.open(os.path.join(marks, f"{os.getpid()}.{what}"), os.O_CREAT | os.O_WRONLY)
            os.write(fd, name.encode())
            os.close(fd)
        except OSError:
            pass

    def on_term(signum: int, frame: object) -> None:
        mark("term")
        if term_delay > 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(term_delay)
            os._exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exit(code: int) -> None:
        mark("exit")
        os._exit(code)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, lambda *_: on_exit(0))
    signal.signal(signal.SIGUSR2, lambda *_: on_exit(3))
    signal.signal(signal.SIGWINCH, lambda *_: os.stat(stuck))
    mark("start")
    while True:
        if listener is None:
            signal.pause()
        else:  # a TCP probe connects and closes: accept and close (handlers run on EINTR)
            listener.accept()[0].close()


if __name__ == "__main__":
    main(sys.argv[1:])

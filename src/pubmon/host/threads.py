"""Helper threads that never take a signal meant for the event loop."""

from __future__ import annotations

__all__ = ["start_without_signals"]

import signal
import threading


def start_without_signals(thread: threading.Thread) -> None:
    """Start `thread` with every signal blocked in it (it inherits the mask at creation).

    The kernel hands a process-directed signal to any thread that does not block it, e.g.
    when the main thread already has one pending. Python's C handler then writes the signal's
    byte to the wakeup fd from that thread: a helper thread with a private fd table (the log
    writers) writes it to /dev/null, and the loop never hears of a SIGTERM. Found by the
    model-based test (SIGHUP and SIGTERM back to back).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

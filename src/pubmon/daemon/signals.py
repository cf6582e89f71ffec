"""Signals into the loop as data: handlers only queue; one dispatcher task acts on them.

SIGTERM SIGINT SIGQUIT                     graceful stop; a second one kills every group now
SIGALRM SIGVTALRM SIGPROF                  the same (their default action would end us)
SIGHUP                                     reload the config (a storm is coalesced into one)
SIGUSR1                                    reopen log files
SIGUSR2                                    upgrade in place (re-execute; see pubmon.daemon.upgrade)

Every one has a handler, so none is lost when pubmon is a container's PID 1 (the kernel drops
signals with the default action sent to PID 1). SIGQUIT stops gracefully like SIGTERM rather
than dumping core: it is the stop signal of images such as nginx's (STOPSIGNAL SIGQUIT), and
tini forwards it to a child that then exits; s6-svscan treats it as "shut down" too.
"""

from __future__ import annotations

__all__ = [
    "GRACEFUL",
    "HANDLED",
    "SignalQueue",
    "reset_inherited_dispositions",
]

import asyncio
import signal

GRACEFUL = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGALRM,
    signal.SIGVTALRM,
    signal.SIGPROF,
)
HANDLED = (*GRACEFUL, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# Ignored dispositions and the blocked mask survive exec: whatever started the daemon with
# SIGINT ignored (a background job of a shell) would otherwise hand that to every publisher.
# Python itself ignores SIGPIPE and SIGXFSZ; subprocess resets those two in the child.
# glibc keeps two real-time signals (32, 33) for itself; they cannot be set through it and are
# not in valid_signals(): GNU make, for one, starts its recipes with both ignored.
_KEEP = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP}


def reset_inherited_dispositions(*, unblock: bool = True) -> None:
    for sig in signal.valid_signals():
        if sig in _KEEP:
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    if unblock:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())


class SignalQueue:
    """Queues the signals in HANDLED while installed. Tests may `put()` signals directly."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        reset_inherited_dispositions(unblock=False)
        self._loop = asyncio.get_running_loop()
        for sig in HANDLED:
            self._loop.add_signal_handler(sig, self._queue.put_nowait, sig)
        # Unblocked only now: `pubmon upgrade` execs with these blocked, so that one sent
        # while the new image starts stays pending (instead of killing it) and comes here.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

    def uninstall(self) -> None:
        if self._loop is None:
            return
        for sig in HANDLED:
            self._loop.remove_signal_handler(sig)
        self._loop = None

    def put(self, sig: signal.Signals) -> None:
        self._queue.put_nowait(sig)

    async def get(self) -> signal.Signals:
        return await self._queue.get()

    def __enter__(self) -> SignalQueue:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

"""The demo publisher program, and the built-in config that ``pubmon demo`` runs.

Run it as::

    python -m pubmon.demo --pub_port 9101 [--name NAME] [--transport framed|buffered]
                          [--startup_delay S]

and steer a running one with ``python -m pubmon.demo --pub_port 9101 --set status=WARNING``.

It serves ``PublisherService`` (fb303 + ``startPublishers``) on 127.0.0.1:PORT, prints
``tick N`` to stdout once a second, and exits 0 promptly on SIGTERM or SIGINT. Operators and
tests steer it with ``setOption(key, value)``:

``status``   ALIVE, WARNING, DEAD, STARTING, STOPPING or STOPPED: what getStatus answers from now
             on (it answers STARTING for ``--startup_delay`` seconds, then ALIVE, until told).
``hang``     "1": the process wedges. Its event loop blocks for ever, so connections are still
             accepted (by the kernel) but no call is answered, the ticks stop, and SIGTERM is not
             acted on either: only SIGKILL ends it.
``crash``    any value: exit at once with status 3; a signal name (``KILL``, ``SIGSEGV``...)
             kills it by that signal instead.
``spew``     N: write N lines ``spew i/N`` (i = 1..N) to stdout as fast as it can.
``start_publishers_error``  MSG: from now on startPublishers fails with
             PublisherServiceException(MSG); "" makes it succeed again.

The setOption reply is sent before hang, crash or spew act. Every other key is just stored.

Counters (getCounters): ``demo.ticks`` (+1 a second), ``demo.messages`` (+1 a second once a
data source is set, +1 per spewed line), ``demo.start_publishers_calls`` and
``demo.status_calls`` (getStatus calls answered: tests count probe rounds with it).
``startPublishers(url)`` records the url (``getOption("data_source")``) and prints
``startPublishers <url>``. ``reinitialize`` is a logged no-op; ``shutdown`` exits 0 as SIGTERM does.

The framed transport is served by ``thrift.server.ThriftServer``; buffered by thriftpy2's stock aio
server (no frame or idle limits, see reference/thrift.md: fine for a demo on loopback).
"""

from __future__ import annotations

__all__ = ["DEMO_DATA_SOURCE", "DEMO_NAMES", "Demo", "demo_config", "free_ports", "main", "serve"]

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TextIO, final

from pubmon._version import __version__
from pubmon.thrift import idl
from pubmon.thrift.idl import FbStatus
from pubmon.thrift.server import ThriftServer

logger = logging.getLogger(__name__)

Transport = Literal["framed", "buffered"]
CRASH_STATUS = 3
_SPEW_CHUNK = 4096  # lines per write: large writes, and a loop turn between them


@final
class Demo:
    """One demo publisher's state, and its PublisherService handler (plain, non-blocking methods).

    ``run_ticker()`` and ``run_spewer()`` are the demo's own loops (``serve()`` owns them);
    ``stopping`` is set by ``shutdown()`` and by the signal handlers of ``main()``.
    """

    def __init__(
        self,
        name: str,
        *,
        startup_delay: float = 0.0,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.out = out if out is not None else sys.stdout
        self.stopping = asyncio.Event()
        self.options: dict[str, str] = {}
        self.ticks = 0
        self.messages = 0
        self.start_publishers_calls = 0
        self.status_calls = 0
        self._clock = clock
        self._ready_at = clock() + startup_delay
        self._since = int(time.time())
        self._spews: asyncio.Queue[int] = asyncio.Queue()

    def __repr__(self) -> str:
        return f"<Demo {self.name!r} {self.status().name} ticks={self.ticks}>"

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def status(self) -> FbStatus:
        told = self.options.get("status")
        if told:
            return FbStatus[told]
        return FbStatus.STARTING if self._clock() < self._ready_at else FbStatus.ALIVE

    # --- fb303 --------------------------------------------------------------------------------

    def getName(self) -> str:
        return self.name

    def getVersion(self) -> str:
        return f"pubmon-demo {__version__}"

    def getStatus(self) -> int:
        self.status_calls += 1
        return int(self.status())

    def getStatusDetails(self) -> str:
        status = self.status()
        if self.options.get("status"):
            return f"{status.name}: set by setOption"
        if status == FbStatus.STARTING:
            return f"STARTING: warming up, ready in {self._ready_at - self._clock():.1f} s"
        source = self.options.get("data_source")
        return f"ALIVE: publishing from {source}" if source else "ALIVE: no data source yet"

    def getCounters(self) -> dict[str, int]:
        return {
            "demo.ticks": self.ticks,
            "demo.messages": self.messages,
            "demo.start_publishers_calls": self.start_publishers_calls,
            "demo.status_calls": self.status_calls,
        }

    def getCounter(self, key: str) -> int:
        return self.getCounters().get(key, 0)

    def setOption(self, key: str, value: str) -> None:
        logger.info("%s: setOption %s=%r", self.name, key, value)
        loop = asyncio.get_running_loop()
        if key == "status":
            name = value.strip().upper()
            if name not in FbStatus.__members__:
                from thriftpy2.thrift import TApplicationException

                choices = ", ".join(FbStatus.__members__)
                raise TApplicationException(
                    TApplicationException.UNKNOWN, f"status must be one of {choices}, not {value!r}"
                )
            value = name
        elif key == "hang" and value == "1":
            loop.call_soon(self._hang)  # after the reply to this call has been written
        elif key == "crash":
            loop.call_soon(self._crash, value)
        elif key == "spew":
            try:
                count = int(value)
            except ValueError:
                count = 0
            if count > 0:
                self._spews.put_nowait(count)
        self.options[key] = value

    def getOption(self, key: str) -> str:
        return self.options.get(key, "")

    def getOptions(self) -> dict[str, str]:
        return dict(self.options)

    def getCpuProfile(self, profileDurationInSec: int) -> str:
        return ""

    def aliveSince(self) -> int:
        return self._since

    def reinitialize(self) -> None:
        logger.info("%s: reinitialize: nothing to reload", self.name)

    def shutdown(self) -> None:
        logger.info("%s: shutdown requested over Thrift", self.name)
        self.stopping.set()

    # --- PublisherService ---------------------------------------------------------------------

    def startPublishers(self, dataSourceUrl: str) -> None:
        self.start_publishers_calls += 1
        error = self.options.get("start_publishers_error", "")
        if error or not dataSourceUrl:
            exc = idl.publisher().PublisherServiceException
            raise exc(message=error or "empty data source url")
        self.options["data_source"] = dataSourceUrl
        self.say(f"startPublishers {dataSourceUrl}")

    # --- the demo's own loops -----------------------------------------------------------------

    async def run_ticker(self) -> None:
        """Print ``tick N`` once a second, on a fixed schedule."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            await asyncio.sleep(start + self.ticks + 1 - loop.time())
            self.ticks += 1
            if "data_source" in self.options:
                self.messages += 1
            self.say(f"tick {self.ticks}")

    async def run_spewer(self) -> None:
        """Write the lines each ``spew`` asks for, a chunk at a time."""
        while True:
            count = await self._spews.get()
            for first in range(1, count + 1, _SPEW_CHUNK):
                last = min(first + _SPEW_CHUNK, count + 1)
                self.out.write("".join(f"spew {i}/{count}\n" for i in range(first, last)))
                self.out.flush()
                self.messages += last - first
                await asyncio.sleep(0)  # let calls be answered between chunks

    def _hang(self) -> None:
        self.say("hang: not answering anything any more")
        logger.warning("%s: hanging on purpose", self.name)
        while True:  # a wedged loop: the signal handlers of the loop never run either
            time.sleep(3600)

    def _crash(self, value: str) -> None:
        sig = _signal_named(value)
        self.say(f"crash: {'by ' + sig.name if sig else f'exit status {CRASH_STATUS}'}")
        sys.stderr.flush()
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            time.sleep(0.1)  # a signal whose default is to be ignored (CHLD, WINCH...) lands here
        os._exit(CRASH_STATUS)


def _signal_named(value: str) -> signal.Signals | None:
    name = value.strip().upper()
    if not name or name.isdigit():
        return None
    try:
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except KeyError:
        return None


class _Async:
    """thriftpy2's aio processor awaits every handler method: wrap the plain ones.

    Its processor also drops the connection, with a traceback, on any undeclared exception; a
    refused setOption is logged here instead (the buffered demo just ignores it).
    """

    def __init__(self, handler: object) -> None:
        self._handler = handler

    def __getattr__(self, name: str) -> Callable[..., Awaitable[object]]:
        fn = getattr(self._handler, name)

        async def call(*args: object) -> object:
            from thriftpy2.thrift import TApplicationException

            try:
                return fn(*args)
            except TApplicationException as e:
                logger.warning("%s refused: %s", name, e.message)
                return None

        return call


async def _listen(
    demo: Demo, port: int, transport: Transport, host: str
) -> Callable[[], Awaitable[None]]:
    """Start serving; returns the coroutine function that stops the listener."""
    service = idl.publisher().PublisherService
    if transport == "framed":
        server = ThriftServer(service, demo, name=f"demo {demo.name}")
        await server.start_tcp(host, port)
        return server.close
    from thriftpy2.contrib.aio.rpc import make_server

    loop = asyncio.get_running_loop()
    stock: Any = make_server(
        service, _Async(demo), host=host, port=port, client_timeout=None, loop=loop
    )
    clients: dict[asyncio.Task[Any], Any] = {}

    async def handle(client: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        clients[task] = client
        try:
            await stock.handle(client)
        finally:
            del clients[task]

    # Not stock.serve(): it runs the loop itself (STYLE.md §5.10). Listen and accept instead.
    stock.trans.listen()
    stock.server = await stock.trans.accept(handle)

    async def close() -> None:
        await stock.close()
        # End each connection's reader with EOF, so its task finishes rather than being
        # cancelled at exit (which asyncio's streams report as an error on 3.11).
        for client in clients.values():
            client.close()
        if clients:
            await asyncio.wait(list(clients), timeout=1)

    return close


async def serve(
    demo: Demo, port: int, transport: Transport = "framed", host: str = "127.0.0.1"
) -> None:
    """Serve ``demo`` on host:port and run its loops until ``demo.stopping`` is set."""
    close = await _listen(demo, port, transport, host)
    try:
        demo.say(
            f"demo {demo.name} pid {os.getpid()}: PublisherService on {host}:{port} ({transport})"
        )
        async with asyncio.TaskGroup() as tg:
            loops = [tg.create_task(demo.run_ticker()), tg.create_task(demo.run_spewer())]
            await demo.stopping.wait()
            for task in loops:
                task.cancel()
    finally:
        await close()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pubmon.demo", description="pubmon's demo publisher (see the module doc)."
    )
    parser.add_argument("--pub_port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--name", default="demo", help="what getName answers")
    parser.add_argument("--transport", choices=("framed", "buffered"), default="framed")
    parser.add_argument(
        "--startup_delay", type=float, default=0.0, help="answer STARTING for this many seconds"
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        help="do not serve: steer the demo already serving on --pub_port (e.g. status=WARNING)",
    )
    return parser.parse_args(argv)


async def _steer(port: int, settings: list[str]) -> int:
    from pubmon.errors import RpcError
    from pubmon.thrift import idl
    from pubmon.thrift.server import ThriftClient

    try:
        svc = idl.publisher().PublisherService
        async with await ThriftClient.connect(svc, host="127.0.0.1", port=port, timeout=5) as c:
            for item in settings:
                key, _, value = item.partition("=")
                await c.call("setOption", key, value)
                print(f"{key} = {value!r} on 127.0.0.1:{port}")
    except RpcError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


async def _main(args: argparse.Namespace) -> int:
    demo = Demo(args.name, startup_delay=args.startup_delay)
    _catch_stop_signals(demo, asyncio.get_running_loop())
    try:
        await serve(demo, args.pub_port, args.transport)
    except OSError as e:
        print(f"demo {args.name}: cannot listen on 127.0.0.1:{args.pub_port}: {e}", file=sys.stderr)
        return 1
    demo.say(f"demo {demo.name} stopped")
    return 0


def _catch_stop_signals(demo: Demo, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM and SIGINT set ``demo.stopping``, and stay caught until the process is gone.

    Not ``loop.add_signal_handler``: closing the loop puts back the default action, and a
    supervisor may send the same signal twice (to the leader, then to its group). A second
    SIGTERM landing after the loop closed would turn a clean exit 0 into "killed by SIGTERM";
    ``main()`` ignores both signals once the loop is done, for the same reason.
    """

    def on_signal(signum: int, frame: object) -> None:
        try:
            loop.call_soon_threadsafe(_stop, demo, signal.Signals(signum))
        except RuntimeError:  # the loop is closed: we are on our way out already
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _stop(demo: Demo, sig: signal.Signals) -> None:
    logger.info("%s: %s, stopping", demo.name, sig.name)
    demo.stopping.set()


def main(argv: list[str] | None = None) -> int:
    """``python -m pubmon.demo``: returns the exit status."""
    args = _parse_args(argv)
    if args.set:
        return asyncio.run(_steer(args.pub_port, args.set))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    try:
        return asyncio.run(_main(args))
    finally:
        # Stay deaf to a late duplicate: interpreter shutdown resets caught signals to their
        # default action (exit by the signal) but leaves ignored ones ignored.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


# --- the built-in config of `pubmon demo` -----------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free a moment ago (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml(value: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


DEMO_NAMES = ("quotes", "trades", "news")  # the publishers of demo_config(), in file order
DEMO_DATA_SOURCE = "tcp://upstream.example:1234"  # quotes' data_source


def demo_config(tmpdir: Path, ports: list[int], token_file: Path | None = None) -> str:
    """The TOML text ``pubmon demo`` runs: three demo publishers on ``ports[0:3]``.

    - ``quotes``: framed, with a data_source (it gets startPublishers after every start);
    - ``trades``: framed, reports STARTING for 2 s after each start (start_timeout is 10 s);
    - ``news``: buffered transport, probed with transport = "buffered".

    Each has an fb303 probe (interval 1 s, timeout 0.5 s, failure_threshold 3). Logs go to
    ``tmpdir/logs``, the control socket is ``tmpdir/pubmon.sock``; the monitor listens on
    127.0.0.1:``ports[3]`` when a fourth port is given, else not at all; the HTTP dashboard
    and /metrics on 127.0.0.1:``ports[4]`` when a fifth is given (with ``token_file`` for
    the log views).
    """
    if len(ports) < 3:
        raise ValueError(f"demo_config needs at least 3 ports, got {len(ports)}")
    tmpdir = Path(tmpdir)
    python = sys.executable or "python3"
    listen = f"127.0.0.1:{ports[3]}" if len(ports) > 3 else ""

    def publisher(
        name: str, port: int, *extra: str, transport: str = "framed", data_source: str = ""
    ) -> str:
        # {port} and {name} are left for the config loader to expand.
        argv = [python, "-m", "pubmon.demo", "--pub_port={port}", "--name={name}", *extra]
        argv.append(f"--transport={transport}")
        lines = [
            f"[publisher.{name}]",
            f"command = [{', '.join(_toml(a) for a in argv)}]",
            f"port = {port}",
            "start_timeout = 10",
            "stop_timeout = 5",
            "backoff = { initial = 0.5, max = 10, factor = 2, jitter = 0.1, reset_after = 30 }",
            *([f"data_source = {_toml(data_source)}"] if data_source else []),
            "",
            f"[publisher.{name}.probe]",
            'kind = "fb303"',
            "interval = 1",
            "timeout = 0.5",
            "failure_threshold = 3",
            f"transport = {_toml(transport)}",
        ]
        return "\n".join(lines) + "\n"

    quotes, trades, news = DEMO_NAMES
    sections = [
        publisher(quotes, ports[0], data_source=DEMO_DATA_SOURCE),
        publisher(trades, ports[1], "--startup_delay=2"),
        publisher(news, ports[2], transport="buffered"),
    ]
    return (
        "# pubmon demo: three demo publishers (python -m pubmon.demo), steered with setOption.\n"
        "[daemon]\n"
        f"log_dir = {_toml(str(tmpdir / 'logs'))}\n"
        "shutdown_timeout = 15\n"
        "\n[control]\n"
        f"socket = {_toml(str(tmpdir / 'pubmon.sock'))}\n"
        "\n[monitor]\n"
        f"listen = {_toml(listen)}\n"
        + (f"\n[http]\nlisten = {_toml(f'127.0.0.1:{ports[4]}')}\n" if len(ports) > 4 else "")
        + (f"token_file = {_toml(str(token_file))}\n" if token_file and len(ports) > 4 else "")
        + "\n"
        + "\n".join(sections)
    )


if __name__ == "__main__":
    sys.exit(main())

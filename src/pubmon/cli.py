"""pubmon: an asyncio process supervisor for publishers.

Usage:
  pubmon daemon --config FILE [--debug]
  pubmon demo [--debug]
  pubmon check-config FILE
  pubmon status [NAME...] [--json] [options]
  pubmon start NAME... [options]
  pubmon stop NAME... [options]
  pubmon restart NAME... [options]
  pubmon reload [options]
  pubmon tail NAME [-n N] [-f] [options]
  pubmon counters [PREFIX] [options]
  pubmon -h | --help
  pubmon --version

Options:
  --config FILE    The daemon's TOML config.
  --debug          asyncio debug mode and DEBUG logging (also PYTHONASYNCIODEBUG=1).
  --socket PATH    The daemon's control socket [default: /run/pubmon/pubmon.sock].
  --host H         Talk to the TCP monitor listener on this host instead of the socket.
  --port P         The TCP monitor listener's port [default: 9090].
  --timeout S      Seconds to wait for the daemon's answer [default: 30].
  --json           Machine-readable output.
  -n N             How many lines of history to show first [default: 10].
  -f               Follow: keep printing new lines (across restarts) until Ctrl-C.
  -h --help        Show this text.
  --version        Show the version.

Exit codes: 0 ok, 1 error, 2 bad config, 3 daemon cannot start, 4 daemon not reachable,
5 permission denied, 6 unknown publisher, 7 invalid state for the request.
"""

from __future__ import annotations

__all__ = ["main"]

import asyncio
import logging
import os
import sys

from docopt import docopt

from . import __version__
from .errors import ConfigError, StartupError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 3
EXIT_NOT_RUNNING = 4
EXIT_DENIED = 5
EXIT_UNKNOWN = 6
EXIT_INVALID_STATE = 7


def setup_logging(debug: bool) -> None:
    # Under systemd the journal stamps every line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO, format=fmt, force=True
    )


def _run_daemon(config_path: str, debug: bool) -> int:
    from .config import load_config
    from .daemon import Daemon

    debug = debug or bool(os.environ.get("PYTHONASYNCIODEBUG"))
    setup_logging(debug)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(Daemon(config).run(), debug=debug)
    except StartupError as exc:
        print(f"pubmon: {exc}", file=sys.stderr)
        return EXIT_STARTUP


def main(argv: list[str] | None = None) -> int:
    args = docopt(__doc__, argv=argv, version=f"pubmon {__version__}")
    if args["daemon"]:
        return _run_daemon(args["--config"], bool(args["--debug"]))
    if args["check-config"]:
        from .config import check_config_main

        return check_config_main(args["FILE"])
    print("pubmon: this command is not available yet", file=sys.stderr)
    return EXIT_ERROR

"""pubmon: an asyncio process supervisor for publishers.

The public surface, imported lazily so that `pubmon status` does not pay for asyncio::

    from pubmon import Supervisor, load_config
    async with Supervisor(load_config("pubmon.toml")) as sup:
        await sup.wait_settled()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pubmon._version import __version__

_EXPORTS = {
    "Config": "config.model",
    "ConfigError": "errors",
    "Daemon": "daemon.daemon",
    "Health": "core.lifecycle",
    "InvalidState": "errors",
    "PublisherSnapshot": "core.publisher",
    "PublisherState": "core.lifecycle",
    "PubmonError": "errors",
    "SpawnError": "errors",
    "Supervisor": "core.supervisor",
    "UnknownPublisher": "errors",
    "load_config": "config.load",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from pubmon.config.load import load_config as load_config
    from pubmon.config.model import Config as Config
    from pubmon.core.lifecycle import Health as Health
    from pubmon.core.lifecycle import PublisherState as PublisherState
    from pubmon.core.publisher import PublisherSnapshot as PublisherSnapshot
    from pubmon.core.supervisor import Supervisor as Supervisor
    from pubmon.daemon.daemon import Daemon as Daemon
    from pubmon.errors import ConfigError as ConfigError
    from pubmon.errors import InvalidState as InvalidState
    from pubmon.errors import PubmonError as PubmonError
    from pubmon.errors import SpawnError as SpawnError
    from pubmon.errors import UnknownPublisher as UnknownPublisher


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pubmon' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)

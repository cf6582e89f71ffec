"""pubmon: an asyncio process supervisor for publishers.

The public surface, imported lazily so that `pubmon status` does not pay for asyncio::

    from pubmon import Supervisor, load_config
    async with Supervisor(load_config("pubmon.toml")) as sup:
        await sup.wait_settled()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "config",
    "ConfigError": "errors",
    "Daemon": "daemon",
    "Health": "lifecycle",
    "InvalidState": "errors",
    "PublisherSnapshot": "publisher",
    "PublisherState": "lifecycle",
    "PubmonError": "errors",
    "SpawnError": "errors",
    "Supervisor": "supervisor",
    "UnknownPublisher": "errors",
    "load_config": "config",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .config import Config as Config
    from .config import load_config as load_config
    from .daemon import Daemon as Daemon
    from .errors import ConfigError as ConfigError
    from .errors import InvalidState as InvalidState
    from .errors import PubmonError as PubmonError
    from .errors import SpawnError as SpawnError
    from .errors import UnknownPublisher as UnknownPublisher
    from .lifecycle import Health as Health
    from .lifecycle import PublisherState as PublisherState
    from .publisher import PublisherSnapshot as PublisherSnapshot
    from .supervisor import Supervisor as Supervisor


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pubmon' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)

"""pubmon: an asyncio process supervisor for publishers."""

from __future__ import annotations

__version__ = "0.1.0"

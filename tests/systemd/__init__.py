"""The systemd test harness: a real systemd 252+ booted in private namespaces (see harness.py)."""

from .harness import HarnessError, NestedSystemd, cannot_boot_reason, wait_for

__all__ = ["HarnessError", "NestedSystemd", "cannot_boot_reason", "wait_for"]

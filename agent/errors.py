"""Exceptions raised by the agent package.

Every message says what was wrong and what to do about it. The tree::

    AgentError
    ├── TrustStoreError       the trusted state on disk is missing, unreadable or corrupt
    └── BundleRejectedError   a bundle failed verification; ``reason`` names the check
"""

from __future__ import annotations

__all__ = ["AgentError", "BundleRejectedError", "TrustStoreError"]


class AgentError(Exception):
    """Root of every error the agent package raises on purpose."""


class TrustStoreError(AgentError):
    """The trusted state on disk is missing, unreadable or corrupt."""


class BundleRejectedError(AgentError):
    """A bundle failed verification. ``reason`` is the bundle error's class name
    (e.g. ``"RollbackError"``), stable enough to report to the fleet server."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason

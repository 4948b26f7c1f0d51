"""Exceptions raised by the agent package.

Every message says what was wrong and what to do about it. The tree::

    AgentError
    └── (subclasses are added next to the concept they belong to)
"""

from __future__ import annotations

__all__ = ["AgentError"]


class AgentError(Exception):
    """Root of every error the agent package raises on purpose."""

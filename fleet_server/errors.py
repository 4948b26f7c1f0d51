"""Exceptions raised by the fleet_server package.

Every message says what was wrong and what to do about it. The tree::

    FleetError
    └── (subclasses are added next to the concept they belong to)
"""

from __future__ import annotations

__all__ = ["FleetError"]


class FleetError(Exception):
    """Root of every error the fleet_server package raises on purpose."""

"""A unit's place in [0, 1) by hash: the same on every machine, independent per scope.

Rollout plans (which devices each step takes) and experiments (which arm a device or a
client key gets) both need a choice that is a pure function of who is chosen and for what:
the server, a device and a test compute it alike without talking, and a restart changes
nothing. SHA-256 of ``scope/unit``, its first 8 bytes read as a fraction of 2**64: uniform
enough for any split, and two scopes (two rollouts, two experiments) split the same units
independently.
"""

from __future__ import annotations

import hashlib

__all__ = ["unit_hash"]


def unit_hash(scope: str, unit: str) -> float:
    """``unit``'s place in [0, 1) within ``scope``: SHA-256 of ``scope/unit``."""
    digest = hashlib.sha256(f"{scope}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64

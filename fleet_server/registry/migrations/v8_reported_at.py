"""Schema v8: the time of each device's stored report by the device's own clock (issue 16).

- ``devices.reported_device_at``: the ``at`` of the stored report (``devices.reported``),
  which the device stamped with its own clock; NULL when no report is stored. The reorder
  check (``registry/messages.py``, ``is_overtaken``) compares a new report's ``at`` with it
  in the batch's one locked read of the devices, instead of parsing the stored JSON.

Existing reports are parsed once here for their ``at``; one that does not parse (or has no
number there) leaves NULL, which the reorder check takes as "nothing to be overtaken by".
"""

from __future__ import annotations

import json
import math

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Add the column and fill it from the stored reports."""
    tx.run("ALTER TABLE devices ADD COLUMN reported_device_at DOUBLE PRECISION")
    rows = []
    for device_id, text in tx.all("SELECT id, reported FROM devices "
                                  "WHERE reported_at IS NOT NULL ORDER BY id"):
        at = _at(text)
        if at is not None:
            rows.append((at, device_id))
    tx.many("UPDATE devices SET reported_device_at = ? WHERE id = ?", rows)


def _at(text: str) -> float | None:
    try:
        value = json.loads(text).get("at")
    except (ValueError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None

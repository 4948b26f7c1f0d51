"""The event log: append-only, read in id order from the last id seen."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fleet_server.errors import RegistryError

from .database import Tx
from .records import EventRecord
from .values import check_label, dumps

__all__ = ["EVENT_INSERT", "add_event", "list_events", "log_event"]

#: The one INSERT of an event; callers that log many events at once use it with Tx.many.
EVENT_INSERT = "INSERT INTO events (at, device_id, kind, detail) VALUES (?, ?, ?, ?)"


def log_event(tx: Tx, now: float, device: str | None, kind: str,
              detail: Mapping[str, Any]) -> None:
    """Record one of the registry's own events, in the transaction of the change it logs."""
    tx.run(EVENT_INSERT, (now, device, kind, dumps(detail, "event detail")))


def add_event(tx: Tx, now: float, kind: str, device: str | None,
              detail: Mapping[str, Any] | None, *, seq: int | None = None) -> int:
    """Append an event from outside (an agent's, for example); returns its id. An event the
    device numbered (``seq``) is stored once per (device, seq): a re-send returns 0."""
    check_label("event kind", kind)
    text = dumps(detail or {}, "event detail")
    if seq is not None and not tx.run("INSERT INTO device_event_seqs (device_id, seq) "
                                      "VALUES (?, ?) ON CONFLICT (device_id, seq) DO NOTHING",
                                      (device, seq)):
        return 0
    return tx.insert_id(EVENT_INSERT, (now, device, kind, text))


def list_events(tx: Tx, since_id: int, device: str | None, limit: int,
                newest: bool = False) -> list[EventRecord]:
    """Events with id greater than ``since_id``, in id order, at most ``limit``: the oldest
    of them, or with ``newest`` the newest."""
    if limit < 1:
        raise RegistryError(f"limit must be at least 1, got {limit}")
    where = "WHERE id > ?" + (" AND device_id = ?" if device is not None else "")
    params = (since_id, device) if device is not None else (since_id,)
    rows = tx.all(f"SELECT id, at, device_id, kind, detail FROM events {where} "
                  f"ORDER BY id {'DESC' if newest else ''} LIMIT ?", (*params, limit))
    found = [EventRecord(int(r[0]), float(r[1]), r[2], str(r[3]), json.loads(r[4]))
             for r in rows]
    return found[::-1] if newest else found

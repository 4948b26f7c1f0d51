"""Telemetry samples: read per device, pruned by age (stored once per (device, seq) by
:mod:`.device_messages`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from protocol.messages import Telemetry

from .database import Tx
from .records import TelemetryRecord

#: Device ids per IN (...) list: well below SQLite's host parameter limit.
_IN_CHUNK = 500

__all__ = ["latest_telemetry", "list_telemetry", "prune_telemetry",
           "telemetry_since"]


def list_telemetry(tx: Tx, device_id: str, since_seq: int, limit: int) -> list[TelemetryRecord]:
    """One device's samples with seq greater than ``since_seq``, in seq order."""
    rows = tx.all("SELECT device_id, seq, at, payload FROM telemetry "
                  "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                  (device_id, since_seq, limit))
    return [_record(r) for r in rows]


def latest_telemetry(tx: Tx, group: str | None) -> dict[str, TelemetryRecord]:
    """Each device's newest sample (highest seq), by device id; optionally one group's."""
    where = "" if group is None else (
        " AND t.device_id IN (SELECT id FROM devices WHERE group_name = ?)")
    rows = tx.all("SELECT t.device_id, t.seq, t.at, t.payload FROM telemetry t "
                  "WHERE t.seq = (SELECT MAX(seq) FROM telemetry m "
                  f"WHERE m.device_id = t.device_id){where} ORDER BY t.device_id",
                  () if group is None else (group,))
    return {r[0]: _record(r) for r in rows}


def telemetry_since(tx: Tx, device_ids: Sequence[str], since: float,
                    limit: int) -> list[TelemetryRecord]:
    """Samples of these devices taken at or after ``since``, by device then seq, at most
    ``limit`` (the newest are cut)."""
    found: list[TelemetryRecord] = []
    wanted = sorted(set(device_ids))
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        found += [_record(r) for r in tx.all(
            "SELECT device_id, seq, at, payload FROM telemetry "
            f"WHERE at >= ? AND device_id IN ({marks}) ORDER BY device_id, seq LIMIT ?",
            (since, *chunk, limit - len(found)))]
        if len(found) >= limit:
            break
    return found


def prune_telemetry(tx: Tx, before: float) -> int:
    """Delete samples taken before ``before`` (Unix time); returns how many."""
    return tx.run("DELETE FROM telemetry WHERE at < ?", (before,))


def _record(row: tuple[Any, ...]) -> TelemetryRecord:
    return TelemetryRecord(row[0], Telemetry(int(row[1]), float(row[2]), json.loads(row[3])))

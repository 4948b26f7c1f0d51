"""Alert states: one row per (kind, key), changed by :mod:`fleet_server.monitoring.alerts`'
pure transitions, with an ``alert.firing`` / ``alert.resolved`` event in the same
transaction. The row is locked while it changes, so server replicas raising the same alert
together notify once."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fleet_server.monitoring.alerts import FIRING, RESOLVED, Alert, Notice, fire, resolve

from .database import Tx
from .events import log_event
from .values import dumps

__all__ = ["list_alerts", "raise_alert", "resolve_alert"]

_COLUMNS = "kind, alert_key, state, summary, detail, first_at, last_at, raised, resolved_at"


def raise_alert(tx: Tx, now: float, kind: str, key: str, summary: str, *,
                detail: Mapping[str, Any]) -> Notice | None:
    """Raise (kind, key); the notice to send if it started firing."""
    # A placeholder row first (raised 0: never fired), so that the row exists to lock: two
    # replicas raising a new alert at once then take turns, and only the first notifies.
    tx.run("INSERT INTO alerts (kind, alert_key, state, summary, detail, first_at, last_at, "
           "raised) VALUES (?, ?, ?, '', '{}', ?, ?, 0) ON CONFLICT (kind, alert_key) "
           "DO NOTHING", (kind, key, RESOLVED, now, now))
    alert, notice = fire(_load(tx, kind, key), kind, key, summary, detail=detail, now=now)
    _store(tx, alert)
    if notice is not None:
        log_event(tx, now, None, "alert.firing", notice.to_json())
    return notice


def resolve_alert(tx: Tx, now: float, kind: str, key: str) -> Notice | None:
    """Resolve (kind, key); the notice to send if it was firing."""
    current = _load(tx, kind, key)
    alert, notice = resolve(current, now)
    if notice is not None and alert is not None:
        _store(tx, alert)
        log_event(tx, now, None, "alert.resolved", notice.to_json())
    return notice


def list_alerts(tx: Tx, *, firing_only: bool, kind: str | None = None,
                limit: int = 1000) -> list[Alert]:
    """Alerts, the most recently changed first; only the firing ones with ``firing_only``."""
    where, params = ["raised > 0"], []
    if firing_only:
        where.append("state = ?")
        params.append(FIRING)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    clause = f" WHERE {' AND '.join(where)}"
    rows = tx.all(f"SELECT {_COLUMNS} FROM alerts{clause} ORDER BY last_at DESC, kind, "
                  "alert_key LIMIT ?", (*params, limit))
    return [_alert(r) for r in rows]


def _load(tx: Tx, kind: str, key: str) -> Alert | None:
    """The alert, its row locked; None if it never fired (no row, or the placeholder)."""
    row = tx.one(f"SELECT {_COLUMNS} FROM alerts WHERE kind = ? AND alert_key = ?"
                 f"{tx.dialect.for_update}", (kind, key))
    return None if row is None or int(row[7]) == 0 else _alert(row)


def _store(tx: Tx, alert: Alert) -> None:
    values = (alert.state, alert.summary, dumps(alert.detail, "alert detail"), alert.first_at,
              alert.last_at, alert.raised, alert.resolved_at)
    tx.run("UPDATE alerts SET state = ?, summary = ?, detail = ?, first_at = ?, last_at = ?, "
           "raised = ?, resolved_at = ? WHERE kind = ? AND alert_key = ?",
           (*values, alert.kind, alert.key))


def _alert(row: tuple[Any, ...]) -> Alert:
    return Alert(kind=row[0], key=row[1], state=row[2], summary=row[3],
                 detail=json.loads(row[4]), first_at=float(row[5]), last_at=float(row[6]),
                 raised=int(row[7]), resolved_at=None if row[8] is None else float(row[8]))

"""Rollouts as stored: one row each, the controller's state as JSON, saved by revision."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fleet_server.errors import RegistryError

from .database import Tx
from .values import check_label, dumps

__all__ = ["RolloutRecord", "list_rollouts", "load_rollout", "save_rollout"]


@dataclass(frozen=True)
class RolloutRecord:
    """A stored rollout: ``state`` is the controller's state as JSON."""

    id: str
    model: str
    status: str
    created_at: float
    updated_at: float
    revision: int
    state: Mapping[str, Any]


_COLUMNS = "id, model, status, created_at, updated_at, revision, state"


def _record(row: tuple[Any, ...]) -> RolloutRecord:
    return RolloutRecord(row[0], row[1], row[2], float(row[3]), float(row[4]), int(row[5]),
                         json.loads(row[6]))


def save_rollout(tx: Tx, record: RolloutRecord) -> None:
    """Store ``record`` (revision 1: a new rollout; N: the one read at N - 1). RegistryError
    if the id exists already, or the stored revision is not N - 1 (another server moved
    the rollout since it was read: read it again)."""
    check_label("rollout id", record.id)
    text = dumps(record.state, "rollout state")
    if record.revision == 1:
        if tx.one("SELECT 1 FROM rollouts WHERE id = ?", (record.id,)) is not None:
            raise RegistryError(f"rollout {record.id} exists already")
        tx.run(f"INSERT INTO rollouts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (record.id, record.model, record.status, record.created_at,
                record.updated_at, 1, text))
        return
    if not tx.run("UPDATE rollouts SET status = ?, updated_at = ?, revision = ?, state = ? "
                  "WHERE id = ? AND revision = ?",
                  (record.status, record.updated_at, record.revision, text, record.id,
                   record.revision - 1)):
        raise RegistryError(f"rollout {record.id} changed since it was read (another server "
                            "or command moved it); read it again")


def load_rollout(tx: Tx, rollout_id: str) -> RolloutRecord | None:
    """The rollout, or None."""
    row = tx.one(f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,))
    return None if row is None else _record(row)


def list_rollouts(tx: Tx, statuses: tuple[str, ...] | None, limit: int) -> list[RolloutRecord]:
    """Rollouts, newest first, optionally only those in ``statuses``."""
    where = "" if not statuses else f"WHERE status IN ({', '.join('?' * len(statuses))})"
    rows = tx.all(f"SELECT {_COLUMNS} FROM rollouts {where} ORDER BY created_at DESC, id "
                  "LIMIT ?", (*(statuses or ()), limit))
    return [_record(r) for r in rows]

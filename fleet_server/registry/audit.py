"""The audit log's storage: append under the head's lock, read in order.

The chain itself (hashing, verification) is :mod:`fleet_server.audit`.
"""

from __future__ import annotations

import json
from dataclasses import replace

from fleet_server.audit import GENESIS, AuditEntry, entry_hash
from fleet_server.errors import RegistryError

from .database import Tx
from .values import check_label, dumps

__all__ = ["append_audit", "audit_head", "last_audit", "list_audit"]

#: Bounds on what an entry holds: it is written on every operator action.
_MAX_TEXT = 1000


def append_audit(tx: Tx, draft: AuditEntry) -> AuditEntry:
    """Append ``draft`` (its time, actor, action, target, reason and detail) as the next
    entry, numbered and chained to the newest; returns the entry as stored."""
    check_label("audit action", draft.action)
    for what, text in (("actor", draft.actor), ("target", draft.target),
                       ("reason", draft.reason)):
        if not isinstance(text, str) or len(text) > _MAX_TEXT:
            raise RegistryError(f"audit {what} must be text of at most {_MAX_TEXT} characters")
    # The head row's lock orders concurrent appends (several servers on PostgreSQL).
    row = tx.one(f"SELECT seq, hash FROM audit_head WHERE id = 1{tx.dialect.for_update}")
    seq, prev = (0, GENESIS) if row is None else (int(row[0]), str(row[1]))
    text = dumps(draft.detail, "audit detail")
    entry = replace(draft, seq=seq + 1, detail=json.loads(text), prev_hash=prev)
    entry = replace(entry, hash=entry_hash(entry))
    tx.run("INSERT INTO audit_log (seq, at, actor, action, target, reason, detail, prev_hash, "
           "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
           (entry.seq, entry.at, entry.actor, entry.action, entry.target, entry.reason, text,
            prev, entry.hash))
    if row is None:
        tx.run("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)",
               (entry.seq, entry.hash))
    else:
        tx.run("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (entry.seq, entry.hash))
    return entry


def list_audit(tx: Tx, since_seq: int, limit: int) -> list[AuditEntry]:
    """Entries after ``since_seq`` in stored (seq) order, at most ``limit``."""
    rows = tx.all("SELECT seq, at, actor, action, target, reason, detail, prev_hash, hash "
                  "FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (since_seq, limit))
    return [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6]),
                       r[7], r[8]) for r in rows]


def last_audit(tx: Tx, action: str) -> AuditEntry | None:
    """The newest entry of ``action``, or None."""
    row = tx.one("SELECT MAX(seq) FROM audit_log WHERE action = ?", (action,))
    if row is None or row[0] is None:
        return None
    found = list_audit(tx, int(row[0]) - 1, 1)
    return found[0] if found else None


def audit_head(tx: Tx) -> tuple[int, str]:
    """(entries appended, hash of the newest); (0, GENESIS) for an empty log."""
    row = tx.one("SELECT seq, hash FROM audit_head WHERE id = 1")
    return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))

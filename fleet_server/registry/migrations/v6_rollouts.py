"""Schema v6: rollouts, the audit log, and desired models that carry a shadow candidate or
a share of requests to compare with the previous version (issue 14).

- ``desired_models.extras``: JSON of what a desired model carries beyond its bundle
  (``{"compare_previous": 0.1}``, ``{"shadow": {version, bundle_sha256, size,
  sample_rate}}``); NULL for a plain one, as every row before.
- ``rollouts``: one row per rollout; ``state`` is the controller's state as JSON
  (``fleet_server.rollouts.model.state_to_json``), ``revision`` counts its saves (a save
  names the revision it read: two servers cannot both move one rollout).
- ``audit_log``: append-only, hash-chained (``hash`` covers the entry and ``prev_hash``);
  ``audit_head`` is its one-row head (count and last hash), locked by every append so
  concurrent appends chain in one order, and so that removing the newest entries shows.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Add the column and the tables."""
    for statement in (
        "ALTER TABLE desired_models ADD COLUMN extras TEXT",
        """CREATE TABLE IF NOT EXISTS rollouts (
            id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            revision BIGINT NOT NULL,
            state TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS rollouts_status ON rollouts (status, created_at)",
        """CREATE TABLE IF NOT EXISTS audit_log (
            seq BIGINT PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS audit_head (
            id INTEGER PRIMARY KEY,
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL)""",
    ):
        tx.run(statement)

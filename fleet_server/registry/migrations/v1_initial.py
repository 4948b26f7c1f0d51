"""Schema v1: the registry's first layout (edgefleet up to the registry's split).

Kept exactly as v1 created it, so that a new database passes through the same states as one
created back then: never edit a released migration, add the next one instead.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Create the v1 tables. JSON is stored as TEXT on both databases."""
    id_column = tx.dialect.id_column
    for statement in (
        """CREATE TABLE IF NOT EXISTS devices (
            id TEXT PRIMARY KEY,
            group_name TEXT NOT NULL,
            profile TEXT NOT NULL,
            cert_fingerprint TEXT NOT NULL,
            enrolled_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION,
            online BOOLEAN NOT NULL,
            desired TEXT NOT NULL,
            reported TEXT NOT NULL,
            reported_at DOUBLE PRECISION)""",
        "CREATE INDEX IF NOT EXISTS devices_group ON devices (group_name)",
        """CREATE TABLE IF NOT EXISTS device_tags (
            device_id TEXT NOT NULL REFERENCES devices (id),
            tag TEXT NOT NULL,
            PRIMARY KEY (device_id, tag))""",
        "CREATE INDEX IF NOT EXISTS device_tags_tag ON device_tags (tag)",
        """CREATE TABLE IF NOT EXISTS enrollment_tokens (
            token_sha256 TEXT PRIMARY KEY,
            group_name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION,
            used_by TEXT)""",
        """CREATE TABLE IF NOT EXISTS bundles (
            sha256 TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            size BIGINT NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (name, version))""",
        f"""CREATE TABLE IF NOT EXISTS desired_history (
            {id_column},
            device_id TEXT NOT NULL REFERENCES devices (id),
            model TEXT NOT NULL,
            previous TEXT,
            at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS desired_history_device "
        "ON desired_history (device_id, model, id)",
        f"""CREATE TABLE IF NOT EXISTS events (
            {id_column},
            at DOUBLE PRECISION NOT NULL,
            device_id TEXT,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS events_device ON events (device_id, id)",
        """CREATE TABLE IF NOT EXISTS telemetry (
            device_id TEXT NOT NULL REFERENCES devices (id),
            seq BIGINT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (device_id, seq))""",
        "CREATE INDEX IF NOT EXISTS telemetry_at ON telemetry (at)",
    ):
        tx.run(statement)

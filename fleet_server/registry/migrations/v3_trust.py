"""Schema v3: what enrollment, encryption and rollback need (issue 9.2, 9.12, 9.13).

- ``devices.encryption_key``: the device's X25519 public key (base64 of 32 bytes),
  registered at enrollment; bundles are encrypted for it. NULL for devices enrolled before.
- ``devices.reset_at``: when the operator reset the device (its certificate revoked, its id
  free for any token); NULL again once it enrolls.
- ``enrollment_tokens.device_id``: the one device id a token was issued for (it may take
  that id over: re-enrollment); NULL for a group's token, which enrolls new ids only.
- ``bundles.metadata_version``: the version of the bundle's TUF timestamp, snapshot and
  targets, which a new release must exceed; 0 for bundles stored before (unknown).
- ``bundles.rollback_of``: for a re-release by rollback, the version it restores.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Add the columns; existing rows get NULL (or 0: metadata version unknown)."""
    for statement in (
        "ALTER TABLE devices ADD COLUMN encryption_key TEXT",
        "ALTER TABLE devices ADD COLUMN reset_at DOUBLE PRECISION",
        "ALTER TABLE enrollment_tokens ADD COLUMN device_id TEXT",
        "ALTER TABLE bundles ADD COLUMN metadata_version BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE bundles ADD COLUMN rollback_of BIGINT",
    ):
        tx.run(statement)

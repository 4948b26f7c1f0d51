"""Schema v4: delta bundles (issue 18).

``bundle_deltas``: a stored delta bundle (docs/bundle-format.md §8) of the full bundle
``bundle_sha256``, carrying the deltas from its model's ``base_version``; the blob is
``path``, named by its content hash like bundles. One per full bundle and base version.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Create the table."""
    tx.run("""CREATE TABLE IF NOT EXISTS bundle_deltas (
            sha256 TEXT PRIMARY KEY,
            bundle_sha256 TEXT NOT NULL REFERENCES bundles(sha256),
            base_version BIGINT NOT NULL,
            size BIGINT NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (bundle_sha256, base_version))""")

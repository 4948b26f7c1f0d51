"""Delta bundles: for a stored full bundle, the bundles carrying its deltas from earlier
versions (docs/bundle-format.md §8). Their bytes live in the bundle store beside the full
bundles; a row is written only once the file is on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet_server.errors import RegistryError

from .bundles import require_bundle
from .database import Tx
from .events import log_event
from .records import DeltaRecord

__all__ = ["deltas_of", "get_delta", "record_delta"]

_COLUMNS = "sha256, bundle_sha256, base_version, size, path, created_at"


def record_delta(tx: Tx, now: float, sha: str, bundle_sha256: str, base_version: int, *,
                 size: int, path: Path) -> DeltaRecord:
    """Record the delta bundle saved at ``path`` (the same bytes again: their record).
    RegistryError if the full bundle is not stored, or has another delta from that version."""
    bundle = require_bundle(tx, bundle_sha256)
    if not 1 <= base_version < bundle.version:
        raise RegistryError(f"a delta of {bundle.name} v{bundle.version} must build on an "
                            f"earlier version, not v{base_version}")
    for row in tx.all(f"SELECT {_COLUMNS} FROM bundle_deltas WHERE sha256 = ? OR "
                      "(bundle_sha256 = ? AND base_version = ?)",
                      (sha, bundle_sha256, base_version)):
        other = _record(row)
        if other.sha256 == sha and other.bundle_sha256 == bundle_sha256:
            return other
        raise RegistryError(f"{bundle.name} v{bundle.version} already has another delta "
                            f"from v{base_version} (sha256 {other.sha256[:12]}...); deltas "
                            "of a release are immutable")
    tx.run(f"INSERT INTO bundle_deltas ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
           (sha, bundle_sha256, base_version, size, str(path), now))
    log_event(tx, now, None, "bundle.delta_stored",
              {"sha256": sha, "bundle_sha256": bundle_sha256, "name": bundle.name,
               "version": bundle.version, "base_version": base_version, "size": size})
    return DeltaRecord(sha, bundle_sha256, base_version, size, path, now)


def get_delta(tx: Tx, sha256: str) -> DeltaRecord | None:
    """The delta bundle with this content hash, or None."""
    rows = tx.all(f"SELECT {_COLUMNS} FROM bundle_deltas WHERE sha256 = ?", (sha256.lower(),))
    return _record(rows[0]) if rows else None


def deltas_of(tx: Tx, bundle_sha256: str) -> list[DeltaRecord]:
    """The delta bundles of a full bundle, by base version."""
    rows = tx.all(f"SELECT {_COLUMNS} FROM bundle_deltas WHERE bundle_sha256 = ? "
                  "ORDER BY base_version", (bundle_sha256,))
    return [_record(r) for r in rows]


def _record(row: tuple[Any, ...]) -> DeltaRecord:
    return DeltaRecord(sha256=row[0], bundle_sha256=row[1], base_version=int(row[2]),
                       size=int(row[3]), path=Path(row[4]), created_at=float(row[5]))

"""Bundle records: which bundles the server stores, under which name and version.

The bytes live in the :class:`~.bundle_store.BundleStore`; a row here is written only once
its file is on disk, so a recorded bundle always has its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet_server.errors import RegistryError

from .database import Tx
from .events import log_event
from .records import BundleRecord
from .values import check_label

__all__ = ["check_bundle", "find_bundle", "get_bundle", "list_bundles", "record_bundle",
           "require_bundle"]

_COLUMNS = "sha256, name, version, size, path, created_at"


def check_bundle(name: str, version: int) -> None:
    """RegistryError unless ``name`` and ``version`` can name a bundle."""
    check_label("bundle name", name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"bundle version must be a positive integer, got {version!r}")


def find_bundle(tx: Tx, sha: str, name: str, version: int) -> BundleRecord | None:
    """The record of these bytes if already stored as this name and version; RegistryError
    if they, or this name and version, are stored otherwise (versions are immutable)."""
    rows = tx.all(f"SELECT {_COLUMNS} FROM bundles WHERE sha256 = ? "
                  "OR (name = ? AND version = ?)", (sha, name, version))
    for row in rows:
        other = _record(row)
        if other.sha256 == sha and (other.name, other.version) == (name, version):
            return other
        if other.sha256 == sha:
            raise RegistryError(f"these bytes are already stored as {other.name} "
                                f"v{other.version}, not {name} v{version}; check the name and "
                                "version given")
        raise RegistryError(f"{name} v{version} is already stored as another bundle "
                            f"(sha256 {other.sha256[:12]}...); versions are immutable, build "
                            f"the new bundle with a higher version")
    return None


def record_bundle(tx: Tx, now: float, sha: str, name: str, version: int, *, size: int,
                  path: Path) -> BundleRecord:
    """Record a bundle whose file is saved at ``path`` (the same bytes again: their record)."""
    existing = find_bundle(tx, sha, name, version)
    if existing is not None:
        return existing
    tx.run("INSERT INTO bundles (sha256, name, version, size, path, created_at) "
           "VALUES (?, ?, ?, ?, ?, ?)", (sha, name, version, size, str(path), now))
    log_event(tx, now, None, "bundle.stored",
              {"sha256": sha, "name": name, "version": version, "size": size})
    return BundleRecord(sha, name, version, size, path, now)


def get_bundle(tx: Tx, sha256: str) -> BundleRecord | None:
    """The bundle with this content hash, or None."""
    rows = tx.all(f"SELECT {_COLUMNS} FROM bundles WHERE sha256 = ?", (sha256.lower(),))
    return _record(rows[0]) if rows else None


def require_bundle(tx: Tx, sha256: str) -> BundleRecord:
    """The bundle with this content hash; RegistryError if none is stored."""
    record = get_bundle(tx, sha256)
    if record is None:
        raise RegistryError(f"no stored bundle has sha256 {sha256!r}; store it first "
                            "(put_bundle) and use the hash it returns")
    return record


def list_bundles(tx: Tx, name: str | None) -> list[BundleRecord]:
    """Stored bundles by name then version, optionally of one model only."""
    where, params = ("WHERE name = ?", (name,)) if name is not None else ("", ())
    rows = tx.all(f"SELECT {_COLUMNS} FROM bundles {where} ORDER BY name, version", params)
    return [_record(r) for r in rows]


def _record(row: tuple[Any, ...]) -> BundleRecord:
    return BundleRecord(sha256=row[0], name=row[1], version=int(row[2]), size=int(row[3]),
                        path=Path(row[4]), created_at=float(row[5]))

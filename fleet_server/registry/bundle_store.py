"""The bundle files the server hands out: one file per bundle, named by its content hash.

The registry records each bundle (name, version, size, the file's path); this store only
keeps the bytes, as ``<directory>/<sha256>.efb``, written durably (temp file, fsync, rename).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from common.atomic import write_atomic
from fleet_server.errors import RegistryError

__all__ = ["BundleStore"]


class BundleStore:
    """A directory of bundle files. With several server replicas it must be storage they all
    see: the registry records absolute paths."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()

    def path_for(self, sha256: str) -> Path:
        """Where this store keeps the bundle with this hash."""
        return self.directory / f"{sha256}.efb"

    def save(self, data: bytes, sha256: str, path: Path) -> None:
        """Make ``path`` hold ``data`` (whose hash is ``sha256``): written unless it already
        holds exactly these bytes, so saving again repairs a missing or damaged file."""
        if _holds(path, sha256):
            return
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise RegistryError(f"cannot write the bundle to {path} ({exc.strerror}); check "
                                "that the blob directory is writable") from exc


def _holds(path: Path, sha256: str) -> bool:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            # hashlib.file_digest would do, but it is Python 3.11+ and we support 3.10.
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return False  # missing or unreadable: written again (and refused then, if it must be)
    return digest.hexdigest() == sha256

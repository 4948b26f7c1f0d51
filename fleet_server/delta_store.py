"""Storing uploaded delta bundles, and the deltas of each release at hand for every
desired-state message.

A delta bundle is accepted only as part of a release the server stores: after the usual
verification against the fleet's root, its manifest must be byte for byte the manifest of
the stored full bundle of that name and version (so both came from one signing; the
deltas' sha256, and the full artifacts' the device checks its rebuild against, are in it).
"""

from __future__ import annotations

import threading

from bundle.errors import BundleError
from bundle.signing import read_contents
from bundle.trust import VerifiedBundle

from .errors import RegistryError
from .registry import DeltaRecord, Registry

__all__ = ["DeltaStore"]


class DeltaStore:
    """The registry's delta bundles, cached per full bundle (thread-safe; deltas of a
    stored release only ever get added, through :meth:`add`)."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._cache: dict[str, list[DeltaRecord]] = {}
        self._lock = threading.Lock()

    def add(self, data: bytes, verified: VerifiedBundle) -> DeltaRecord:
        """Store the verified delta bundle ``data`` with the full bundle of its release.
        RegistryError if that full bundle is not stored (upload it first) or its manifest
        differs (another build of the same version)."""
        manifest = verified.manifest
        assert verified.delta_base is not None, "a delta bundle"
        full = next((b for b in self._registry.list_bundles(manifest.name)
                     if b.version == manifest.version), None)
        if full is None:
            raise RegistryError(f"{manifest.name} v{manifest.version} is not stored; upload "
                                "its full bundle before its delta bundles")
        try:
            stored = read_contents(full.path, artifacts=False).manifest_sha256
        except (OSError, BundleError) as exc:
            raise RegistryError(f"cannot read the stored {manifest.name} v{manifest.version} "
                                f"({exc}); upload its full bundle again") from exc
        if stored != verified.manifest_sha256:
            raise RegistryError(f"this delta bundle of {manifest.name} v{manifest.version} "
                                "comes from another build than the stored full bundle; "
                                "upload the delta bundles written with that full bundle")
        record = self._registry.put_delta(data, full.sha256, verified.delta_base)
        with self._lock:
            self._cache.pop(full.sha256, None)
        return record

    def of(self, bundle_sha256: str) -> list[DeltaRecord]:
        """The delta bundles of the full bundle ``bundle_sha256``."""
        with self._lock:
            cached = self._cache.get(bundle_sha256)
        if cached is None:
            cached = self._registry.deltas_of(bundle_sha256)
            with self._lock:
                self._cache[bundle_sha256] = cached
        return cached

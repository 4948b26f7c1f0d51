"""Releases: which versions come next, what devices would refuse, and the re-releases the
server signs itself.

A device never accepts a model version lower than one it trusted, nor TUF metadata older
than what it trusted (docs/security.md). So:

- **Versions only go up**, across the operator's builds (``fleet bundle build``, counting in
  ``KEYS/repository/state.json``) and the server's re-releases. The registry knows the
  model and metadata version of every stored bundle; :meth:`Releaser.next_versions` takes
  the higher of the registry's and the key store's and adds one, and records what it used
  in the key store, so a build from the same keys directory continues above it.
  ``fleet bundle build --data DIR`` asks the server first (``GET /api/bundles``) when it
  builds from a copy of the keys elsewhere.
- **A publish devices would refuse is refused first** (:func:`check_publishable`): a version
  lower than one a selected device was given or runs, or metadata older than a selected
  device trusts. The message says what to do instead.
- **A rollback is a re-release** (:meth:`Releaser.rerelease`): the earlier bundle's contents
  under the next version and fresh metadata, signed here with the online keys of
  ``fleet serve --keys KEYS`` (``KEYS/online``), with ``rollback_of`` in the manifest.
  Encrypting a stored bundle for recipients at publish time is one too.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bundle.errors import BundleError
from bundle.signing import rerelease_bundle
from bundle.trust import TrustedState, verify_bundle

from .errors import KeyStoreError, ReleaseError
from .keys import KeyStore, RepositoryState
from .registry import BundleRecord, DeviceModels, Registry

__all__ = ["Releaser", "check_publishable"]

log = logging.getLogger(__name__)

_ONLINE = ("targets", "snapshot", "timestamp")


def check_publishable(bundle: BundleRecord, devices: Sequence[DeviceModels],
                      bundle_of: Callable[[str], BundleRecord | None]) -> None:
    """ReleaseError if any of ``devices`` would refuse ``bundle`` (pure: ``bundle_of`` looks
    up stored bundles by sha256, once per bundle however many devices name it)."""
    bundle_of = functools.cache(bundle_of)
    for device in devices:
        have = _versions_of(device, bundle.name)
        if have and bundle.version < max(have):
            raise ReleaseError(
                f"{bundle.name} v{bundle.version} is older than v{max(have)}, which "
                f"{device.id} has (desired or running): devices refuse older versions "
                f"(rollback protection), so nothing was published. To go back to an earlier "
                f"version, use `fleet rollback` (it re-releases it as a new version), or build "
                f"the model again with a higher --version")
        trusted = [b for b in map(bundle_of, _bundles_of(device)) if b is not None]
        newest = max(trusted, key=lambda b: b.metadata_version, default=None)
        if (bundle.metadata_version and newest is not None
                and bundle.metadata_version < newest.metadata_version):
            raise ReleaseError(
                f"{bundle.name} v{bundle.version} carries metadata v{bundle.metadata_version}, "
                f"older than v{newest.metadata_version} that {device.id} already trusts (from "
                f"{newest.name} v{newest.version}): devices would refuse it as a replay "
                f"(freeze protection), so nothing was published. Build it again (a new build "
                f"gets newer metadata)")


def _versions_of(device: DeviceModels, model: str) -> list[int]:
    """Versions of ``model`` the device is asked to run or reports running."""
    return [m.version for m in (device.desired.get(model), device.running.get(model))
            if m is not None]


def _bundles_of(device: DeviceModels) -> set[str]:
    """Bundles (sha256) the device is asked to run or reports running, of any model."""
    return ({d.bundle_sha256 for d in device.desired.values()}
            | {r.bundle_sha256 for r in device.running.values() if r.bundle_sha256})


class Releaser:
    """Version numbers and server-signed re-releases for one fleet (module docstring)."""

    def __init__(self, registry: Registry, keys_dir: Path, *, valid_days: int = 30,
                 root: Callable[[], bytes]) -> None:
        self._registry = registry
        self._store = KeyStore.at(keys_dir)
        self._valid_days = valid_days
        self._root = root
        # Versions are taken and used under this lock, so two re-releases at once (API
        # threads) never take the same number.
        self._lock = threading.Lock()

    @property
    def can_sign(self) -> bool:
        """Whether the online keys of the current root are in ``KEYS/online``."""
        try:
            for role in _ONLINE:
                self._store.signers(role)
        except KeyStoreError:
            return False
        return True

    def next_versions(self, name: str) -> tuple[int, int]:
        """The next model version of ``name`` and the next metadata version: above
        everything stored and everything the key store counted."""
        stored_model, stored_metadata = self._registry.release_versions(name)
        state = self._state()
        return (max(stored_model, state.models.get(name, 0)) + 1,
                max(stored_metadata, state.metadata_version) + 1)

    def rerelease(self, source: BundleRecord, *, rollback_of: int | None = None,
                  recipients: Sequence[X25519PublicKey] = ()) -> BundleRecord:
        """Sign ``source``'s contents again as the next version of its model, store and
        return the new bundle. ReleaseError if this server holds no online keys."""
        with self._lock:
            try:
                signers = {role: self._store.signers(role) for role in _ONLINE}
                chain = self._store.root_chain()
            except KeyStoreError as exc:
                raise ReleaseError(
                    f"this server cannot sign a re-release of {source.name} v"
                    f"{source.version} ({exc}): give `fleet serve --keys` the keys directory "
                    "with its online keys (KEYS/online), or build the earlier model again "
                    "with a higher --version and publish that") from exc
            version, metadata_version = self.next_versions(source.name)
            expires = (datetime.now(timezone.utc) + timedelta(days=self._valid_days)).replace(
                microsecond=0)
            try:
                data = rerelease_bundle(
                    source.path.read_bytes(), version=version, root_chain=chain,
                    signers=signers, metadata_version=metadata_version, expires=expires,
                    rollback_of=rollback_of, recipients=recipients)
                # Checked as every upload is, against the root devices pin.
                verify_bundle(data, TrustedState(root=self._root()),
                              now=datetime.now(timezone.utc))
            except (OSError, BundleError) as exc:
                raise ReleaseError(f"cannot re-release {source.name} v{source.version} "
                                   f"({exc}); upload it again if its file is damaged") from exc
            record = self._registry.put_bundle(data, source.name, version,
                                               metadata_version=metadata_version,
                                               rollback_of=rollback_of)
            state = self._state()
            try:
                self._store.save_state(RepositoryState(
                    max(state.metadata_version, metadata_version),
                    {**state.models, source.name: max(version,
                                                      state.models.get(source.name, 0))}))
            except KeyStoreError as exc:
                log.warning("re-released %s v%d, but %s; a build from that keys directory "
                            "must then ask the server (--data) for its versions", source.name,
                            version, exc)
        log.info("re-released %s v%d as v%d (metadata v%d)%s", source.name, source.version,
                 version, metadata_version,
                 f", encrypted for {len(recipients)} key(s)" if recipients else "")
        return record

    def _state(self) -> RepositoryState:
        try:
            return self._store.state()
        except KeyStoreError as exc:
            log.warning("%s; counting versions from the registry alone", exc)
            return RepositoryState()

"""The key store: a directory holding the TUF keys and the repository state of one fleet.

Layout (docs/security.md explains the roles)::

    KEYS/
      offline/                 OFFLINE root keys: move to offline storage after `init`
        README.txt
        root-<keyid16>.pem     Ed25519, PKCS#8 PEM, mode 0600
        retired/               root keys replaced by `rotate --role root`
      online/                  keys the server uses for every bundle
        targets-<keyid16>.pem  (and snapshot-, timestamp-), mode 0600
        retired/
      root.json                the current root: pin it on new devices
      repository/
        root_history/N.root.json   every root version; bundles embed the chain
        state.json             last metadata version, last bundle version per model

This module does file I/O only; metadata is made by :mod:`bundle.signing`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from bundle.errors import BundleError
from bundle.signing import make_root, rotate_root, sign_metadata
from common.atomic import write_atomic

from .errors import KeyStoreError

__all__ = ["ROLES", "KeyStore", "RepositoryState", "init_keys", "rotate_keys"]

log = logging.getLogger(__name__)

ROLES = ("root", "targets", "snapshot", "timestamp")
_ONLINE = ("targets", "snapshot", "timestamp")
_OFFLINE_README = """\
OFFLINE ROOT KEYS. Anyone holding a threshold of these keys controls what every device in
the fleet trusts. After `fleet keys init`, copy this directory to offline storage (an
encrypted USB stick in a safe, an HSM) and delete it from the server. Bring it back only
for `fleet keys rotate` (pass --offline-dir).
"""


@dataclass(frozen=True)
class RepositoryState:
    """What the server remembers between builds (``repository/state.json``)."""

    metadata_version: int = 0
    models: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyStore:
    """Paths of one keys directory; ``offline_dir`` may live elsewhere."""

    root_dir: Path
    offline_dir: Path

    @classmethod
    def at(cls, keys_dir: Path, offline_dir: Path | None = None) -> KeyStore:
        """The key store in ``keys_dir`` (offline keys in ``keys_dir/offline`` by default)."""
        return cls(keys_dir, offline_dir or keys_dir / "offline")

    @property
    def online_dir(self) -> Path:
        """Directory of the online (targets, snapshot, timestamp) keys."""
        return self.root_dir / "online"

    @property
    def repository_dir(self) -> Path:
        """Directory of the root history and repository state."""
        return self.root_dir / "repository"

    @property
    def root_path(self) -> Path:
        """The current ``root.json``, the file devices pin."""
        return self.root_dir / "root.json"

    def root_chain(self) -> list[bytes]:
        """Every root version, oldest first."""
        history = self.repository_dir / "root_history"
        try:
            files = sorted(history.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))
            chain = [p.read_bytes() for p in files]
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"cannot read {history} ({exc}); is {self.root_dir} a keys "
                                "directory made by 'fleet keys init'?") from exc
        if not chain:
            raise KeyStoreError(f"no root metadata in {history}; run 'fleet keys init' first")
        return chain

    def current_root(self) -> Root:
        """The current root metadata (last of the chain)."""
        try:
            md: Metadata[Root] = Metadata.from_bytes(self.root_chain()[-1])
        except RepositoryError as exc:
            raise KeyStoreError(f"the current root in {self.repository_dir} does not parse "
                                f"({exc}); restore it from backup") from exc
        return md.signed

    def signers(self, role: str) -> list[Signer]:
        """Signers for ``role`` whose keys the current root authorises for it."""
        keyids = set(self.current_root().roles[role].keyids)
        directory = self.offline_dir if role == "root" else self.online_dir
        found: list[Signer] = [s for s in _load_signers(directory, role)
                               if s.public_key.keyid in keyids]
        if not found:
            where = "--offline-dir" if role == "root" else str(directory)
            raise KeyStoreError(f"no {role} key of the current root found in {directory}; "
                                f"check {where}")
        return found

    def state(self) -> RepositoryState:
        """The repository state; a fresh one if no bundle was built yet."""
        path = self.repository_dir / "state.json"
        if not path.exists():
            return RepositoryState()
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return RepositoryState(int(raw["metadata_version"]),
                                   {str(k): int(v) for k, v in raw["models"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeyStoreError(f"{path} is unreadable ({exc}); restore it from backup") from exc

    def save_state(self, state: RepositoryState) -> None:
        """Persist ``state`` atomically."""
        data = {"metadata_version": state.metadata_version, "models": dict(state.models)}
        try:
            write_atomic(self.repository_dir / "state.json",
                         json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            raise KeyStoreError(f"cannot save {self.repository_dir / 'state.json'} ({exc}); "
                                "the bundle was written but the next build may reuse its "
                                "metadata version: fix and rebuild") from exc


def init_keys(store: KeyStore, *, root_keys: int = 1, root_threshold: int = 1,
              expires_days: int = 365) -> Root:
    """Create keys and root v1 in an empty ``store``; returns the new root."""
    if store.repository_dir.exists() or store.online_dir.exists():
        raise KeyStoreError(f"{store.root_dir} already holds keys; use 'fleet keys rotate' "
                            "or choose an empty directory")
    signers = {"root": [CryptoSigner.generate_ed25519() for _ in range(root_keys)]}
    signers |= {role: [CryptoSigner.generate_ed25519()] for role in _ONLINE}
    try:
        root_md = make_root({role: [s.public_key for s in ss] for role, ss in signers.items()},
                            thresholds={"root": root_threshold}, expires=_days(expires_days))
    except BundleError as exc:
        raise KeyStoreError(str(exc)) from exc
    root_bytes = sign_metadata(root_md, signers["root"])
    try:
        _private_dir(store.offline_dir)
        (store.offline_dir / "README.txt").write_text(_OFFLINE_README, encoding="utf-8")
        _private_dir(store.online_dir)
        for role, ss in signers.items():
            for signer in ss:
                _write_key(store.offline_dir if role == "root" else store.online_dir, role,
                           signer)
        _publish_root(store, root_bytes, 1)
    except OSError as exc:
        raise KeyStoreError(f"cannot write keys to {store.root_dir} ({exc})") from exc
    log.info("created keys and root v1 in %s", store.root_dir)
    root: Root = root_md.signed
    return root


def rotate_keys(store: KeyStore, role: str, *, count: int | None = None,
                threshold: int | None = None, expires_days: int = 365) -> Root:
    """Replace every key of ``role`` with new ones through a new root version.

    The new root is signed by the current root keys, and for a root rotation also by the
    new root keys, so devices can verify it from the root they trust. Old key files move to
    ``retired/`` and are no longer trusted by any device that has seen the new root.
    """
    if role not in ROLES:
        raise KeyStoreError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    current = store.current_root()
    old_signers = store.signers("root")
    if len(old_signers) < current.roles["root"].threshold:
        raise KeyStoreError(f"found {len(old_signers)} root key(s), the current root needs "
                            f"{current.roles['root'].threshold}; check --offline-dir")
    n = count or len(current.roles[role].keyids)
    new_signers = [CryptoSigner.generate_ed25519() for _ in range(n)]
    try:
        new_md = rotate_root(store.root_chain()[-1], role=role,
                             new_keys=[s.public_key for s in new_signers],
                             threshold=threshold, expires=_days(expires_days))
    except BundleError as exc:
        raise KeyStoreError(str(exc)) from exc
    # Root rotation: old keys vouch for the new root, new keys prove they are held.
    vouching: list[Signer] = [*old_signers, *(new_signers if role == "root" else [])]
    root_bytes = sign_metadata(new_md, vouching)
    directory = store.offline_dir if role == "root" else store.online_dir
    old_keyids = set(current.roles[role].keyids)
    try:
        for signer in new_signers:
            _write_key(directory, role, signer)
        _publish_root(store, root_bytes, new_md.signed.version)
        _retire(directory, role, old_keyids)
    except OSError as exc:
        raise KeyStoreError(f"cannot write the rotated keys to {store.root_dir} ({exc})") from exc
    log.info("rotated %s keys: root is now v%d", role, new_md.signed.version)
    rotated: Root = new_md.signed
    return rotated


def _days(n: int) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(days=n)).replace(microsecond=0)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_key(directory: Path, role: str, signer: CryptoSigner) -> None:
    path = directory / f"{role}-{signer.public_key.keyid[:16]}.pem"
    # O_EXCL: never overwrite a key; 0600 from creation, not chmod after.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
        f.flush()
        os.fsync(f.fileno())


def _load_signers(directory: Path, role: str) -> list[CryptoSigner]:
    signers = []
    for path in sorted(directory.glob(f"{role}-*.pem")):
        try:
            signers.append(CryptoSigner(load_pem_private_key(path.read_bytes(), None)))
        except (OSError, ValueError, TypeError) as exc:
            raise KeyStoreError(f"cannot load key {path} ({exc})") from exc
    return signers


def _publish_root(store: KeyStore, root_bytes: bytes, version: int) -> None:
    write_atomic(store.repository_dir / "root_history" / f"{version}.root.json", root_bytes)
    write_atomic(store.root_path, root_bytes)


def _retire(directory: Path, role: str, keyids: set[str]) -> None:
    retired = directory / "retired"
    _private_dir(retired)
    for signer_path in directory.glob(f"{role}-*.pem"):
        if any(signer_path.name == f"{role}-{k[:16]}.pem" for k in keyids):
            signer_path.replace(retired / signer_path.name)



"""Server side: TUF root management and building signed bundles.

Pure functions over python-tuf's Metadata API: keys come in as securesystemslib ``Key`` and
``Signer`` objects, metadata and bundles go out as bytes. Reading key files and keeping the
repository's state on disk is the fleet server's job (``fleet_server.keys``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import SerializationError
from tuf.api.serialization.json import JSONSerializer

from . import crypto
from ._layout import MANIFEST_PATH, METADATA_DIR, ONLINE_ROLES, TARGETS_DIR, TOP_LEVEL_ROLES
from .archive import read_archive, write_archive
from .composite import CompositeDecl
from .delta import make_delta
from .errors import BundleError, SigningError
from .manifest import (
    ArtifactDelta,
    ArtifactVariant,
    Manifest,
    SelfTestCase,
    TensorSpec,
    manifest_from_json,
    manifest_to_json,
)

__all__ = [
    "ArtifactInput",
    "BundleSpec",
    "Contents",
    "DeltaBase",
    "Release",
    "build_bundle",
    "build_release",
    "make_root",
    "read_contents",
    "rerelease_bundle",
    "rotate_root",
    "sign_metadata",
]

@dataclass(frozen=True)
class DeltaBase:
    """The same artifact in an earlier version, to ship a delta from (plaintext bytes)."""

    version: int
    data: bytes


@dataclass(frozen=True)
class ArtifactInput:
    """One artifact to put in a bundle, before hashing (and optional encryption)."""

    file_name: str
    data: bytes
    format: str
    dtype: str
    profile: str | None = None
    #: Earlier versions of this artifact to make deltas from (not with encryption).
    bases: tuple[DeltaBase, ...] = ()


@dataclass(frozen=True)
class Release:
    """One signed release as bundle files: ``full`` carries the artifacts, ``deltas[v]``
    the deltas from version ``v`` instead. All share one manifest and one set of signed
    metadata, which lists every artifact and every delta (docs/bundle-format.md §8)."""

    full: bytes
    deltas: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleSpec:
    """Everything the operator decides about a bundle; digests are computed on build."""

    name: str
    version: int
    profiles: tuple[str, ...]
    artifacts: tuple[ArtifactInput, ...]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    self_test: tuple[SelfTestCase, ...] = ()
    baseline: Mapping[str, Any] = field(default_factory=dict)
    compression_report: Mapping[str, Any] = field(default_factory=dict)
    #: One model name served by several of the artifacts (bundle/composite.py), or None.
    composite: CompositeDecl | None = None


@dataclass(frozen=True)
class Contents:
    """A bundle's manifest (parsed, and its sha256) and stored artifacts by path."""

    manifest: Manifest
    manifest_sha256: str
    artifacts: Mapping[str, bytes]


def read_contents(source: bytes | Path, *, artifacts: bool = True) -> Contents:
    """The manifest and (unless ``artifacts`` is False) the artifacts of a bundle the caller
    trusts (its own build, or one stored after verification): the artifacts are checked
    against the manifest, the signatures are not (they may have expired). SigningError if an
    artifact does not match its manifest."""
    archive = read_archive(source)
    manifest_bytes = archive.read(f"{TARGETS_DIR}/{MANIFEST_PATH}")
    manifest = manifest_from_json(manifest_bytes)
    stored: dict[str, bytes] = {}
    for art in manifest.artifacts if artifacts else ():
        data = archive.read(f"{TARGETS_DIR}/{art.path}")
        if len(data) != art.size or hashlib.sha256(data).hexdigest() != art.sha256:
            raise SigningError(f"{art.path} of {manifest.name} v{manifest.version} does not "
                               "match its manifest; use the original bundle file")
        stored[art.path] = data
    return Contents(manifest, hashlib.sha256(manifest_bytes).hexdigest(), stored)


def make_root(keys: Mapping[str, Sequence[Key]], *, expires: datetime,
              thresholds: Mapping[str, int] | None = None) -> Metadata[Root]:
    """Version 1 of root, delegating each top-level role to ``keys[role]`` (unsigned).

    ``thresholds`` defaults to 1 per role. ``consistent_snapshot`` is off: a bundle holds
    exactly one version of each metadata file, so versioned file names would add nothing.
    """
    root = Root(expires=expires, consistent_snapshot=False)
    for role in TOP_LEVEL_ROLES:
        role_keys = keys.get(role, ())
        threshold = (thresholds or {}).get(role, 1)
        if not 1 <= threshold <= len(role_keys):
            raise SigningError(f"role {role} has {len(role_keys)} key(s) and threshold "
                               f"{threshold}; give at least as many keys as the threshold")
        for key in role_keys:
            root.add_key(key, role)
        root.roles[role].threshold = threshold
    return Metadata(root)


def rotate_root(current: bytes, *, role: str, new_keys: Sequence[Key], expires: datetime,
                threshold: int | None = None) -> Metadata[Root]:
    """The next root version, with ``role`` delegated to ``new_keys`` only (unsigned).

    The old keys of ``role`` are revoked. For a root-key rotation the result must be signed
    by a threshold of the old root keys *and* of the new ones (:func:`sign_metadata` with
    both), which is what lets devices walk the chain from the root they trust.
    """
    if role not in TOP_LEVEL_ROLES:
        raise SigningError(f"unknown role {role!r}; use one of {', '.join(TOP_LEVEL_ROLES)}")
    md = _parse_root(current)
    root = md.signed
    old = Role(list(root.roles[role].keyids), root.roles[role].threshold)
    for keyid in old.keyids:
        root.revoke_key(keyid, role)
    for key in new_keys:
        root.add_key(key, role)
    root.roles[role].threshold = threshold if threshold is not None else old.threshold
    if not 1 <= root.roles[role].threshold <= len(new_keys):
        raise SigningError(f"role {role}: threshold {root.roles[role].threshold} needs at "
                           f"least that many keys, got {len(new_keys)}")
    root.version += 1
    root.expires = expires
    return Metadata(root)


def sign_metadata(md: Metadata[Any], signers: Iterable[Signer]) -> bytes:
    """Sign ``md`` with every signer (replacing older signatures) and serialize it."""
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    try:
        return md.to_bytes(JSONSerializer(compact=True))
    except SerializationError as exc:
        raise SigningError(f"cannot serialize {md.signed.type} metadata: {exc}") from exc


def build_bundle(spec: BundleSpec, *, root_chain: Sequence[bytes],
                 signers: Mapping[str, Sequence[Signer]], metadata_version: int,
                 expires: datetime, recipients: Sequence[X25519PublicKey] = ()) -> bytes:
    """Build and sign a bundle file.

    ``root_chain`` is every root version a device may still trust, oldest first, ending with
    the current root; ``signers`` maps each online role to its signers; ``metadata_version``
    becomes the version of targets, snapshot and timestamp and must exceed the previous
    build's. With ``recipients`` the artifacts are encrypted (see :mod:`bundle.crypto`).
    The signatures are checked against the current root before returning, so a build with
    stale keys fails here instead of on every device.
    """
    return build_release(spec, root_chain=root_chain, signers=signers,
                         metadata_version=metadata_version, expires=expires,
                         recipients=recipients).full


def build_release(spec: BundleSpec, *, root_chain: Sequence[bytes],
                  signers: Mapping[str, Sequence[Signer]], metadata_version: int,
                  expires: datetime, recipients: Sequence[X25519PublicKey] = ()) -> Release:
    """Build and sign a release: the full bundle, and a delta bundle for every base version
    that some artifact's :attr:`ArtifactInput.bases` names (arguments as
    :func:`build_bundle`). A delta bundle holds the deltas from that version of the
    artifacts that have one; the manifest lists each delta with the sha256 of its base, and
    the full artifacts' sha256 that a device checks the rebuilt artifacts against."""
    files = _target_files(spec, recipients)
    manifest = manifest_from_json(files[0][1])
    metadata = _sign_repository(files, root_chain=root_chain, signers=signers,
                                metadata_version=metadata_version, expires=expires)
    data = dict(files)

    def bundle(paths: list[str]) -> bytes:
        return write_archive([*metadata, *((f"{TARGETS_DIR}/{p}", data[p])
                                           for p in [MANIFEST_PATH, *paths])])

    return Release(
        full=bundle([a.path for a in manifest.artifacts]),
        deltas={base: bundle([d.path for a in manifest.artifacts for d in a.deltas
                              if d.base_version == base])
                for base in manifest.delta_bases()})


def rerelease_bundle(source: bytes, *, version: int, root_chain: Sequence[bytes],
                     signers: Mapping[str, Sequence[Signer]], metadata_version: int,
                     expires: datetime, rollback_of: int | None = None,
                     recipients: Sequence[X25519PublicKey] = ()) -> bytes:
    """The contents of the bundle ``source`` released again as model ``version``, under
    fresh metadata (``metadata_version``, ``expires``) signed by ``signers``.

    A rollback is such a re-release (docs/security.md, "Rollback"): devices never accept
    a lower version, so the previous artifacts become current again under a new, higher
    version, with ``rollback_of`` naming the version they came from. Artifacts, self-tests
    and everything else in the manifest are kept byte for byte (encrypted artifacts and
    their key wrap too); with ``recipients`` the artifacts of an unencrypted ``source`` are
    encrypted for them instead.

    ``source`` is trusted as given: the caller vouches for it (the fleet server re-releases
    only bundles it verified at upload and stores under their sha256). Its artifacts are
    still checked against its manifest here, so a damaged file is not signed anew.
    """
    contents = read_contents(source)
    manifest, stored = contents.manifest, contents.artifacts
    if recipients and manifest.key_wrap is not None:
        raise SigningError(f"{manifest.name} v{manifest.version} is encrypted already; "
                           "re-release it as it is, or build it again encrypted for the new "
                           "recipients")
    if recipients:
        files = _target_files(BundleSpec(
            name=manifest.name, version=version, profiles=manifest.profiles,
            artifacts=tuple(ArtifactInput(a.path.removeprefix("artifacts/"), stored[a.path],
                                          a.format, a.dtype, a.profile)
                            for a in manifest.artifacts),
            inputs=manifest.inputs, outputs=manifest.outputs, self_test=manifest.self_test,
            baseline=manifest.baseline, compression_report=manifest.compression_report,
            composite=manifest.composite),
            recipients, rollback_of=rollback_of, unrecognized=manifest.unrecognized)
    else:
        try:
            # Deltas are not carried over: the re-release ships whole artifacts.
            again = replace(manifest, version=version, rollback_of=rollback_of,
                            artifacts=tuple(replace(a, deltas=()) for a in manifest.artifacts))
        except BundleError as exc:
            raise SigningError(f"cannot re-release {manifest.name} v{manifest.version} as "
                               f"v{version}: {exc}") from exc
        files = [(MANIFEST_PATH, manifest_to_json(again)),
                 *((a.path, stored[a.path]) for a in manifest.artifacts)]
    metadata = _sign_repository(files, root_chain=root_chain, signers=signers,
                                metadata_version=metadata_version, expires=expires)
    return write_archive([*metadata, *((f"{TARGETS_DIR}/{p}", d) for p, d in files)])


def _sign_repository(target_files: list[tuple[str, bytes]], *, root_chain: Sequence[bytes],
                     signers: Mapping[str, Sequence[Signer]], metadata_version: int,
                     expires: datetime) -> list[tuple[str, bytes]]:
    """The metadata entries of a bundle file: the whole root chain, then timestamp,
    snapshot and targets of ``metadata_version`` signed by ``signers``, targets listing
    ``target_files``."""
    if not root_chain:
        raise SigningError("root_chain is empty; run 'fleet keys init' first")
    roots = [_parse_root(data) for data in root_chain]
    targets = Targets(version=metadata_version, expires=expires, targets={
        path: TargetFile.from_data(path, data, ["sha256"]) for path, data in target_files})
    snapshot = Snapshot(version=metadata_version, expires=expires,
                        meta={"targets.json": MetaFile(metadata_version)})
    timestamp = Timestamp(version=metadata_version, expires=expires,
                          snapshot_meta=MetaFile(metadata_version))
    signed = {role: sign_metadata(Metadata(payload), signers.get(role, ()))
              for role, payload in zip(ONLINE_ROLES, (targets, snapshot, timestamp),
                                       strict=True)}
    _check_signed(roots[-1].signed, signed)

    entries = [(f"{METADATA_DIR}/{md.signed.version}.root.json", data)
               for md, data in zip(roots, root_chain, strict=True)]
    entries += [(f"{METADATA_DIR}/{role}.json", signed[role])
                for role in ("timestamp", "snapshot", "targets")]
    return entries


def _target_files(spec: BundleSpec, recipients: Sequence[X25519PublicKey], *,
                  rollback_of: int | None = None,
                  unrecognized: Mapping[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """``manifest.json``, the stored artifacts and their deltas, as (TUF target path,
    bytes)."""
    content_key = crypto.new_content_key() if recipients else None
    variants: list[ArtifactVariant] = []
    files: list[tuple[str, bytes]] = []
    for art in spec.artifacts:
        path = f"artifacts/{art.file_name}"
        stored, encryption = art.data, None
        if content_key is not None:
            if art.bases:
                raise SigningError(f"{path}: deltas of encrypted artifacts are not supported; "
                                   "build without --delta-from or without encryption")
            stored, encryption = crypto.encrypt_artifact(content_key, path, art.data)
        deltas = []
        for base in art.bases:
            delta = make_delta(base.data, art.data, art.format)
            deltas.append(ArtifactDelta(
                path=f"{path}.from-v{base.version}.delta", base_version=base.version,
                base_sha256=hashlib.sha256(base.data).hexdigest(),
                sha256=hashlib.sha256(delta).hexdigest(), size=len(delta)))
            files.append((deltas[-1].path, delta))
        variants.append(ArtifactVariant(
            path=path, format=art.format, dtype=art.dtype, profile=art.profile,
            sha256=hashlib.sha256(stored).hexdigest(), size=len(stored),
            encryption=encryption, deltas=tuple(deltas)))
        files.append((path, stored))
    try:
        manifest = Manifest(
            name=spec.name, version=spec.version, profiles=spec.profiles,
            artifacts=tuple(variants), inputs=spec.inputs, outputs=spec.outputs,
            self_test=spec.self_test, baseline=spec.baseline,
            compression_report=spec.compression_report,
            key_wrap=(crypto.wrap_content_key(content_key, recipients)
                      if content_key is not None else None),
            rollback_of=rollback_of, composite=spec.composite,
            unrecognized=unrecognized or {})
    except BundleError as exc:
        raise SigningError(f"invalid bundle contents: {exc}") from exc
    return [(MANIFEST_PATH, manifest_to_json(manifest)), *files]


def _check_signed(root: Root, signed: Mapping[str, bytes]) -> None:
    for role, data in signed.items():
        md: Metadata[Any] = Metadata.from_bytes(data)
        result = root.get_verification_result(role, md.signed_bytes, md.signatures)
        if not result.verified:
            raise SigningError(
                f"{role} metadata has {len(result.signed)} valid signature(s) from keys the "
                f"current root (v{root.version}) trusts, threshold {result.threshold}; use "
                "the online keys of that root or rotate them with 'fleet keys rotate'")


def _parse_root(data: bytes) -> Metadata[Root]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (RepositoryError, ValueError) as exc:
        raise SigningError(f"cannot parse root metadata: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise SigningError(f"expected root metadata, got {md.signed.type}")
    return md

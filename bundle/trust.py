"""Device side: verify a bundle against the device's trusted TUF state.

:func:`verify_bundle` is the whole client workflow for one bundle file. It takes bytes, the
device's :class:`TrustedState` and the current time, and returns a :class:`VerifiedBundle`
(including the updated trusted state to persist) or raises a :class:`~bundle.errors.BundleError`
subclass naming the reason. How it works:

1. :func:`bundle.archive.read_archive` checks the frame checksum and indexes the entries.
   Given a file path rather than bytes, every step below reads the file in bounded blocks:
   a bundle larger than the device's memory verifies in a few megabytes, and
   :meth:`VerifiedBundle.artifact_blocks` streams the chosen artifact out of it again.
2. python-tuf's ``ngclient.Updater`` runs the TUF client workflow (walk the root chain,
   then timestamp, snapshot, targets: signatures, thresholds, versions, expiry) with a
   :class:`~tuf.ngclient.FetcherInterface` that serves the bundle's ``metadata/`` entries, and
   the device's trusted metadata as its local cache. The Updater needs a metadata directory;
   a private temporary one is used, so callers see no I/O. tuf's errors are translated into
   ours with the detail the Updater does not give (which key, which role, which version).
3. python-tuf reads the system clock for expiry and has no public way to pass a time, so
   every trusted role is checked again against ``now``: a device whose clock is unset (no
   RTC) passes a trusted lower bound and still rejects expired metadata, and tests control
   time without patching.
4. Targets (``manifest.json``, then each artifact) are checked against the signed target
   info: size before reading (endless data), then length and sha256 (artifacts hashed block
   by block, not kept).
5. Policy: the manifest must list the device's profile, and its version must not be lower
   than the version of that model the device already trusted (rollback).
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import (
    Signed,
    TargetFile,
    Targets,
)
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from ._layout import MANIFEST_PATH, METADATA_DIR, TARGETS_DIR
from ._tuf_errors import parse_metadata, translate
from .archive import Archive, Limits, read_archive
from .errors import (
    ArtifactMismatchError,
    ExpiredError,
    MalformedBundleError,
    MixAndMatchError,
    OversizeError,
    RollbackError,
    TrustError,
    WrongProfileError,
)
from .manifest import Manifest, manifest_from_json

__all__ = ["InstalledVersion", "TrustedState", "VerifiedBundle", "verify_bundle"]

log = logging.getLogger(__name__)

_SCHEME = "bundle:/"
_METADATA_NAME = re.compile(r"(?:[1-9][0-9]{0,8}\.root|timestamp|snapshot|targets)\.json")
_CHUNK = 64 * 1024
_DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class InstalledVersion:
    """The last version of one model a device trusted, and its manifest's sha256."""

    version: int
    manifest_sha256: str


@dataclass(frozen=True)
class TrustedState:
    """What a device trusts: current TUF metadata (bytes, as signed) and installed versions.

    A fresh device has only the pinned ``root``; the other roles appear after the first
    successful verification.
    """

    root: bytes
    timestamp: bytes | None = None
    snapshot: bytes | None = None
    targets: bytes | None = None
    installed: Mapping[str, InstalledVersion] = field(default_factory=dict)

    def with_installed(self, name: str, version: int, manifest_sha256: str) -> TrustedState:
        """A copy recording that ``version`` of model ``name`` is now trusted."""
        installed = {**self.installed, name: InstalledVersion(version, manifest_sha256)}
        return replace(self, installed=installed)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed every check, and the trusted state to persist afterwards.

    The artifacts stay in the bundle (``archive``): read the one to install with
    :meth:`artifact_blocks`, or all of them with :attr:`artifacts` when they fit in memory.
    """

    manifest: Manifest
    manifest_sha256: str
    archive: Archive
    trusted: TrustedState
    root_version: int
    metadata_version: int
    expires: datetime
    #: For a delta bundle (docs/bundle-format.md §8): the version its deltas build on. It
    #: then carries the deltas from that version instead of the artifacts.
    delta_base: int | None = None

    def artifact_blocks(self, path: str) -> Iterator[bytes]:
        """The stored bytes of artifact (or delta) ``path`` in bounded blocks, checked again
        as they stream against the manifest's (signed) size and sha256, so a bundle file
        changed since verification raises ArtifactMismatchError at the end instead of
        passing."""
        size, sha256 = _targets_of(self.manifest)[path]
        return _checked(self.archive.blocks(f"{TARGETS_DIR}/{path}"), size, sha256,
                        f"{TARGETS_DIR}/{path}")

    @property
    def artifacts(self) -> dict[str, bytes]:
        """Every artifact's (or, in a delta bundle, delta's) stored bytes by path, read
        into memory."""
        return {p: b"".join(self.artifact_blocks(p)) for p in _carried(self.manifest,
                                                                        self.delta_base)}

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``--json`` prints)."""
        m = self.manifest
        return {
            "name": m.name, "version": m.version, "profiles": list(m.profiles),
            "manifest_sha256": self.manifest_sha256, "root_version": self.root_version,
            "metadata_version": self.metadata_version, "delta_base": self.delta_base,
            "expires": f"{self.expires:%Y-%m-%dT%H:%M:%SZ}",
            "artifacts": [{"path": a.path, "format": a.format, "dtype": a.dtype,
                           "profile": a.profile, "size": a.size, "sha256": a.sha256,
                           "encrypted": a.encryption is not None,
                           "deltas": [{"path": d.path, "base_version": d.base_version,
                                       "size": d.size} for d in a.deltas]}
                          for a in m.artifacts],
        }

    def describe(self) -> str:
        """A short human-readable summary, one artifact per line."""
        m = self.manifest
        lines = [f"OK {m.name} v{m.version} for profiles {', '.join(m.profiles)}",
                 f"  trusted root v{self.root_version}, metadata v{self.metadata_version}, "
                 f"expires {self.expires:%Y-%m-%dT%H:%M:%SZ}"]
        lines += [f"  {a.path}  {a.format} {a.dtype} profile={a.profile or 'any'} "
                  f"{a.size} bytes sha256={a.sha256[:16]}"
                  f"{' encrypted' if a.encryption else ''}" for a in m.artifacts]
        return "\n".join(lines)


def verify_bundle(source: bytes | Path, trusted: TrustedState, *, now: datetime,
                  profile: str | None = None, limits: Limits = _DEFAULT_LIMITS) -> VerifiedBundle:
    """Verify the bundle ``source`` (its bytes, or the path of a bundle file, which is then
    read in bounded blocks: its size is checked before anything else) for a device in state
    ``trusted`` at time ``now`` (aware UTC).

    ``profile`` is the device's firmware profile; ``None`` skips that check (server-side
    verification, which has no device). Raises a ``BundleError`` subclass, never anything
    else for bad input (OSError if the file cannot be read).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    archive = read_archive(source, limits)
    _check_metadata_names(archive)
    with tempfile.TemporaryDirectory(prefix="edgefleet-tuf-") as tmp:
        metadata_dir = Path(tmp)
        _seed(metadata_dir, trusted)
        fetcher = _ArchiveFetcher(archive)
        try:
            updater = Updater(str(metadata_dir), _SCHEME + METADATA_DIR + "/",
                              fetcher=fetcher, config=UpdaterConfig(), bootstrap=trusted.root)
        except tuf_errors.RepositoryError as exc:
            raise TrustError(f"the device's trusted root is invalid ({exc}); re-provision "
                             "it with the fleet's root.json") from exc
        try:
            updater.refresh()
            target_infos = _target_infos(updater, archive)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as exc:
            raise translate(exc, fetcher.last, archive, metadata_dir) from exc
        new_state = _read_state(metadata_dir, trusted)
    roles = _check_expiry(new_state, now)

    manifest_bytes = _read_target(archive, target_infos[MANIFEST_PATH])
    manifest = manifest_from_json(manifest_bytes)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    _check_policy(manifest, manifest_sha256, trusted, profile)
    targets = roles["targets"]
    assert isinstance(targets, Targets)  # _check_expiry parsed the targets role
    delta_base = _check_artifacts(archive, manifest, target_infos, targets.targets)
    log.info("bundle %s v%d%s verified (root v%d, metadata v%d)", manifest.name,
             manifest.version, "" if delta_base is None else f" (delta from v{delta_base})",
             roles["root"].version, roles["timestamp"].version)
    return VerifiedBundle(
        manifest=manifest, manifest_sha256=manifest_sha256, archive=archive,
        trusted=new_state, root_version=roles["root"].version,
        metadata_version=roles["timestamp"].version,
        expires=min(md.expires for md in roles.values()), delta_base=delta_base)


class _ArchiveFetcher(FetcherInterface):
    """Serves ``bundle:/NAME`` from the archive's entry NAME; absent entries are a 404."""

    def __init__(self, archive: Archive) -> None:
        self._archive = archive
        self.last = ""

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(_SCHEME)
        self.last = name
        if name not in self._archive.index:
            raise tuf_errors.DownloadHTTPError(f"{name} is not in the bundle", 404)
        # Chunks let tuf stop reading as soon as an entry exceeds its length limit.
        return self._archive.blocks(name, _CHUNK)


def _check_metadata_names(archive: Archive) -> None:
    for name in archive.index:
        top, _, rest = name.partition("/")
        if top == METADATA_DIR and not _METADATA_NAME.fullmatch(rest):
            raise MalformedBundleError(f"unexpected metadata entry {name!r}; bundles carry "
                                       "only N.root.json, timestamp, snapshot and targets")


def _seed(metadata_dir: Path, trusted: TrustedState) -> None:
    # The Updater treats these as its local cache: the versions it must not go back from.
    for role, data in (("timestamp", trusted.timestamp), ("snapshot", trusted.snapshot),
                       ("targets", trusted.targets)):
        if data is not None:
            (metadata_dir / f"{role}.json").write_bytes(data)


def _read_state(metadata_dir: Path, trusted: TrustedState) -> TrustedState:
    def read(role: str) -> bytes:
        return (metadata_dir / f"{role}.json").read_bytes()

    return TrustedState(root=read("root"), timestamp=read("timestamp"),
                        snapshot=read("snapshot"), targets=read("targets"),
                        installed=trusted.installed)


def _target_infos(updater: Updater, archive: Archive) -> dict[str, TargetFile]:
    """Signed target info for every ``targets/`` entry; each entry must be signed."""
    infos: dict[str, TargetFile] = {}
    for name in archive.index:
        top, _, path = name.partition("/")
        if top != TARGETS_DIR:
            continue
        info = updater.get_targetinfo(path)
        if info is None:
            raise ArtifactMismatchError(f"entry {name!r} is not listed in the signed targets "
                                        "metadata; the bundle was modified after signing")
        infos[path] = info
    if MANIFEST_PATH not in infos:
        raise MalformedBundleError(f"bundle has no {TARGETS_DIR}/{MANIFEST_PATH}")
    return infos


def _read_target(archive: Archive, info: TargetFile) -> bytes:
    name = f"{TARGETS_DIR}/{info.path}"
    size = archive.size(name)
    if size > info.length:
        # Refuse before reading a byte of it: the endless-data attack.
        raise OversizeError(f"{name} is {size} bytes but the signed targets metadata says "
                            f"{info.length}; refusing to read it (endless-data attack)")
    data = archive.read(name)
    try:
        info.verify_length_and_hashes(data)
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise ArtifactMismatchError(f"{name} does not match the signed targets metadata "
                                    f"({exc}); the bundle was modified after signing") from exc
    return data


def _targets_of(manifest: Manifest) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every target the manifest names: artifacts and deltas."""
    out = {a.path: (a.size, a.sha256) for a in manifest.artifacts}
    out.update((d.path, (d.size, d.sha256)) for a in manifest.artifacts for d in a.deltas)
    return out


def _carried(manifest: Manifest, delta_base: int | None) -> list[str]:
    """The targets a full bundle (``delta_base`` None) or a delta bundle carries."""
    if delta_base is None:
        return [a.path for a in manifest.artifacts]
    return [d.path for a in manifest.artifacts for d in a.deltas
            if d.base_version == delta_base]


def _check_artifacts(archive: Archive, manifest: Manifest, infos: Mapping[str, TargetFile],
                     signed: Mapping[str, TargetFile]) -> int | None:
    """Every target the manifest names is signed as the manifest says; the bundle carries
    the artifacts, or the deltas from one base version (returned, else None); what it
    carries matches the signed metadata, hashed block by block, not kept."""
    named = _targets_of(manifest)
    if set(signed) != set(named) | {MANIFEST_PATH}:
        raise MixAndMatchError(
            f"the manifest names {sorted(named)} but the signed targets are "
            f"{sorted(set(signed) - {MANIFEST_PATH})}; the files come from different builds")
    for path, (size, sha256) in named.items():
        info = signed[path]
        if info.length != size or info.hashes.get("sha256") != sha256:
            raise ArtifactMismatchError(f"manifest entry {path!r} (size {size}) disagrees "
                                        "with the signed targets metadata (size "
                                        f"{info.length}); rebuild the bundle")
    carried = set(infos) - {MANIFEST_PATH}
    kinds: list[int | None] = [None, *manifest.delta_bases()]
    matching = [base for base in kinds if carried == set(_carried(manifest, base))]
    if not matching:
        raise MixAndMatchError(
            f"the bundle holds {sorted(carried)}, which is neither the manifest's artifacts "
            "nor its deltas from one version; the files come from different builds")
    for path in carried:
        size, sha256 = named[path]
        name = f"{TARGETS_DIR}/{path}"
        if archive.size(name) > size:
            raise OversizeError(f"{name} is {archive.size(name)} bytes but the signed targets "
                                f"metadata says {size}; refusing to read it "
                                "(endless-data attack)")
        for _ in _checked(archive.blocks(name), size, sha256, name):
            pass
    return matching[0]


def _checked(blocks: Iterable[bytes], size: int, sha256: str, name: str) -> Iterator[bytes]:
    """``blocks`` passed through; ArtifactMismatchError once they are not ``size`` bytes
    hashing to ``sha256`` (raised at the end: the caller discards what it wrote)."""
    digest = hashlib.sha256()
    seen = 0
    for block in blocks:
        seen += len(block)
        if seen > size:
            break
        digest.update(block)
        yield block
    if seen != size or digest.hexdigest() != sha256:
        raise ArtifactMismatchError(f"{name} does not match the signed targets metadata "
                                    f"({seen} bytes, expected {size} with sha256 "
                                    f"{sha256[:16]}); the bundle was modified after signing")


def _check_expiry(state: TrustedState, now: datetime) -> dict[str, Signed]:
    roles: dict[str, Signed] = {}
    for role in ("root", "timestamp", "snapshot", "targets"):
        data = getattr(state, role)
        signed = parse_metadata(data).signed
        if signed.is_expired(now):
            raise ExpiredError(f"{role} metadata v{signed.version} expired at "
                               f"{signed.expires:%Y-%m-%dT%H:%M:%SZ} (now "
                               f"{now:%Y-%m-%dT%H:%M:%SZ}); rebuild the bundle so it carries "
                               "fresh metadata, or check the device clock")
        roles[role] = signed
    return roles


def _check_policy(manifest: Manifest, manifest_sha256: str, trusted: TrustedState,
                  profile: str | None) -> None:
    previous = trusted.installed.get(manifest.name)
    if previous is not None and (
            manifest.version < previous.version
            or (manifest.version == previous.version
                and manifest_sha256 != previous.manifest_sha256)):
        raise RollbackError(f"{manifest.name} v{manifest.version} is not newer than the "
                            f"trusted v{previous.version} (rollback); build a bundle with a "
                            "higher --version")
    if profile is not None and profile not in manifest.profiles:
        raise WrongProfileError(f"bundle {manifest.name} v{manifest.version} targets profiles "
                                f"{list(manifest.profiles)}, not this device's {profile!r}; "
                                "build it with --profile for this device kind")

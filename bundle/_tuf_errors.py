"""Translating python-tuf's errors into :mod:`bundle.errors`, with the detail they lack.

python-tuf says "timestamp was signed by 0/1 keys" or "bad version"; a device operator needs
to know whether a key is unknown, a signature broken or a threshold missed, and whether old
metadata was replayed or files from different builds were mixed. The Updater's trusted copies
(in its metadata directory) and the public ``Root.get_verification_result`` tell us.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root

from ._layout import METADATA_DIR
from .archive import Archive
from .errors import (
    BundleError,
    ExpiredError,
    FreezeError,
    MalformedBundleError,
    MixAndMatchError,
    OversizeError,
    TamperedError,
    ThresholdError,
    TrustError,
    UntrustedSignatureError,
)

__all__ = ["parse_metadata", "translate"]

_ROLE_OF = re.compile(r"(?:[0-9]+\.)?(root|timestamp|snapshot|targets)\.json")


def translate(exc: Exception, entry: str, archive: Archive,  # noqa: PLR0911  (a dispatch)
              metadata_dir: Path) -> BundleError:
    """Our error for ``exc``, raised by the Updater while it processed bundle ``entry``;
    ``metadata_dir`` holds what the Updater trusted at that moment."""
    match = _ROLE_OF.fullmatch(entry.removeprefix(METADATA_DIR + "/"))
    role = match.group(1) if match else "metadata"
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return ExpiredError(f"{exc} (checked by the system clock); rebuild the bundle so it "
                            "carries fresh metadata, or check the device clock")
    if isinstance(exc, tuf_errors.UnsignedMetadataError):
        return _signature_error(role, archive.read(entry), metadata_dir)
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return _version_error(role, archive.read(entry), metadata_dir)
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        return MixAndMatchError(f"{entry} does not match what the trusted metadata says of "
                                f"it ({exc}); the metadata files come from different builds")
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return OversizeError(f"{entry} is larger than tuf allows for {role} metadata; "
                             "refusing to read it (endless-data attack)")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return MalformedBundleError(f"bundle has no {entry}; it is incomplete")
    return MalformedBundleError(f"{entry or 'bundle metadata'} is invalid ({exc})")


def parse_metadata(data: bytes) -> Metadata[Any]:
    """Deserialize metadata of any role."""
    # Only called on bytes python-tuf has already parsed successfully.
    md: Metadata[Any] = Metadata.from_bytes(data)
    return md


def _trusted_root(metadata_dir: Path) -> Root:
    return Metadata[Root].from_bytes((metadata_dir / "root.json").read_bytes()).signed


def _signature_error(role: str, data: bytes, metadata_dir: Path) -> BundleError:
    """Say which of the three ways a signature check fails applies, and for which key."""
    md = parse_metadata(data)
    delegators = [_trusted_root(metadata_dir)]
    if isinstance(md.signed, Root):  # a new root must also be signed by its own keys
        delegators.append(md.signed)
    for root in delegators:
        result = root.get_verification_result(role, md.signed_bytes, md.signatures)
        if result.verified:
            continue
        who = f"{role} v{md.signed.version} (checked against root v{root.version})"
        invalid = sorted(k for k in result.unsigned if k in md.signatures)
        unknown = sorted(k for k in md.signatures if k not in root.roles[role].keyids)
        if invalid:
            return TamperedError(f"{who}: signature by key {invalid[0][:16]} does not match "
                                 "the content; the metadata was modified after signing")
        if unknown:
            return UntrustedSignatureError(
                f"{who} is signed by key(s) {', '.join(k[:16] for k in unknown)} not trusted "
                f"for {role}; sign with the current keys or rotate them via root")
        return ThresholdError(f"{who} has {len(result.signed)} valid signature(s), threshold "
                              f"is {result.threshold}; sign it with more {role} keys")
    return TrustError(f"{role} v{md.signed.version}: signatures do not verify")


def _version_error(role: str, data: bytes, metadata_dir: Path) -> BundleError:
    """Freeze (older than trusted) or mix-and-match (not the version its parent names)."""
    new = parse_metadata(data).signed
    freeze = "the bundle replays metadata older than the device trusts (freeze attack)"
    mix = "its metadata files come from different builds (mix-and-match)"
    if role == "timestamp":
        old = _trusted(metadata_dir, "timestamp")
        if new.version < old.version:
            return FreezeError(f"timestamp v{new.version} is older than the trusted "
                               f"v{old.version}: {freeze}; rebuild the bundle")
        return FreezeError(f"timestamp v{new.version} names snapshot "
                           f"v{new.snapshot_meta.version}, older than the trusted "
                           f"v{old.snapshot_meta.version}: {freeze}; rebuild the bundle")
    if role == "snapshot":
        timestamp = _trusted(metadata_dir, "timestamp")
        if new.version != timestamp.snapshot_meta.version:
            return MixAndMatchError(f"snapshot v{new.version} is not the v"
                                    f"{timestamp.snapshot_meta.version} that timestamp "
                                    f"v{timestamp.version} names: {mix}; rebuild the bundle")
        old = _trusted(metadata_dir, "snapshot")
        return FreezeError(f"snapshot v{new.version} lists targets "
                           f"v{_targets_version(new)}, older than the trusted "
                           f"v{_targets_version(old)}: {freeze}; rebuild the bundle")
    if role == "targets":
        snapshot = _trusted(metadata_dir, "snapshot")
        return MixAndMatchError(f"targets v{new.version} is not the v"
                                f"{_targets_version(snapshot)} that snapshot "
                                f"v{snapshot.version} names: {mix}; rebuild the bundle")
    return MalformedBundleError(f"root file holds root v{new.version}, not the version its "
                                "name says; rebuild the bundle")


def _trusted(metadata_dir: Path, role: str) -> Any:
    """The role's metadata the Updater currently trusts (its local copy)."""
    return parse_metadata((metadata_dir / f"{role}.json").read_bytes()).signed


def _targets_version(snapshot: Any) -> int | str:
    meta = snapshot.meta.get("targets.json")
    return "?" if meta is None else int(meta.version)

"""Every attack from issue 3, one row each: the bundle is refused with a specific error.

Table-driven like python-tuf's own client tests: a row builds the hostile input from a
fresh repository and names the exception class and a fragment of its message.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import MetaFile

from bundle.errors import (
    ArtifactMismatchError,
    BundleError,
    ChecksumError,
    ExpiredError,
    FreezeError,
    MalformedBundleError,
    MixAndMatchError,
    OversizeError,
    RollbackError,
    TamperedError,
    ThresholdError,
    UnsafePathError,
    UntrustedSignatureError,
    WrongProfileError,
)
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import NOW, Repo, edit_metadata, entries, rebuild, replace, spec

PROFILE = "x86-avx2"
TS, SNAP, TGT = "metadata/timestamp.json", "metadata/snapshot.json", "metadata/targets.json"
ART = "targets/artifacts/model.onnx"


@dataclass(frozen=True)
class Attack:
    """What the device is handed: bundle bytes, its trusted state, the time and profile."""

    bundle: bytes
    trusted: TrustedState
    now: Any = NOW
    profile: str = PROFILE


def _fresh(repo: Repo, bundle: bytes, **kw: Any) -> Attack:
    return Attack(bundle, TrustedState(root=repo.root), **kw)


def _after(repo: Repo, first: bytes, bundle: bytes) -> Attack:
    """The device verified and installed ``first`` earlier, then is handed ``bundle``."""
    seen = verify_bundle(first, TrustedState(root=repo.root), now=NOW, profile=PROFILE)
    m = seen.manifest
    return Attack(bundle, seen.trusted.with_installed(m.name, m.version, seen.manifest_sha256))


def flipped_byte(repo: Repo) -> Attack:
    data = bytearray(repo.build())
    data[len(data) // 2] ^= 0x01
    return _fresh(repo, bytes(data))


def flipped_byte_in_signed_metadata(repo: Repo) -> Attack:
    # Re-framed so the checksum passes: only the signature can notice.
    b = repo.build()
    forged = edit_metadata(entries(b)[TGT], lambda s: setattr(s, "expires", s.expires
                                                              + timedelta(days=1)))
    return _fresh(repo, replace(b, TGT, forged))


def flipped_byte_in_artifact(repo: Repo) -> Attack:
    b = repo.build()
    art = bytearray(entries(b)[ART])
    art[0] ^= 0x01
    return _fresh(repo, replace(b, ART, bytes(art)))


def artifact_size_differs(repo: Repo) -> Attack:
    b = repo.build()
    return _fresh(repo, replace(b, ART, entries(b)[ART][:-1]))


def unsigned_extra_entry(repo: Repo) -> Attack:
    b = repo.build()
    return _fresh(repo, rebuild({**entries(b), "targets/artifacts/evil.so": b"\x7fELF"}))


def unknown_key(repo: Repo) -> Attack:
    b = repo.build()
    forged = edit_metadata(entries(b)[TS], lambda s: None, [CryptoSigner.generate_ed25519()])
    return _fresh(repo, replace(b, TS, forged))


def too_few_signatures(_: Repo) -> Attack:
    repo = Repo(keys={"targets": 2}, thresholds={"targets": 2})
    b = repo.build()
    md = entries(b)[TGT]
    forged = edit_metadata(md, lambda s: None, repo.signers["targets"][:1])
    return _fresh(repo, replace(b, TGT, forged))


def root_below_threshold(_: Repo) -> Attack:
    # Root threshold 2 of 3; the next root carries a single old-root signature.
    repo = Repo(keys={"root": 3}, thresholds={"root": 2})
    repo.rotate("timestamp", signed_by=repo.signers["root"][:1])
    return _fresh(repo, repo.build())


def expired_metadata(repo: Repo) -> Attack:
    return _fresh(repo, repo.build(expires=NOW - timedelta(days=1)))


def expired_at_device_time(repo: Repo) -> Attack:
    return _fresh(repo, repo.build(), now=NOW + timedelta(days=60))


def rollback_model_version(repo: Repo) -> Attack:
    first = repo.build(spec(version=5))
    return _after(repo, first, repo.build(spec(version=4)))


def rollback_recorded_install(repo: Repo) -> Attack:
    trusted = TrustedState(root=repo.root).with_installed("digits", 7, "0" * 64)
    return Attack(repo.build(spec(version=3)), trusted)


def freeze_replayed_timestamp(repo: Repo) -> Attack:
    old = repo.build()
    return _after(repo, repo.build(), old)


def freeze_replayed_snapshot(repo: Repo) -> Attack:
    # A thief of the timestamp key points a new timestamp at an old snapshot.
    old = repo.build()
    new = repo.build()
    def point_at_old_snapshot(signed: Any) -> None:
        signed.version = 3
        signed.snapshot_meta = MetaFile(1)

    ts = edit_metadata(entries(new)[TS], point_at_old_snapshot, repo.signers["timestamp"])
    replay = rebuild({**entries(old), TS: ts})
    return _after(repo, new, replay)


def mix_and_match_snapshot(repo: Repo) -> Attack:
    old = repo.build()
    new = repo.build()
    return _fresh(repo, replace(new, SNAP, entries(old)[SNAP]))


def mix_and_match_targets(repo: Repo) -> Attack:
    old = repo.build()
    new = repo.build()
    return _fresh(repo, replace(new, TGT, entries(old)[TGT]))


def wrong_profile(repo: Repo) -> Attack:
    return _fresh(repo, repo.build(spec(profiles=("arm64-neon",))))


def _with_member(repo: Repo, name: str, kind: bytes = tarfile.REGTYPE) -> Attack:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        else:
            info.linkname = "/etc/shadow"
            tar.addfile(info)
    return _fresh(repo, rebuild(entries(repo.build()), add))


def dotdot_path(repo: Repo) -> Attack:
    return _with_member(repo, "targets/../../etc/cron.d/x")


def absolute_path(repo: Repo) -> Attack:
    return _with_member(repo, "/etc/cron.d/x")


def symlink_entry(repo: Repo) -> Attack:
    return _with_member(repo, "targets/artifacts/link", tarfile.SYMTYPE)


def hardlink_entry(repo: Repo) -> Attack:
    return _with_member(repo, "targets/artifacts/link", tarfile.LNKTYPE)


def endless_artifact(repo: Repo) -> Attack:
    b = repo.build()
    return _fresh(repo, replace(b, ART, b"\0" * (4 * 1024 * 1024)))


def endless_metadata(repo: Repo) -> Attack:
    b = repo.build()
    padded = entries(b)[TS] + b" " * (64 * 1024)  # still valid JSON, beyond tuf's bound
    return _fresh(repo, replace(b, TS, padded))


ATTACKS: list[tuple[Callable[[Repo], Attack], type[BundleError], str]] = [
    (flipped_byte, ChecksumError, "checksum mismatch"),
    (flipped_byte_in_signed_metadata, TamperedError, "does not match the content"),
    (flipped_byte_in_artifact, ArtifactMismatchError, "does not match the signed targets"),
    (artifact_size_differs, ArtifactMismatchError, "does not match the signed targets"),
    (unsigned_extra_entry, ArtifactMismatchError, "not listed in the signed targets"),
    (unknown_key, UntrustedSignatureError, "not trusted for timestamp"),
    (too_few_signatures, ThresholdError, "1 valid signature(s), threshold is 2"),
    (root_below_threshold, ThresholdError, "root v2"),
    (expired_metadata, ExpiredError, "expired"),
    (expired_at_device_time, ExpiredError, "expired at"),
    (rollback_model_version, RollbackError, "v4 is not newer than the trusted v5"),
    (rollback_recorded_install, RollbackError, "rollback"),
    (freeze_replayed_timestamp, FreezeError, "timestamp v1 is older than the trusted v2"),
    (freeze_replayed_snapshot, FreezeError, "names snapshot v1, older than the trusted v2"),
    (mix_and_match_snapshot, MixAndMatchError, "snapshot v1 is not the v2 that timestamp"),
    (mix_and_match_targets, MixAndMatchError, "targets v1 is not the v2 that snapshot"),
    (wrong_profile, WrongProfileError, "not this device's 'x86-avx2'"),
    (dotdot_path, UnsafePathError, "path traversal"),
    (absolute_path, UnsafePathError, "path traversal"),
    (symlink_entry, UnsafePathError, "is a link"),
    (hardlink_entry, UnsafePathError, "is a link"),
    (endless_artifact, OversizeError, "endless-data"),
    (endless_metadata, OversizeError, "endless-data"),
]


@pytest.mark.parametrize(("make", "error", "fragment"), ATTACKS,
                         ids=[row[0].__name__ for row in ATTACKS])
def test_attack_is_rejected(make: Callable[[Repo], Attack], error: type[BundleError],
                            fragment: str) -> None:
    attack = make(Repo())
    with pytest.raises(error) as caught:
        verify_bundle(attack.bundle, attack.trusted, now=attack.now, profile=attack.profile)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    assert fragment in str(caught.value)


def test_valid_bundle_passes() -> None:
    repo = Repo()
    verified = verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW,
                             profile=PROFILE)
    assert verified.manifest.name == "digits"
    assert set(verified.artifacts) == {"artifacts/model.onnx", "artifacts/model.int8.onnx"}
    assert verified.trusted.timestamp is not None


@pytest.mark.parametrize("position", [0, 8, 15, 16, 600, -33, -1])
def test_flipped_byte_anywhere_is_tampered(position: int) -> None:
    repo = Repo()
    data = bytearray(repo.build())
    data[position] ^= 0x80
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        verify_bundle(bytes(data), TrustedState(root=repo.root), now=NOW)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda e: e.pop(TS), "bundle has no metadata/timestamp.json"),
    (lambda e: e.pop("targets/manifest.json"), "bundle has no targets/manifest.json"),
    (lambda e: e.update({"metadata/2.root.json": e["metadata/1.root.json"]}),
     "holds root v1, not the version its name says"),
    (lambda e: e.update({"metadata/notes.json": b"{}"}), "unexpected metadata entry"),
    (lambda e: e.update({TS: b"{"}), "metadata/timestamp.json is invalid"),
])
def test_incomplete_or_inconsistent_bundles_are_malformed(change, fragment: str) -> None:
    repo = Repo()
    items = entries(repo.build())
    change(items)
    with pytest.raises(MalformedBundleError, match=fragment):
        verify_bundle(rebuild(items), TrustedState(root=repo.root), now=NOW)


def test_only_a_checksum_mismatch_is_worth_refetching() -> None:
    assert ChecksumError.transient
    assert not TamperedError.transient
    assert not ArtifactMismatchError.transient


def test_reverify_same_bundle_is_idempotent() -> None:
    repo = Repo()
    b = repo.build()
    first = verify_bundle(b, TrustedState(root=repo.root), now=NOW)
    trusted = first.trusted.with_installed("digits", 1, first.manifest_sha256)
    again = verify_bundle(b, trusted, now=NOW)
    assert again.manifest_sha256 == first.manifest_sha256


def test_naive_now_is_a_programming_error() -> None:
    repo = Repo()
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW.replace(tzinfo=None))


def test_signing_refuses_stale_keys() -> None:
    repo = Repo()
    repo.signers["timestamp"] = [CryptoSigner.generate_ed25519()]
    with pytest.raises(BundleError, match="rotate them"):
        repo.build()

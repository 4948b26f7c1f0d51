"""Re-releases: a stored bundle's contents under a new version and fresh metadata, which is
how a rollback reaches devices that refuse anything older than what they trust (issue 9.13).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from bundle.crypto import open_artifacts
from bundle.errors import DecryptionError, FreezeError, RollbackError, SigningError
from bundle.signing import ArtifactInput, rerelease_bundle
from bundle.trust import TrustedState, VerifiedBundle, verify_bundle
from tests.bundle.repo import MODEL, NOW, ONLINE, VALID, Repo, entries, replace, spec


def _rerelease(repo: Repo, source: bytes, version: int, *, rollback_of: int | None = None,
               recipients: Sequence[X25519PublicKey] = ()) -> bytes:
    repo.metadata_version += 1
    return rerelease_bundle(source, version=version, root_chain=repo.root_chain,
                            signers={r: repo.signers[r] for r in ONLINE},
                            metadata_version=repo.metadata_version, expires=VALID,
                            rollback_of=rollback_of, recipients=recipients)


def _install(data: bytes, state: TrustedState) -> tuple[VerifiedBundle, TrustedState]:
    verified = verify_bundle(data, state, now=NOW, profile="x86-avx2")
    return verified, verified.trusted.with_installed(
        verified.manifest.name, verified.manifest.version, verified.manifest_sha256)


def test_a_rollback_reaches_a_device_that_refuses_the_old_bundle() -> None:
    repo = Repo()
    v1 = repo.build(spec("digits", 1))
    v2 = repo.build(spec("digits", 2, artifacts=[
        ArtifactInput("model.onnx", MODEL[::-1], "onnx", "fp32")]))
    _, state = _install(v1, TrustedState(root=repo.root))
    _, state = _install(v2, state)
    with pytest.raises((FreezeError, RollbackError)):  # what `fleet rollback` sent before
        verify_bundle(v1, state, now=NOW, profile="x86-avx2")

    v3 = _rerelease(repo, v1, 3, rollback_of=1)
    verified, state = _install(v3, state)
    assert (verified.manifest.version, verified.manifest.rollback_of) == (3, 1)
    assert verified.metadata_version == 3
    assert verified.artifacts == verify_bundle(v1, TrustedState(root=repo.root),
                                               now=NOW).artifacts
    assert verified.manifest.self_test == spec("digits", 1).self_test
    with pytest.raises(FreezeError):  # and v3 cannot be replayed against later metadata
        _install(v2, state)


def test_encrypted_bundles_are_re_released_as_they_are() -> None:
    repo, device = Repo(), X25519PrivateKey.generate()
    v1 = repo.build(spec("digits", 1), recipients=[device.public_key()])
    v3 = _rerelease(repo, v1, 3, rollback_of=1)
    verified, _ = _install(v3, TrustedState(root=repo.root))
    original = verify_bundle(v1, TrustedState(root=repo.root), now=NOW)
    assert verified.manifest.key_wrap == original.manifest.key_wrap
    assert open_artifacts(verified.manifest, verified.artifacts, device) == {
        "artifacts/model.onnx": MODEL, "artifacts/model.int8.onnx": MODEL[:300]}
    with pytest.raises(SigningError, match="encrypted already"):
        _rerelease(repo, v1, 4, recipients=[X25519PrivateKey.generate().public_key()])


def test_a_re_release_can_encrypt_for_recipients() -> None:
    repo, device, outsider = Repo(), X25519PrivateKey.generate(), X25519PrivateKey.generate()
    v1 = repo.build(spec("digits", 1))
    v2 = _rerelease(repo, v1, 2, recipients=[device.public_key()])
    verified, _ = _install(v2, TrustedState(root=repo.root))
    assert verified.manifest.rollback_of is None
    assert open_artifacts(verified.manifest, verified.artifacts, device)[
        "artifacts/model.onnx"] == MODEL
    with pytest.raises(DecryptionError, match="not encrypted for this device"):
        open_artifacts(verified.manifest, verified.artifacts, outsider)


def test_damaged_sources_and_impossible_versions_are_refused() -> None:
    repo = Repo()
    v1 = repo.build(spec("digits", 1))
    damaged = replace(v1, "targets/artifacts/model.onnx",
                      entries(v1)["targets/artifacts/model.onnx"][::-1])
    with pytest.raises(SigningError, match="does not match its manifest"):
        _rerelease(repo, damaged, 2)
    with pytest.raises(SigningError, match="rollback_of"):
        _rerelease(repo, v1, 2, rollback_of=2)
    with pytest.raises(SigningError, match="valid signature"):
        rerelease_bundle(v1, version=2, root_chain=repo.root_chain,
                         signers={r: Repo().signers[r] for r in ONLINE}, metadata_version=9,
                         expires=NOW + timedelta(days=1))

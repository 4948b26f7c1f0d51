"""Optional artifact encryption: per-device and per-group recipients, clean failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from bundle.crypto import (
    decrypt_artifact,
    open_artifact,
    open_artifacts,
    private_key_from_bytes,
    public_key_from_bytes,
    unwrap_content_key,
)
from bundle.errors import ArtifactMismatchError, DecryptionError, SigningError
from bundle.trust import TrustedState, VerifiedBundle, verify_bundle
from tests.bundle.repo import MODEL, NOW, Repo


def _verified(*recipients: X25519PrivateKey) -> VerifiedBundle:
    repo = Repo()
    data = repo.build(recipients=[k.public_key() for k in recipients])
    return verify_bundle(data, TrustedState(root=repo.root), now=NOW)


def test_round_trip_for_device_and_group_keys() -> None:
    device, group = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    verified = _verified(device, group)
    assert verified.artifacts["artifacts/model.onnx"] != MODEL  # stored encrypted
    for key in (device, group):
        plain = open_artifacts(verified.manifest, verified.artifacts, key)
        assert plain["artifacts/model.onnx"] == MODEL
        assert plain["artifacts/model.int8.onnx"] == MODEL[:300]


def test_other_device_key_fails_cleanly() -> None:
    verified = _verified(X25519PrivateKey.generate())
    with pytest.raises(DecryptionError, match="not encrypted for this device"):
        open_artifacts(verified.manifest, verified.artifacts, X25519PrivateKey.generate())


def test_missing_key_fails_cleanly() -> None:
    verified = _verified(X25519PrivateKey.generate())
    with pytest.raises(DecryptionError, match="is encrypted"):
        open_artifacts(verified.manifest, verified.artifacts, None)


def test_modified_ciphertext_or_wrapped_key_fails_cleanly() -> None:
    device = X25519PrivateKey.generate()
    verified = _verified(device)
    assert verified.manifest.key_wrap is not None
    key = unwrap_content_key(verified.manifest.key_wrap, device)
    art = verified.manifest.artifacts[0]
    assert art.encryption is not None
    bad = bytes([verified.artifacts[art.path][0] ^ 1]) + verified.artifacts[art.path][1:]
    with pytest.raises(DecryptionError, match="does not decrypt"):
        decrypt_artifact(key, art.path, bad, art.encryption)
    # Ciphertext is bound to its path: moving it to another path does not decrypt either.
    with pytest.raises(DecryptionError, match="does not decrypt"):
        decrypt_artifact(key, "artifacts/other.onnx", verified.artifacts[art.path],
                         art.encryption)


def test_unencrypted_bundle_needs_no_key() -> None:
    verified = _verified()
    assert open_artifacts(verified.manifest, verified.artifacts, None) == verified.artifacts


def test_key_file_formats() -> None:
    key = X25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    raw_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    pem_pub = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert private_key_from_bytes(pem).public_key() == key.public_key()
    assert public_key_from_bytes(raw_pub) == public_key_from_bytes(pem_pub)
    with pytest.raises(SigningError, match="not an X25519 public key"):
        public_key_from_bytes(b"garbage")
    with pytest.raises(DecryptionError, match="not an X25519 private key"):
        private_key_from_bytes(b"garbage")


@pytest.mark.parametrize("block", [1, 7, 16, 17, 4096])
def test_streamed_decryption_from_a_bundle_file_matches_in_memory(
        block: int, tmp_path: Path) -> None:
    device = X25519PrivateKey.generate()
    repo = Repo()
    path = tmp_path / "b.efb"
    path.write_bytes(repo.build(recipients=[device.public_key()]))
    verified = verify_bundle(path, TrustedState(root=repo.root), now=NOW)
    stored = (b for whole in verified.artifact_blocks("artifacts/model.onnx")
              for b in (whole[i:i + block] for i in range(0, len(whole), block)))
    plain = b"".join(open_artifact(verified.manifest, "artifacts/model.onnx", stored, device))
    assert plain == MODEL


def test_a_bundle_file_changed_after_verification_does_not_stream_out(tmp_path: Path) -> None:
    repo = Repo()
    path = tmp_path / "b.efb"
    path.write_bytes(repo.build())
    verified = verify_bundle(path, TrustedState(root=repo.root), now=NOW)
    offset, size = verified.archive.index["targets/artifacts/model.onnx"]
    with open(path, "r+b") as f:  # swapped on disk between verification and staging
        f.seek(offset + size // 2)
        f.write(b"\xff")
    with pytest.raises(ArtifactMismatchError, match="modified after signing"):
        b"".join(verified.artifact_blocks("artifacts/model.onnx"))

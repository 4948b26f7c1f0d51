"""Optional artifact encryption: AES-256-GCM content key, wrapped per recipient with X25519.

One random content key encrypts every artifact of a bundle (a fresh 96-bit nonce each, the
artifact path as associated data so ciphertexts cannot be swapped between paths). The key is
wrapped once per recipient public key: an ephemeral X25519 exchange, HKDF-SHA256 to a key
encryption key, AES-256-GCM over the content key with the recipient's key id as associated
data. A recipient is a device key or a group key shared by several devices; the format does
not distinguish them. Signatures (TUF) cover the ciphertext, so a device verifies a bundle
before, and independently of, decrypting it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import DecryptionError, SigningError
from .manifest import ArtifactEncryption, KeyWrap, Manifest, Recipient

__all__ = [
    "decrypt_artifact",
    "decrypt_blocks",
    "encrypt_artifact",
    "key_id",
    "new_content_key",
    "open_artifact",
    "open_artifacts",
    "private_key_from_bytes",
    "public_key_from_bytes",
    "unwrap_content_key",
    "wrap_content_key",
]

_HKDF_INFO = b"edgefleet bundle key wrap v1"
_NONCE_LEN = 12
_TAG_LEN = 16


def key_id(public_key: X25519PublicKey) -> str:
    """The recipient id of ``public_key``: hex sha256 of its 32 raw bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def new_content_key() -> bytes:
    """A fresh random 256-bit content key."""
    return AESGCM.generate_key(bit_length=256)


def encrypt_artifact(content_key: bytes, path: str, plaintext: bytes,
                     ) -> tuple[bytes, ArtifactEncryption]:
    """Encrypt ``plaintext`` stored at ``path``; returns the ciphertext and its manifest entry."""
    nonce = os.urandom(_NONCE_LEN)
    ciphertext = AESGCM(content_key).encrypt(nonce, plaintext, path.encode("utf-8"))
    return ciphertext, ArtifactEncryption(
        nonce=nonce, plaintext_sha256=hashlib.sha256(plaintext).hexdigest(),
        plaintext_size=len(plaintext))


def wrap_content_key(content_key: bytes, recipients: Sequence[X25519PublicKey]) -> KeyWrap:
    """Wrap ``content_key`` for each recipient public key."""
    if not recipients:
        raise SigningError("encryption needs at least one recipient public key")
    return KeyWrap(recipients=tuple(_wrap_one(content_key, pub) for pub in recipients))


def unwrap_content_key(key_wrap: KeyWrap, private_key: X25519PrivateKey) -> bytes:
    """Recover the content key with this device's (or group's) private key."""
    kid = key_id(private_key.public_key())
    for recipient in key_wrap.recipients:
        if recipient.key_id != kid:
            continue
        try:
            ephemeral = X25519PublicKey.from_public_bytes(recipient.ephemeral_public_key)
            kek = _kek(private_key.exchange(ephemeral), ephemeral, private_key.public_key())
            return AESGCM(kek).decrypt(recipient.nonce, recipient.wrapped_key,
                                       kid.encode("ascii"))
        except (InvalidTag, ValueError) as exc:
            raise DecryptionError(f"the content key wrapped for key {kid[:16]} does not open "
                                  "with this private key; the bundle is corrupt") from exc
    raise DecryptionError(f"bundle is not encrypted for this device (key {kid[:16]}); ask "
                          "the operator to rebuild it with --encrypt-for this device's key")


def decrypt_artifact(content_key: bytes, path: str, ciphertext: bytes,
                     info: ArtifactEncryption) -> bytes:
    """Decrypt the artifact at ``path`` and check it against the manifest's plaintext digest."""
    return b"".join(decrypt_blocks(content_key, path, [ciphertext], info))


def decrypt_blocks(content_key: bytes, path: str, ciphertext: Iterable[bytes],
                   info: ArtifactEncryption) -> Iterator[bytes]:
    """Decrypt the artifact at ``path`` from ciphertext blocks, yielding plaintext blocks.

    The data is AES-GCM output (ciphertext then a 16-byte tag), so the tag is known only at
    the end: blocks are yielded before it is checked, and DecryptionError is raised after the
    last one if the tag, size or plaintext sha256 is wrong. The caller writes them somewhere
    it discards on an error (a staging directory), never where they would be used.
    """
    decryptor = Cipher(algorithms.AES(content_key), modes.GCM(info.nonce)).decryptor()
    decryptor.authenticate_additional_data(path.encode("utf-8"))
    digest, size, held = hashlib.sha256(), 0, b""
    for block in ciphertext:
        held += block
        if len(held) > _TAG_LEN:
            plain = decryptor.update(held[:-_TAG_LEN])
            held = held[-_TAG_LEN:]
            digest.update(plain)
            size += len(plain)
            yield plain
    try:
        if len(held) != _TAG_LEN:
            raise ValueError("ciphertext shorter than its tag")
        tail = decryptor.finalize_with_tag(held)
    except (InvalidTag, ValueError) as exc:
        raise DecryptionError(f"artifact {path!r} does not decrypt with the content key "
                              "(wrong key or modified ciphertext)") from exc
    digest.update(tail)
    size += len(tail)
    if tail:
        yield tail
    if size != info.plaintext_size or digest.hexdigest() != info.plaintext_sha256:
        raise DecryptionError(f"artifact {path!r} decrypted to data that does not match the "
                              "manifest's plaintext size and sha256")


def open_artifacts(manifest: Manifest, artifacts: Mapping[str, bytes],
                   private_key: X25519PrivateKey | None) -> dict[str, bytes]:
    """Plaintext of every verified artifact; ``private_key`` is needed only if encrypted."""
    return {a.path: b"".join(open_artifact(manifest, a.path, [artifacts[a.path]], private_key))
            for a in manifest.artifacts}


def open_artifact(manifest: Manifest, path: str, stored: Iterable[bytes],
                  private_key: X25519PrivateKey | None) -> Iterator[bytes]:
    """Plaintext blocks of the verified artifact ``path`` from its ``stored`` blocks
    (decrypted if it is encrypted, which needs ``private_key``; see :func:`decrypt_blocks`
    for when a wrong one is noticed)."""
    art = next(a for a in manifest.artifacts if a.path == path)
    if art.encryption is None:
        return iter(stored)
    if manifest.key_wrap is None or private_key is None:
        raise DecryptionError(f"{manifest.name} v{manifest.version} is encrypted; give this "
                              "device's X25519 private key")
    content_key = unwrap_content_key(manifest.key_wrap, private_key)
    return decrypt_blocks(content_key, path, stored, art.encryption)


def public_key_from_bytes(data: bytes) -> X25519PublicKey:
    """An X25519 public key from PEM (SubjectPublicKeyInfo) or its 32 raw bytes."""
    try:
        if len(data) == 32:
            return X25519PublicKey.from_public_bytes(data)
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"not an X25519 public key ({exc})") from exc
    if not isinstance(key, X25519PublicKey):
        raise SigningError(f"expected an X25519 public key, got {type(key).__name__}")
    return key


def private_key_from_bytes(data: bytes) -> X25519PrivateKey:
    """An X25519 private key from unencrypted PEM (PKCS#8) or its 32 raw bytes."""
    try:
        if len(data) == 32:
            return X25519PrivateKey.from_private_bytes(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DecryptionError(f"not an X25519 private key ({exc})") from exc
    if not isinstance(key, X25519PrivateKey):
        raise DecryptionError(f"expected an X25519 private key, got {type(key).__name__}")
    return key


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _kek(shared: bytes, ephemeral: X25519PublicKey, recipient: X25519PublicKey) -> bytes:
    # Binding both public keys into the salt ties the derived key to this exact exchange.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_raw(ephemeral) + _raw(recipient),
                info=_HKDF_INFO).derive(shared)


def _wrap_one(content_key: bytes, recipient: X25519PublicKey) -> Recipient:
    ephemeral = X25519PrivateKey.generate()
    kek = _kek(ephemeral.exchange(recipient), ephemeral.public_key(), recipient)
    nonce = os.urandom(_NONCE_LEN)
    kid = key_id(recipient)
    return Recipient(key_id=kid, ephemeral_public_key=_raw(ephemeral.public_key()),
                     nonce=nonce,
                     wrapped_key=AESGCM(kek).encrypt(nonce, content_key, kid.encode("ascii")))

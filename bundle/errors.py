"""Exceptions raised by the bundle package.

Only these escape the package: errors of tuf, securesystemslib, json, tarfile and
cryptography are translated where they occur. Every message says what was wrong and what to
do about it, and ``transient`` says whether fetching the same bundle again may help (only a
checksum mismatch: corruption in transit). The tree::

    BundleError
    ├── MalformedBundleError       not a bundle, or not one this reader understands
    │   ├── UnsafePathError        an archive entry that could escape a directory
    │   └── OversizeError          more data than a limit or the signed length allows
    ├── TamperedError              bytes do not match their checksum or signature
    │   ├── ChecksumError          the file checksum: corrupted in transit (transient)
    │   ├── ArtifactMismatchError  a target's size or sha256 differs from the signed one
    │   └── RebuildMismatchError   an artifact rebuilt from a delta differs from the signed one
    ├── TrustError                 validly signed, but trust policy says no
    │   ├── UntrustedSignatureError  signed by a key the trusted root does not know
    │   ├── ThresholdError           too few valid signatures for the role's threshold
    │   ├── ExpiredError             metadata past its expiry date
    │   ├── RollbackError            a model version lower than one already trusted
    │   ├── FreezeError              replayed metadata older than already trusted
    │   ├── MixAndMatchError         metadata files from different repository versions
    │   └── InvalidRootError         a root.json that is not a root signed by its own keys
    ├── WrongProfileError          the bundle does not target this device's profile
    ├── DecryptionError            an encrypted artifact cannot be opened with this key
    ├── DeltaBaseError             the stored artifact a delta builds on is missing or damaged
    └── SigningError               building or signing a bundle failed (server side)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ArtifactMismatchError",
    "BundleError",
    "ChecksumError",
    "DecryptionError",
    "DeltaBaseError",
    "ExpiredError",
    "FreezeError",
    "InvalidRootError",
    "MalformedBundleError",
    "MixAndMatchError",
    "OversizeError",
    "RebuildMismatchError",
    "RollbackError",
    "SigningError",
    "TamperedError",
    "ThresholdError",
    "TrustError",
    "UnsafePathError",
    "UntrustedSignatureError",
    "WrongProfileError",
]


class BundleError(Exception):
    """Root of every error the bundle package raises on purpose."""

    #: True if fetching the bundle again may succeed; False if these bytes will never pass.
    transient: ClassVar[bool] = False


class MalformedBundleError(BundleError):
    """The data is not a bundle this reader understands (bad framing, JSON or fields)."""


class UnsafePathError(MalformedBundleError):
    """An archive entry is a link, has an absolute path or a ``..`` component."""


class OversizeError(MalformedBundleError):
    """More data than a configured limit or the signed length allows (endless data)."""


class TamperedError(BundleError):
    """Bytes do not match their checksum or their signature."""


class ChecksumError(TamperedError):
    """The file's checksum does not match: corrupted in transit or storage."""

    transient = True


class ArtifactMismatchError(TamperedError):
    """A target's size or sha256 differs from what the signed metadata says."""


class RebuildMismatchError(TamperedError):
    """An artifact rebuilt from a delta differs from the full artifact the manifest signs."""


class TrustError(BundleError):
    """The bundle is well formed but the trust policy rejects it."""


class UntrustedSignatureError(TrustError):
    """Metadata is signed by a key the trusted root does not authorise for that role."""


class ThresholdError(TrustError):
    """Metadata carries fewer valid signatures than its role's threshold."""


class ExpiredError(TrustError):
    """Metadata is past its expiry date."""


class RollbackError(TrustError):
    """The model version is lower than one this device already trusted."""


class FreezeError(TrustError):
    """Metadata is older than metadata this device already trusted (replay)."""


class MixAndMatchError(TrustError):
    """Metadata files come from different versions of the repository."""


class WrongProfileError(BundleError):
    """The bundle does not list this device's firmware profile."""


class DecryptionError(BundleError):
    """An encrypted artifact cannot be decrypted with the given key."""


class DeltaBaseError(BundleError):
    """The stored artifact a delta builds on is missing, damaged or another version: the
    device must fetch the full bundle instead."""


class SigningError(BundleError):
    """Building or signing a bundle failed (bad input or keys)."""


class InvalidRootError(TrustError):
    """A root.json that is not TUF root metadata signed by a threshold of its own keys."""

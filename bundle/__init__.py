"""The edgefleet bundle format: one signed file carrying a model and everything about it.

Shared by the fleet server (writes, :mod:`bundle.signing`) and the agent (reads and
verifies, :mod:`bundle.trust`): the format (:mod:`bundle.manifest`, :mod:`bundle.archive`),
signing and trust (TUF), optional payload encryption (:mod:`bundle.crypto`) and the affine
I/O rule of full-integer artifacts (:mod:`bundle.quantization`) and weight-level deltas
(:mod:`bundle.delta`). Standard library, cryptography, numpy, zstandard and python-tuf
only; from the project, only :mod:`protocol.names` and :mod:`common.atomic`.
docs/bundle-format.md describes the format; docs/security.md the trust model.
"""

from __future__ import annotations

from .archive import Limits
from .errors import BundleError
from .manifest import Manifest
from .trust import InstalledVersion, TrustedState, VerifiedBundle, verify_bundle

__all__ = [
    "BundleError",
    "InstalledVersion",
    "Limits",
    "Manifest",
    "TrustedState",
    "VerifiedBundle",
    "verify_bundle",
]

"""The edgefleet bundle format: one signed file carrying a model and everything about it.

Shared by the fleet server (writes, :mod:`bundle.signing`) and the agent (reads and
verifies, :mod:`bundle.trust`), with the other pieces both sides need: the fleet protocol
(:mod:`bundle.protocol`), MQTT set-up (:mod:`bundle.mqtt`, the one module that needs
paho-mqtt), device identities (:mod:`bundle.identity`) and durable writes
(:mod:`bundle.atomic`). Otherwise standard library, cryptography and python-tuf only.
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

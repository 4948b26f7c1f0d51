"""Who a bundle is encrypted for: ``device:ID``, ``group:G`` or ``profile:P`` selectors
resolved to the X25519 public keys devices registered at enrollment.

Pure: it takes the devices as the registry (or the API's JSON) shows them, so the server
(encrypting at publish time) and ``fleet bundle build`` (encrypting at build time, with the
devices it asked the API for) choose recipients by one rule. The selection is made when the
bundle is encrypted: a device that joins the group later is not a recipient and refuses the
bundle (``DecryptionError``); encrypt again for it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .errors import ReleaseError

__all__ = ["KINDS", "Candidate", "Recipients", "is_selector", "select_recipients"]

#: The selector kinds: ``KIND:VALUE``.
KINDS = ("device", "group", "profile")


@dataclass(frozen=True)
class Candidate:
    """What selection needs of an enrolled device."""

    id: str
    group: str
    profile: str
    #: base64 of the 32 raw bytes of its X25519 public key; None if it registered none.
    encryption_key: str | None


@dataclass(frozen=True)
class Recipients:
    """The devices selected, in id order, and their public keys (one per device)."""

    devices: tuple[str, ...]
    keys: tuple[X25519PublicKey, ...]


def is_selector(text: str) -> bool:
    """Whether ``text`` is ``KIND:VALUE`` with a known kind (else: a key file's path)."""
    kind, sep, value = text.partition(":")
    return bool(sep) and kind in KINDS and bool(value)


def select_recipients(selectors: Sequence[str], devices: Iterable[Candidate]) -> Recipients:
    """The devices any selector matches, with their keys. ReleaseError if a selector is
    malformed or matches nothing, or a selected device has no key (it enrolled before
    keys were registered: enroll it again)."""
    known = list(devices)
    chosen: dict[str, Candidate] = {}
    for selector in selectors:
        kind, _, value = selector.partition(":")
        if not is_selector(selector):
            raise ReleaseError(f"{selector!r} selects no recipients; use device:ID, group:G "
                               "or profile:P")
        field = {"device": "id", "group": "group", "profile": "profile"}[kind]
        matched = [d for d in known if getattr(d, field) == value]
        if not matched:
            raise ReleaseError(f"{selector} matches no enrolled device; check the name (a "
                               "bundle encrypted for nobody could not be installed anywhere)")
        chosen.update((d.id, d) for d in matched)
    keyless = sorted(d for d, c in chosen.items() if c.encryption_key is None)
    if keyless:
        raise ReleaseError(f"device(s) {', '.join(keyless)} registered no encryption key "
                           "(enrolled by an older agent); enroll them again, or leave them "
                           "out of --encrypt-for")
    ids = tuple(sorted(chosen))
    return Recipients(ids, tuple(_public_key(d, chosen[d].encryption_key) for d in ids))


def _public_key(device: str, text: str | None) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(base64.b64decode(text or "", validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ReleaseError(f"the encryption key registered for {device} is not an X25519 "
                           f"public key ({exc}); enroll the device again") from exc

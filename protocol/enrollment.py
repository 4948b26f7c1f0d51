"""Enrollment tokens: the one string an operator copies from ``fleet enroll-token`` to a device.

A token carries the one-time secret the server redeems and two pins that bind the device to
the fleet before it trusts anything the server says, as kubeadm's
``discovery-token-ca-cert-hash`` does::

    eft1.<secret>.<ca pin>.<root pin>

- ``eft1.`` names the format (edgefleet token, version 1). A token therefore never starts
  with ``-``, so ``edge-agent enroll --token TOKEN`` cannot read it as an option, and a
  token pasted into the wrong place is recognisable.
- ``secret``: 32 random bytes; the server stores only its SHA-256.
- ``ca pin``: SHA-256 of the fleet CA certificate (DER). The agent checks the CA the server
  offers against it before sending the secret, then talks to the server over TLS verified
  with that CA only.
- ``root pin``: SHA-256 of the fleet's TUF ``root.json`` when the token was issued. The agent
  pins the root it receives only if it hashes to this, so a server that is not the fleet's
  cannot make the device trust its signing keys.

Each part is 43 characters of unpadded base64url (``A-Z a-z 0-9 - _``), joined by ``.``.
:func:`parse_token` is strict (exact length, canonical base64), so one string has one
meaning. Pure: no I/O; callers hash what they fetched with :func:`pin_of`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field

from .errors import ProtocolError

__all__ = ["TOKEN_PREFIX", "EnrollmentToken", "TokenError", "new_secret", "parse_token",
           "pin_of", "root_version"]

#: Every token starts with this (a letter first: never read as a command-line option).
TOKEN_PREFIX = "eft1."
_PART = r"[A-Za-z0-9_-]{43}"
_TOKEN = re.compile(rf"{re.escape(TOKEN_PREFIX)}({_PART})\.({_PART})\.({_PART})")
#: Longer input is refused before the pattern runs (tokens arrive in HTTP bodies).
_MAX_LENGTH = 256


class TokenError(ProtocolError):
    """A string that is not an enrollment token; the message says what to copy instead."""


@dataclass(frozen=True)
class EnrollmentToken:
    """A parsed token: the secret (its text form) and the two 32-byte pins."""

    secret: str = field(repr=False)
    ca_pin: bytes
    root_pin: bytes

    def __post_init__(self) -> None:
        if len(self.ca_pin) != 32 or len(self.root_pin) != 32:
            raise TokenError("pins are SHA-256 digests of 32 bytes")
        _decode(self.secret, "secret")

    def encode(self) -> str:
        """The token as the operator copies it."""
        return ".".join([TOKEN_PREFIX + self.secret, _encode(self.ca_pin),
                         _encode(self.root_pin)])


def new_secret() -> str:
    """A fresh 256-bit secret in the token's text form."""
    return _encode(secrets.token_bytes(32))


def pin_of(data: bytes) -> bytes:
    """The pin of ``data`` (a CA certificate's DER, or root.json's bytes): its SHA-256."""
    return hashlib.sha256(data).digest()


def root_version(root_json: bytes) -> str:
    """The version a root.json states, for messages about pins ("?" if it does not parse)."""
    try:
        return str(int(json.loads(root_json)["signed"]["version"]))
    except (ValueError, KeyError, TypeError, RecursionError):
        return "?"


def parse_token(text: str) -> EnrollmentToken:
    """Parse a token (surrounding whitespace ignored); TokenError if it is not one."""
    if not isinstance(text, str) or len(text) > _MAX_LENGTH:
        raise TokenError("not an enrollment token: expected eft1.<secret>.<ca pin>.<root pin> "
                         "(about 140 characters); copy the whole output of `fleet "
                         "enroll-token`")
    match = _TOKEN.fullmatch(text.strip())
    if match is None:
        hint = ("it is a token of an older server (no eft1. prefix); issue a new one with "
                "`fleet enroll-token`" if text.strip() and "." not in text else
                "copy the whole output of `fleet enroll-token`, one line")
        raise TokenError("not an enrollment token: expected eft1.<secret>.<ca pin>.<root pin>"
                         f" (about 140 characters); {hint}")
    secret, ca_pin, root_pin = match.groups()
    return EnrollmentToken(secret, _decode(ca_pin, "CA pin"), _decode(root_pin, "root pin"))


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode(part: str, what: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(part + "=")
    except (binascii.Error, ValueError) as exc:
        raise TokenError(f"the token's {what} is not base64url ({exc}); copy the token "
                         "again") from None
    # 43 characters hold 258 bits: the last 2 must be zero, so one token has one spelling.
    if len(raw) != 32 or _encode(raw) != part:
        raise TokenError(f"the token's {what} is damaged (not 32 canonical base64url bytes); "
                         "copy the token again")
    return raw

"""One-time enrollment tokens: issued per group (or for one device id), stored as a hash,
redeemed exactly once."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fleet_server.errors import RegistryError

from .database import Tx
from .events import log_event
from .values import check_device_id, check_label, iso

__all__ = ["TokenClaim", "issue_token", "redeem_token", "token_digest"]


@dataclass(frozen=True)
class TokenClaim:
    """A redeemed token: the group it enrolls into, and the device id it was issued for
    (None: a group's token, for new device ids only)."""

    group: str
    device: str | None


def token_digest(token: str) -> str:
    """What the registry stores of a token (a plain hash: the token is 256 random bits, so
    there is nothing to brute-force)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def issue_token(tx: Tx, now: float, group: str, ttl: float, device: str | None = None) -> str:
    """A new token for ``group``, valid for ``ttl`` seconds, for any new device id or (with
    ``device``) for that one id only; returns the plaintext."""
    check_label("group", group)
    if device is not None:
        check_device_id(device)
    if not ttl > 0:
        raise RegistryError(f"token lifetime must be positive seconds, got {ttl!r}")
    token = secrets.token_urlsafe(32)
    digest = token_digest(token)
    tx.run("INSERT INTO enrollment_tokens (token_sha256, group_name, created_at, expires_at, "
           "used_at, used_by, device_id) VALUES (?, ?, ?, ?, NULL, NULL, ?)",
           (digest, group, now, now + ttl, device))
    log_event(tx, now, device, "token.issued",
              {"token": digest[:12], "group": group, "expires_at": now + ttl, "device": device})
    return token


def redeem_token(tx: Tx, now: float, token: str, device_id: str) -> TokenClaim:
    """Use up ``token`` for ``device_id``; what it grants. RegistryError if it is unknown,
    used, expired or issued for another device id (and then nothing changed). Whether
    ``device_id`` may be taken is the enrollment's business (:mod:`.devices`)."""
    check_device_id(device_id)
    digest = token_digest(token)
    # The conditional UPDATE is the atomic test-and-set; the SELECT after it only explains a
    # refusal. On PostgreSQL a racing UPDATE waits for the winner's row lock, then re-checks
    # "used_at IS NULL" against the committed row and matches 0.
    won = tx.run("UPDATE enrollment_tokens SET used_at = ?, used_by = ? "
                 "WHERE token_sha256 = ? AND used_at IS NULL AND expires_at > ? "
                 "AND (device_id IS NULL OR device_id = ?)",
                 (now, device_id, digest, now, device_id))
    row = tx.one("SELECT group_name, expires_at, used_at, used_by, device_id "
                 "FROM enrollment_tokens WHERE token_sha256 = ?", (digest,))
    if won == 1 and row is not None:
        log_event(tx, now, device_id, "token.redeemed",
                  {"token": digest[:12], "group": row[0], "device": row[4]})
        return TokenClaim(str(row[0]), row[4])
    if row is None:
        raise RegistryError("unknown enrollment token; check for typos or ask the operator "
                            "for a new one (fleet issues them)")
    group, expires_at, used_at, used_by, bound = row
    if used_at is not None:
        raise RegistryError(f"enrollment token already used by device {used_by!r} at "
                            f"{iso(used_at)}; tokens work once, ask the operator for a new "
                            "one")
    if bound is not None and bound != device_id:
        raise RegistryError(f"this enrollment token was issued for device {bound!r}, not "
                            f"{device_id!r}; enroll with --device-id {bound} or ask for a "
                            "token for this device")
    raise RegistryError(f"enrollment token for group {group!r} expired at {iso(expires_at)}; "
                        "ask the operator for a new one")

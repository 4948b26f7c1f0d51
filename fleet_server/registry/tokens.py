"""One-time enrollment tokens: issued per group, stored as a hash, redeemed exactly once."""

from __future__ import annotations

import hashlib
import secrets

from fleet_server.errors import RegistryError

from .database import Tx
from .events import log_event
from .values import check_device_id, check_label, iso

__all__ = ["issue_token", "redeem_token", "token_digest"]


def token_digest(token: str) -> str:
    """What the registry stores of a token (a plain hash: the token is 256 random bits, so
    there is nothing to brute-force)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def issue_token(tx: Tx, now: float, group: str, ttl: float) -> str:
    """A new token for ``group``, valid for ``ttl`` seconds; returns the plaintext."""
    check_label("group", group)
    if not ttl > 0:
        raise RegistryError(f"token lifetime must be positive seconds, got {ttl!r}")
    token = secrets.token_urlsafe(32)
    digest = token_digest(token)
    tx.run("INSERT INTO enrollment_tokens (token_sha256, group_name, created_at, expires_at, "
           "used_at, used_by) VALUES (?, ?, ?, ?, NULL, NULL)", (digest, group, now, now + ttl))
    log_event(tx, now, None, "token.issued",
              {"token": digest[:12], "group": group, "expires_at": now + ttl})
    return token


def redeem_token(tx: Tx, now: float, token: str, device_id: str) -> str:
    """Use up ``token`` for ``device_id``; returns its group. RegistryError if it is unknown,
    used or expired (and then nothing changed)."""
    check_device_id(device_id)
    digest = token_digest(token)
    # The conditional UPDATE is the atomic test-and-set; the SELECT after it only explains a
    # refusal. On PostgreSQL a racing UPDATE waits for the winner's row lock, then re-checks
    # "used_at IS NULL" against the committed row and matches 0.
    won = tx.run("UPDATE enrollment_tokens SET used_at = ?, used_by = ? "
                 "WHERE token_sha256 = ? AND used_at IS NULL AND expires_at > ?",
                 (now, device_id, digest, now))
    row = tx.one("SELECT group_name, expires_at, used_at, used_by FROM enrollment_tokens "
                 "WHERE token_sha256 = ?", (digest,))
    if won == 1 and row is not None:
        log_event(tx, now, device_id, "token.redeemed", {"token": digest[:12], "group": row[0]})
        return str(row[0])
    if row is None:
        raise RegistryError("unknown enrollment token; check for typos or ask the operator "
                            "for a new one (fleet issues them)")
    group, expires_at, used_at, used_by = row
    if used_at is not None:
        raise RegistryError(f"enrollment token already used by device {used_by!r} at "
                            f"{iso(used_at)}; tokens work once, ask the operator for a new "
                            "one")
    raise RegistryError(f"enrollment token for group {group!r} expired at {iso(expires_at)}; "
                        "ask the operator for a new one")

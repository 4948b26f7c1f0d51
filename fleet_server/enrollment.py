"""The server's side of enrollment tokens: is this token one of this fleet's, for its
current root? Pure: the CA pin, the current root and the earlier roots come in as bytes.

A token (:mod:`protocol.enrollment`) pins the fleet CA and the root.json current when it was
issued. The agent checks both pins against the server before sending the token; the server
checks them again before redeeming it, so a token of another fleet, or of a root rotated
since, is refused unused and with the reason (the installer needs a new token).
"""

from __future__ import annotations

from collections.abc import Iterable

from protocol.enrollment import EnrollmentToken, TokenError, parse_token, pin_of, root_version

from .errors import EnrollmentError

__all__ = ["check_token"]


def check_token(text: str, *, ca_pin: bytes, root: bytes,
                earlier_roots: Iterable[bytes] = ()) -> EnrollmentToken:
    """The parsed token if it pins this CA and ``root``; else EnrollmentError saying why.
    ``earlier_roots`` (the keys directory's root history) lets the message name the root
    version a stale token was issued for."""
    try:
        token = parse_token(text)
    except TokenError as exc:
        raise EnrollmentError(str(exc)) from exc
    if token.ca_pin != ca_pin:
        raise EnrollmentError("this enrollment token was issued by another fleet (its CA pin "
                              "does not match this server's CA); use a token from this "
                              "fleet's `fleet enroll-token`")
    if token.root_pin != pin_of(root):
        earlier = next((root_version(r) for r in earlier_roots
                        if pin_of(r) == token.root_pin), None)
        when = (f"for root v{earlier}, and the fleet's root is now v{root_version(root)} (its "
                "keys were rotated since)" if earlier is not None
                else "for a root.json this server does not have")
        raise EnrollmentError(f"this enrollment token was issued {when}; issue a new token "
                              "with `fleet enroll-token` (the old one stays unused)")
    return token

"""The server's check of an enrollment token's pins (pure)."""

from __future__ import annotations

import pytest

from fleet_server.enrollment import check_token
from fleet_server.errors import EnrollmentError
from protocol.enrollment import EnrollmentToken, new_secret, pin_of

CA = pin_of(b"the fleet CA's DER")
ROOT_V1 = b'{"signed": {"version": 1}}'
ROOT_V2 = b'{"signed": {"version": 2}}'


def _token(ca: bytes = CA, root: bytes = ROOT_V2) -> str:
    return EnrollmentToken(new_secret(), ca, pin_of(root)).encode()


def test_a_token_of_this_fleet_and_root_passes() -> None:
    text = _token()
    assert check_token(f" {text}\n", ca_pin=CA, root=ROOT_V2).encode() == text


@pytest.mark.parametrize(("text", "history", "message"), [
    ("-abc", (), "not an enrollment token"),
    (_token(ca=pin_of(b"another CA")), (), "issued by another fleet"),
    (_token(root=ROOT_V1), (ROOT_V1, ROOT_V2),
     r"issued for root v1, and the fleet's root is now v2 \(its keys were rotated since\)"),
    (_token(root=ROOT_V1), (), "issued for a root.json this server does not have"),
])
def test_refusals_say_why(text: str, history: tuple[bytes, ...], message: str) -> None:
    with pytest.raises(EnrollmentError, match=message):
        check_token(text, ca_pin=CA, root=ROOT_V2, earlier_roots=history)

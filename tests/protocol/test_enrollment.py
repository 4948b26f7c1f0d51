"""Enrollment tokens: the format round-trips, is strict, and never reads as an option."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.enrollment import (
    TOKEN_PREFIX,
    EnrollmentToken,
    TokenError,
    new_secret,
    parse_token,
    pin_of,
    root_version,
)

digests = st.binary(min_size=32, max_size=32)


@given(secret=digests, ca=digests, root=digests)
def test_tokens_round_trip_and_start_with_the_prefix(secret: bytes, ca: bytes,
                                                     root: bytes) -> None:
    text = EnrollmentToken(base64.urlsafe_b64encode(secret).decode().rstrip("="), ca,
                           root).encode()
    assert text.startswith(TOKEN_PREFIX)  # never "-": not an option to argparse
    assert len(text) == 136
    assert parse_token(text) == parse_token(f"  {text}\n")
    parsed = parse_token(text)
    assert (parsed.ca_pin, parsed.root_pin) == (ca, root)
    assert parsed.encode() == text


@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_token_error(text: str) -> None:
    try:
        token = parse_token(text)
    except TokenError as exc:
        message = str(exc)
    else:
        message = "parsed"
        assert token.encode() == text.strip()
    assert "enrollment token" in message or "copy the token again" in message or (
        message == "parsed")


@given(st.integers(min_value=0, max_value=135), st.characters())
def test_a_changed_character_is_caught_or_changes_the_meaning(index: int, char: str) -> None:
    text = EnrollmentToken(new_secret(), pin_of(b"ca"), pin_of(b"root")).encode()
    changed = text[:index] + char + text[index + 1:]
    try:
        parsed = parse_token(changed)
    except TokenError:
        return
    assert parsed.encode() == changed  # canonical: one spelling per token


@pytest.mark.parametrize(("text", "hint"), [
    ("", "copy the whole output"),
    ("-Xq0oZ1e2", "older server"),
    ("eft1." + "A" * 43 + "." + "B" * 43, "copy the whole output"),
    ("eft1." + "A" * 42 + "B." + "A" * 43 + "." + "A" * 43, "damaged"),  # non-canonical
    ("x" * 1000, "about 140 characters"),
])
def test_refusals_say_what_to_do(text: str, hint: str) -> None:
    with pytest.raises(TokenError, match=hint):
        parse_token(text)


def test_root_version_for_messages() -> None:
    assert root_version(b'{"signed": {"version": 3}}') == "3"
    assert root_version(b"not json") == "?"

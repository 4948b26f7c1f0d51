"""The one name rule (protocol.names), shared by device ids, fleets and model names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.names import InvalidNameError, check_name, is_valid_name

_RESERVED = set("/+#\\ \t\n\x00")


def test_limits() -> None:
    assert check_name("a" * 64) == "a" * 64
    assert check_name("Gateway_7.eu-west") == "Gateway_7.eu-west"
    with pytest.raises(InvalidNameError, match="invalid fleet name"):
        check_name("a" * 65, "fleet name")


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-x", "_x", "a/b", "a+b", "a#b",
                                  "a b", "é", "a\x00", 7, None])
def test_refused(name: object) -> None:
    assert not is_valid_name(name)
    with pytest.raises(InvalidNameError, match="invalid model name"):
        check_name(name, "model name")


@given(st.text(max_size=80))
def test_a_valid_name_is_safe_everywhere_it_goes(name: str) -> None:
    # Whatever passes is a single topic level without wildcards, a single path component
    # that is not . or .., and fits a certificate common name.
    if is_valid_name(name):
        assert not _RESERVED & set(name)
        assert not name.startswith(".")
        assert 1 <= len(name) <= 64
        assert name.isascii()

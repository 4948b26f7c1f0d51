"""HTTP byte ranges: the forms bundle downloads use, and anything else refused or ignored."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.byte_range import (
    ByteRange,
    RangeNotSatisfiableError,
    content_range,
    parse_content_range,
    parse_range,
)


@pytest.mark.parametrize(("header", "total", "expected"), [
    (None, 10, None),
    ("bytes=0-", 10, ByteRange(0, 9, 10)),
    ("bytes=3-", 10, ByteRange(3, 9, 10)),
    ("bytes=3-5", 10, ByteRange(3, 5, 10)),
    ("bytes=3-500", 10, ByteRange(3, 9, 10)),  # clipped to the end
    ("bytes=-4", 10, ByteRange(6, 9, 10)),
    ("bytes=-400", 10, ByteRange(0, 9, 10)),
    ("bytes=5-3", 10, None),  # invalid: ignored
    ("bytes=0-1,4-5", 10, None),  # several ranges: the whole resource
    ("items=0-1", 10, None),
    ("bytes=-", 10, None),
    ("bytes=" + "9" * 300 + "-", 10, None),  # too long to be one of ours
])
def test_ranges_asked(header: str | None, total: int, expected: ByteRange | None) -> None:
    assert parse_range(header, total) == expected


@pytest.mark.parametrize(("header", "total"), [("bytes=10-", 10), ("bytes=11-20", 10),
                                               ("bytes=-0", 10), ("bytes=-5", 0)])
def test_unsatisfiable_ranges(header: str, total: int) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        parse_range(header, total)


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 2**40))
def test_a_range_answered_reads_back_and_stays_inside(start: int, end: int, total: int) -> None:
    try:
        answered = parse_range(f"bytes={start}-{end}", total)
    except RangeNotSatisfiableError:
        assert start >= total
        return
    if answered is None:
        assert end < start
        return
    assert 0 <= answered.start <= answered.end < total
    assert parse_content_range(content_range(answered)) == answered


@given(st.text(max_size=60))
def test_any_header_text_is_a_range_or_none(text: str) -> None:
    try:
        answered = parse_range(text, 1000)
    except RangeNotSatisfiableError:
        return
    assert answered is None or 0 <= answered.start <= answered.end < 1000
    parsed = parse_content_range(text)
    assert parsed is None or parsed.start <= parsed.end < parsed.total


@pytest.mark.parametrize("header", [None, "bytes 5-3/10", "bytes 0-10/10", "bytes */10",
                                    "bytes 0-1/2, extra"])
def test_bad_content_ranges(header: str | None) -> None:
    assert parse_content_range(header) is None

"""HTTP byte ranges (RFC 9110, section 14): the one form bundle downloads use.

The fleet server's bundle endpoint reads a request's ``Range`` header with
:func:`parse_range`; the agent checks the answer's ``Content-Range`` with
:func:`parse_content_range`. Only a single range is understood: a multi-range request is
answered whole (the RFC lets a server ignore ``Range``), and the agent never sends one.
Both functions are pure and bounded: they look at one header line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ByteRange", "RangeNotSatisfiableError", "content_range", "parse_content_range",
           "parse_range"]

#: Longer header values are not ranges this code sends or answers.
_MAX_HEADER = 200
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")


class RangeNotSatisfiableError(ValueError):
    """The range starts at or past the end of the resource (HTTP 416)."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end]`` (inclusive, as HTTP counts) of a resource of ``total`` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        """How many bytes the range holds."""
        return self.end - self.start + 1


def parse_range(header: str | None, total: int) -> ByteRange | None:
    """The single range ``header`` asks of a ``total``-byte resource, clipped to its end;
    None to send it whole (no header, a form not understood, several ranges).

    Raises RangeNotSatisfiableError for a range that starts at or past the end, or a
    suffix range of zero bytes.
    """
    if header is None or len(header) > _MAX_HEADER:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # bytes=-N: the last N bytes
        suffix = int(last)
        if suffix == 0 or total == 0:
            raise RangeNotSatisfiableError(f"suffix range of {suffix} bytes of {total}")
        return ByteRange(max(0, total - suffix), total - 1, total)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: RFC 9110 says to ignore it
    if start >= total:
        raise RangeNotSatisfiableError(f"range starts at {start}, the resource has {total} "
                                       "bytes")
    end = int(last) if last else total - 1
    return ByteRange(start, min(end, total - 1), total)


def content_range(byte_range: ByteRange) -> str:
    """The ``Content-Range`` value of a 206 answer."""
    return f"bytes {byte_range.start}-{byte_range.end}/{byte_range.total}"


def parse_content_range(header: str | None) -> ByteRange | None:
    """A 206 answer's ``Content-Range``; None if missing or not a plain byte range."""
    if header is None or len(header) > _MAX_HEADER:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        return None
    start, end, total = (int(g) for g in match.groups())
    if not start <= end < total:
        return None
    return ByteRange(start, end, total)

"""Strict parsing of HTTP/1.1 request heads (RFC 9112) for the local API's server.

Pure functions over bytes, so tests drive them without a socket (property tests in
tests/agent/test_http_parse.py): :func:`split_head` finds a complete head in what has
arrived so far, and gives the same answer however the bytes were split into reads;
:func:`parse_head` turns it into a :class:`RequestHead` or raises :class:`HttpError` with the
status to answer. Refused, rather than guessed at:

- a head over its byte limit or with too many header lines (431), whole or in pieces;
- anything but ``METHOD SP /target SP HTTP/1.x`` on the request line (400), another HTTP
  version (505);
- a header name that is not a token, space before the colon, a folded line, control
  characters in a value (400); a second ``Host`` (400);
- a ``Content-Length`` that is not plain digits (``+3``, ``1_0``, `` 3``), or two that
  differ (400: the request's end would be ambiguous, the root of request smuggling);
- ``Transfer-Encoding`` beside ``Content-Length`` (400) or alone (411: chunked bodies are
  not supported); an ``Expect`` other than ``100-continue`` (417).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

__all__ = ["HttpError", "RequestHead", "parse_head", "split_head"]

_END = b"\r\n\r\n"
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rf"({_TCHAR}+) ([^ ]+) (HTTP/[0-9]\.[0-9])")
# Origin form (/path?query) or absolute form (http://host/path?query); visible ASCII only.
_TARGET = re.compile(r"(?:https?://[^/?#\s]+)?(/[!-\"$-~]*)|https?://[^/?#\s]+")
_HEADER = re.compile(rf"({_TCHAR}+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_DIGITS = re.compile(r"[0-9]{1,18}")
_SUPPORTED_VERSIONS = frozenset({"HTTP/1.1", "HTTP/1.0"})


class HttpError(Exception):
    """A request to answer with ``status`` and this message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head; header names are lower-case, repeated ones joined by ", "."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    keep_alive: bool
    length: int  # of the body, from Content-Length (0 without one)
    expect_continue: bool


def split_head(buffer: bytes, max_head_bytes: int) -> tuple[bytes, bytes] | None:
    """The head (without its final blank line) and what follows it, or None to read more.

    Empty lines before a request line are skipped (RFC 9112 section 2.2) but count towards
    the limit. Raises HttpError 431 once the head cannot fit in ``max_head_bytes``, however
    many reads brought it.
    """
    start = 0
    while buffer.startswith(b"\r\n", start):
        start += 2
    end = buffer.find(_END, start, max_head_bytes)
    if end >= 0:
        return buffer[start:end], buffer[end + len(_END):]
    if len(buffer) >= max_head_bytes:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        f"request head over {max_head_bytes} bytes")
    return None


def parse_head(head: bytes, max_headers: int) -> RequestHead:
    """Parse ``head`` strictly; HttpError says what is wrong with it."""
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) - 1 > max_headers:
        raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        f"{len(lines) - 1} header lines, over the limit of {max_headers}")
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0][:200]!r}; "
                        "expected 'METHOD /path HTTP/1.1'")
    method, target, version = request_line.groups()
    if version not in _SUPPORTED_VERSIONS:
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                        f"{version} is not supported; use HTTP/1.1")
    path_match = _TARGET.fullmatch(target)
    if path_match is None:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request target {target[:200]!r} is not a "
                        "path ('/...') of visible ASCII characters")
    path, _, query = (path_match.group(1) or "/").partition("?")
    headers = _headers(lines[1:])
    length = _content_length(headers)
    expect = headers.get("expect")
    if expect is not None and expect.lower() != "100-continue":
        raise HttpError(HTTPStatus.EXPECTATION_FAILED,
                        f"Expect: {expect[:100]!r} is not supported (only 100-continue)")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    return RequestHead(method, path, query, headers, keep_alive, length,
                       expect is not None and version == "HTTP/1.1")


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        match = _HEADER.fullmatch(line)
        if match is None:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:200]!r}")
        name, value = match.group(1).lower(), match.group(2)
        previous = headers.get(name)
        if previous is None:
            headers[name] = value
        elif name == "host":
            raise HttpError(HTTPStatus.BAD_REQUEST, "more than one Host header")
        elif name == "content-length":
            if value != previous:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"conflicting Content-Length headers "
                                f"({previous[:30]!r} and {value[:30]!r})")
        else:
            headers[name] = f"{previous}, {value}"
    return headers


def _content_length(headers: Mapping[str, str]) -> int:
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise HttpError(HTTPStatus.BAD_REQUEST, "both Transfer-Encoding and "
                            "Content-Length; send only Content-Length")
        raise HttpError(HTTPStatus.LENGTH_REQUIRED, "chunked request bodies are not "
                        "accepted; send Content-Length")
    value = headers.get("content-length")
    if value is None:
        return 0
    # A list of equal values ("5, 5") is one length (RFC 9110 section 8.6).
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"conflicting Content-Length {value[:60]!r}")
    (digits,) = values
    if _DIGITS.fullmatch(digits) is None:
        if digits.isascii() and digits.isdigit():
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"Content-Length of {len(digits)} digits is over any limit")
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length is not a number of bytes "
                        f"({digits[:30]!r}; digits only)")
    return int(digits)

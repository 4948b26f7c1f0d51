"""The request-head parser (agent/http_parse.py): strict, total, and blind to read sizes."""

from __future__ import annotations

import itertools
import string
from http import HTTPStatus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.http_parse import HttpError, RequestHead, parse_head, split_head

MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"

tokens = st.text(TCHAR, min_size=1, max_size=12)
paths = st.text(string.ascii_letters + string.digits + "/._-~%", max_size=40).map(
    lambda p: "/" + p)
values = st.text(string.ascii_letters + string.digits + " !\"#$%&'()*+,-./:;<=>?@[]^_{}~",
                 max_size=40).map(str.strip)
plain_headers = st.dictionaries(
    tokens.map(str.lower).filter(lambda n: n not in {
        "content-length", "transfer-encoding", "host", "expect", "connection"}),
    values, max_size=20)


# Bytes that look like HTTP often enough to reach every branch of the parser.
_PIECES = [b"\r\n", b"\r", b"\n", b" ", b":", b"GET / HTTP/1.1", b"POST /v2 HTTP/1.0",
           b"HTTP/1.9", b"Content-Length: 5", b"Content-Length: 6", b"Transfer-Encoding: x",
           b"Host: a", b"Expect: 100-continue", b"Connection: close", b"X: \x00", b"\xff",
           b"a" * 100]
http_like = st.one_of(st.binary(max_size=2000),
                      st.lists(st.sampled_from(_PIECES), max_size=60).map(b"".join))


def _head(request_line: str, *headers: str) -> bytes:
    return "\r\n".join([request_line, *headers]).encode("latin-1")


def _parse(request_line: str, *headers: str) -> RequestHead:
    return parse_head(_head(request_line, *headers), MAX_HEADERS)


def _refused(status: HTTPStatus, request_line: str, *headers: str) -> str:
    with pytest.raises(HttpError) as refused:
        _parse(request_line, *headers)
    assert refused.value.status == status, str(refused.value)
    return str(refused.value)


@given(method=tokens, path=paths, query=st.text(string.ascii_letters + "=&", max_size=20),
       headers=plain_headers, length=st.integers(0, 10**15), close=st.booleans(),
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
def test_a_valid_head_parses_to_what_was_sent(*, method: str, path: str, query: str,
                                              headers: dict[str, str], length: int,
                                              close: bool, version: str) -> None:
    target = f"{path}?{query}" if query else path
    lines = [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {length}", f"Connection: {'close' if close else 'keep-alive'}"]
    head = _parse(f"{method} {target} {version}", *lines)
    assert (head.method, head.path, head.query, head.length) == (method, path, query, length)
    assert {k: v for k, v in head.headers.items() if k in headers} == headers
    assert head.keep_alive is not close
    assert not head.expect_continue


@given(http_like)
def test_any_bytes_give_a_head_or_an_http_error(data: bytes) -> None:
    head, status = None, None
    try:
        head = parse_head(data, MAX_HEADERS)
    except HttpError as exc:
        status = exc.status
    if head is None:
        assert status in {HTTPStatus.BAD_REQUEST, HTTPStatus.LENGTH_REQUIRED,
                          HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                          HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          HTTPStatus.EXPECTATION_FAILED, HTTPStatus.REQUEST_ENTITY_TOO_LARGE}
    else:
        assert head.path.startswith("/")
        assert head.length >= 0


@given(request=http_like, cuts=st.lists(st.integers(0, 6000)), limit=st.integers(16, 2048))
def test_split_head_does_not_depend_on_how_the_bytes_arrive(request: bytes, cuts: list[int],
                                                             limit: int) -> None:
    """Fed in any pieces, the reader finds the same head, or refuses at the same point."""
    def outcome(pieces: list[bytes]) -> tuple[bytes, int] | str | None:
        """The head and how many bytes it took, or the refusal, or None (more needed)."""
        buffer = b""
        for piece in pieces:
            buffer += piece
            try:
                found = split_head(buffer, limit)
            except HttpError as exc:
                return f"{exc.status}"
            if found is not None:
                head, rest = found
                return head, len(buffer) - len(rest)
        return None

    bounds = sorted({0, len(request), *(c for c in cuts if c < len(request))})
    pieces = [request[a:b] for a, b in itertools.pairwise(bounds)]
    whole = outcome([request])
    assert outcome(pieces) == whole
    if isinstance(whole, tuple):
        head, taken = whole
        assert taken <= limit
        assert request[:taken].endswith(head + b"\r\n\r\n")


def _read_head(request: bytes, reads: int) -> tuple[bytes, bytes] | None:
    """What the server's reader finds when ``request`` arrives in ``reads`` equal reads."""
    buffer, size = b"", -(-len(request) // reads)
    for start in range(0, len(request), size):
        buffer += request[start:start + size]
        found = split_head(buffer, MAX_HEAD)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("reads", [1, 1000])
@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n"], ids=["line", "header"])
def test_an_oversized_head_is_refused_even_in_one_read(request_bytes: bytes,
                                                       reads: int) -> None:
    """Regression: a 40 KB request line (or header) arriving in one read was accepted."""
    with pytest.raises(HttpError) as refused:
        _read_head(request_bytes, reads)
    assert refused.value.status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_too_many_header_lines() -> None:
    message = _refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "GET / HTTP/1.1",
                       *(f"X-{i}: v" for i in range(MAX_HEADERS + 1)))
    assert "over the limit of 100" in message
    assert len(_parse("GET / HTTP/1.1", *(f"X-{i}: v" for i in range(MAX_HEADERS))).headers) \
        == MAX_HEADERS


@pytest.mark.parametrize(("status", "request_line", "headers", "message"), [
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: 5", "Content-Length: 0"),
     "conflicting Content-Length headers"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: 5, 6",),
     "conflicting Content-Length"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: 1_0",),
     "Content-Length is not a number"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: +3",),
     "Content-Length is not a number"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: 0x10",),
     "Content-Length is not a number"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Content-Length: \xb2",),
     "Content-Length is not a number"),
    (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "GET / HTTP/1.1", ("Content-Length: " + "9" * 40,),
     "over any limit"),
    (HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "GET / HTTP/1.9", (), "HTTP/1.9 is not supported"),
    (HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "GET / HTTP/2.0", (), "HTTP/2.0 is not supported"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.10", (), "malformed request line"),
    (HTTPStatus.BAD_REQUEST, "GET / http/1.1", (), "malformed request line"),
    (HTTPStatus.BAD_REQUEST, "GET  / HTTP/1.1", (), "malformed request line"),
    (HTTPStatus.BAD_REQUEST, "G@T / HTTP/1.1", (), "malformed request line"),
    (HTTPStatus.BAD_REQUEST, "GET v2 HTTP/1.1", (), "is not a path"),
    (HTTPStatus.BAD_REQUEST, "GET /a\x7fb HTTP/1.1", (), "is not a path"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Name : v",), "malformed header line"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("A: v", " folded"), "malformed header line"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("A: v\x00w",), "malformed header line"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("A: v\rw",), "malformed header line"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", (": v",), "malformed header line"),
    (HTTPStatus.BAD_REQUEST, "GET / HTTP/1.1", ("Host: a", "Host: b"), "more than one Host"),
    (HTTPStatus.BAD_REQUEST, "POST / HTTP/1.1",
     ("Content-Length: 3", "Transfer-Encoding: chunked"), "both Transfer-Encoding"),
    (HTTPStatus.LENGTH_REQUIRED, "POST / HTTP/1.1", ("Transfer-Encoding: chunked",),
     "chunked request bodies are not accepted"),
    (HTTPStatus.EXPECTATION_FAILED, "POST / HTTP/1.1", ("Expect: magic",),
     "only 100-continue"),
])
def test_lax_heads_are_refused(status: HTTPStatus, request_line: str, headers: tuple[str, ...],
                               message: str) -> None:
    assert message in _refused(status, request_line, *headers)


def test_what_is_accepted() -> None:
    same = _parse("POST /v2 HTTP/1.1", "Content-Length: 7", "content-length: 7")
    assert same.length == 7
    assert _parse("POST /v2 HTTP/1.1", "Content-Length: 7, 7").length == 7
    joined = _parse("GET / HTTP/1.1", "Accept: a", "Accept: b", "X-Empty:")
    assert joined.headers == {"accept": "a, b", "x-empty": ""}
    absolute = _parse("GET http://localhost:8470/v2/models/m?x=1 HTTP/1.1")
    assert (absolute.path, absolute.query) == ("/v2/models/m", "x=1")
    assert _parse("OPTIONS http://localhost HTTP/1.1").path == "/"
    assert _parse("POST / HTTP/1.1", "Expect: 100-Continue").expect_continue
    assert not _parse("POST / HTTP/1.0", "Expect: 100-continue").expect_continue
    assert not _parse("GET / HTTP/1.0").keep_alive
    assert not _parse("GET / HTTP/1.1", "Connection: keep-alive, close").keep_alive
    assert _parse("GET / HTTP/1.1", "X: caf\xe9").headers["x"] == "caf\xe9"  # obs-text


def test_empty_lines_before_a_request_are_skipped() -> None:
    found = split_head(b"\r\n\r\nGET / HTTP/1.1\r\n\r\nrest", MAX_HEAD)
    assert found == (b"GET / HTTP/1.1", b"rest")

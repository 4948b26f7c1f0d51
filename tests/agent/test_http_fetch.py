"""Bundle downloads over HTTP against real local servers, honest and hostile: resume after a
cut, wrong bytes, an endless body, a huge Content-Length, a trickle, redirects, a server
that ignores ranges. Whatever a server does, the download stays bounded and the partial
file holds only bytes that can still be verified."""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.bundle_fetch import BundleFetch
from agent.http_fetch import HttpSettings, download

DATA = secrets.token_bytes(700_000)
SHA = hashlib.sha256(DATA).hexdigest()
#: Behaviour: (handler, range start asked) -> None; it writes the whole answer.
Behaviour = Callable[[BaseHTTPRequestHandler, int], None]


def honest(h: BaseHTTPRequestHandler, start: int) -> None:
    h.send_response(206 if start else 200)
    h.send_header("Content-Length", str(len(DATA) - start))
    if start:
        h.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
    h.end_headers()
    h.wfile.write(DATA[start:])


class Mirror:
    """A plain HTTP server on loopback answering by ``behaviour``; records Range starts."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.starts: list[int] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                match = re.fullmatch(r"bytes=(\d+)-\d*", self.headers.get("Range", ""))
                start = int(match.group(1)) if match else 0
                mirror.starts.append(start)
                # The client may stop reading: what a bounded client does.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    mirror.behaviour(self, start)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/b/{SHA}.efb"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirrors() -> Iterator[Callable[[Behaviour], Mirror]]:
    made: list[Mirror] = []

    def make(behaviour: Behaviour) -> Mirror:
        made.append(Mirror(behaviour))
        return made[-1]

    yield make
    for mirror in made:
        mirror.close()


FAST = HttpSettings(timeout_s=2.0, deadline_s=5.0)


def _fetch(tmp_path: Path) -> BundleFetch:
    return BundleFetch(tmp_path / "fetch", SHA, len(DATA))


def test_an_honest_server_delivers_the_bundle(tmp_path: Path, mirrors: Callable[[Behaviour],
                                                                           Mirror]) -> None:
    fetch = _fetch(tmp_path)
    assert download(fetch, [mirrors(honest).url], None, settings=FAST)
    assert fetch.path.read_bytes() == DATA


def test_a_cut_download_resumes_where_it_broke(tmp_path: Path,
                                               mirrors: Callable[[Behaviour], Mirror]) -> None:
    cut_at = 300_001

    def cuts_once(h: BaseHTTPRequestHandler, start: int) -> None:
        if start:
            honest(h, start)
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA[:cut_at])
        h.close_connection = True

    mirror = mirrors(cuts_once)
    fetch = _fetch(tmp_path)
    assert download(fetch, [mirror.url], None, settings=FAST)
    assert fetch.path.read_bytes() == DATA
    assert mirror.starts == [0, cut_at]


def test_a_cut_download_resumes_on_the_next_source(
        tmp_path: Path, mirrors: Callable[[Behaviour], Mirror]) -> None:
    def half_then_gone(h: BaseHTTPRequestHandler, start: int) -> None:
        if start:
            h.send_error(503)
            return
        h.send_response(200)
        h.send_header("Content-Length", str(len(DATA)))
        h.end_headers()
        h.wfile.write(DATA[:400_000])
        h.close_connection = True

    first, second = mirrors(half_then_gone), mirrors(honest)
    fetch = _fetch(tmp_path)
    assert download(fetch, [first.url, second.url], None, settings=FAST)
    assert fetch.path.read_bytes() == DATA
    assert second.starts == [400_000]


@pytest.mark.parametrize("behaviour", ["wrong_bytes", "endless", "huge_length", "bad_range",
                                       "not_found", "trickle", "redirect_loop"])
def test_a_hostile_server_is_bounded_and_the_next_one_used(
        behaviour: str, tmp_path: Path, mirrors: Callable[[Behaviour], Mirror]) -> None:
    def hostile(h: BaseHTTPRequestHandler, start: int) -> None:
        if behaviour == "wrong_bytes":
            h.send_response(200)
            h.send_header("Content-Length", str(len(DATA)))
            h.end_headers()
            h.wfile.write(secrets.token_bytes(len(DATA)))
        elif behaviour == "endless":  # no length, and bytes for ever
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            block = secrets.token_bytes(65536)
            for _ in range(10_000):  # 655 MB: far beyond what the client may read
                h.wfile.write(block)
        elif behaviour == "huge_length":
            h.send_response(200)
            h.send_header("Content-Length", str(10**15))
            h.end_headers()
            h.wfile.write(DATA)
        elif behaviour == "bad_range":
            h.send_response(206)
            h.send_header("Content-Range", f"bytes 5-{len(DATA) - 1}/{len(DATA)}")
            h.send_header("Content-Length", str(len(DATA) - 5))
            h.end_headers()
            h.wfile.write(DATA[5:])
        elif behaviour == "not_found":
            h.send_error(404)
        elif behaviour == "trickle":
            h.send_response(200)
            h.send_header("Content-Length", str(len(DATA)))
            h.end_headers()
            for i in range(0, len(DATA), 1000):
                h.wfile.write(DATA[i:i + 1000])
                h.wfile.flush()
                time.sleep(0.5)
        else:
            h.send_response(302)
            h.send_header("Location", h.path)
            h.send_header("Content-Length", "0")
            h.end_headers()

    bad, good = mirrors(hostile), mirrors(honest)
    fetch = _fetch(tmp_path)
    settings = HttpSettings(timeout_s=2.0, deadline_s=2.0, min_rate=10**9)
    began = time.monotonic()
    assert download(fetch, [bad.url], None, settings=settings) is False
    assert time.monotonic() - began < 15
    # Whatever stayed on disk is a prefix of the bundle or nothing: never wrong bytes.
    kept = fetch.part.read_bytes() if fetch.part.exists() else b""
    if behaviour != "trickle":
        assert kept == b""
    assert DATA.startswith(kept)
    assert download(fetch, [good.url], None, settings=FAST)
    assert fetch.path.read_bytes() == DATA


def test_a_server_ignoring_the_range_starts_the_file_over(
        tmp_path: Path, mirrors: Callable[[Behaviour], Mirror]) -> None:
    fetch = _fetch(tmp_path)
    fetch.append(DATA[:100_000])
    mirror = mirrors(lambda h, start: honest(h, 0))  # always the whole bundle, 200
    assert download(fetch, [mirror.url], None, settings=FAST)
    assert fetch.path.read_bytes() == DATA
    assert mirror.starts == [100_000]


def test_chunks_after_a_download_start_at_a_whole_chunk(tmp_path: Path) -> None:
    fetch = BundleFetch(tmp_path / "fetch", SHA, len(DATA), chunk_bytes=65536)
    fetch.append(DATA[:100_000])
    assert [r.offset for r in fetch.requests()][:1] == [65536]
    assert fetch.part.stat().st_size == 65536


def test_a_trickle_that_makes_progress_earns_no_retry_past_the_url_s_deadline(
        tmp_path: Path, mirrors: Callable[[Behaviour], Mirror]) -> None:
    # Each answer brings a few bytes, then the connection ends: progress every time, but
    # far too slow. The URL's deadline covers all its attempts, so the attempts stop once
    # it has passed (before the fix, each attempt had a deadline of its own: 5 of them).
    def trickle(h: BaseHTTPRequestHandler, start: int) -> None:
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        h.send_header("Content-Length", str(len(DATA) - start))
        h.end_headers()
        h.wfile.write(DATA[start:start + 9])
        h.wfile.flush()
        time.sleep(0.6)
        h.close_connection = True

    slow, good = mirrors(trickle), mirrors(honest)
    fetch = _fetch(tmp_path)
    fetch.append(DATA[:1])  # asks for a range from the start
    settings = HttpSettings(timeout_s=2.0, deadline_s=1.0, min_rate=10**9, attempts=5)
    assert download(fetch, [slow.url, good.url], None, settings=settings)
    assert len(slow.starts) <= 2  # at 0 s and about 0.6 s; none past the 1 s deadline
    assert slow.starts[0] == 1
    assert fetch.path.read_bytes() == DATA

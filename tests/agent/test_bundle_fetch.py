"""Fetching a bundle in chunks, driven directly: order, loss, timeouts, resume, corruption."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bundle_fetch import BundleFetch, FetchError
from protocol.messages import Chunk, ChunkRequest

DATA = bytes(random.Random(1).randbytes(10_000))
SHA = hashlib.sha256(DATA).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _answer(request: ChunkRequest, data: bytes = DATA) -> Chunk:
    return Chunk(request.bundle_sha256, request.offset, len(data),
                 data[request.offset:request.offset + request.length])


def _deliver_all(fetch: BundleFetch, data: bytes,
                 pending: list[ChunkRequest] | None = None) -> bool:
    """Answer every request, in order, until nothing more is asked; the last receive()."""
    pending = fetch.requests() if pending is None else pending
    done = False
    while pending:
        done = fetch.receive(_answer(pending.pop(0), data))
        pending += fetch.requests()
    return done


def _fetch(tmp_path: Path, clock: Clock | None = None) -> BundleFetch:
    return BundleFetch(tmp_path, SHA, len(DATA), chunk_bytes=1000, window=3, timeout_s=5,
                       clock=clock or Clock())


def test_window_in_order_to_completion(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    first = fetch.requests()
    assert [r.offset for r in first] == [0, 1000, 2000]
    assert fetch.requests() == []  # all three on their way: nothing more until answers
    assert _deliver_all(fetch, DATA, list(first))
    assert fetch.done
    assert fetch.path.read_bytes() == DATA
    assert fetch.progress == 1.0
    assert not fetch.part.exists()


def test_a_late_duplicate_after_the_last_chunk_changes_nothing(tmp_path: Path) -> None:
    # Found by tests/faults (a broker frozen mid-fetch): the re-requests of timed-out chunks
    # and the original answers both arrived; a duplicate after the bundle was whole hashed
    # the .part file that was already renamed, and the install failed with ENOENT.
    clock = Clock()
    fetch = _fetch(tmp_path, clock)
    first = fetch.requests()
    clock.now = 6.0
    again = fetch.requests()  # timed out: asked twice
    assert _deliver_all(fetch, DATA, list(first))
    for request in again:
        assert fetch.receive(_answer(request))
    assert fetch.done
    assert fetch.path.read_bytes() == DATA


def test_out_of_order_chunks_wait_for_the_gap(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    a, b, c = fetch.requests()
    assert not fetch.receive(_answer(c))
    assert not fetch.receive(_answer(b))
    assert not fetch.part.exists() or fetch.part.stat().st_size == 0
    assert not fetch.receive(_answer(a))
    assert fetch.part.stat().st_size == 3000
    assert [r.offset for r in fetch.requests()] == [3000, 4000, 5000]


def test_lost_requests_are_asked_again_after_the_timeout(tmp_path: Path) -> None:
    clock = Clock()
    fetch = _fetch(tmp_path, clock)
    fetch.requests()
    clock.now = 4.9
    assert fetch.requests() == []
    clock.now = 5.1
    assert [r.offset for r in fetch.requests()] == [0, 1000, 2000]
    assert fetch.refetched == 3000
    # The server is slow: the next re-request waits twice as long.
    clock.now = 5.1 + 9.9
    assert fetch.requests() == []
    clock.now = 5.1 + 10.1
    assert len(fetch.requests()) == 3


def test_resume_after_a_restart_continues_at_the_first_missing_byte(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    for request in fetch.requests()[:2]:
        fetch.receive(_answer(request))
    # A new agent process: nothing in memory, the .part file on disk.
    again = _fetch(tmp_path)
    assert again.progress == pytest.approx(0.2)
    assert [r.offset for r in again.requests()] == [2000, 3000, 4000]


def test_reconnect_forgets_outstanding_requests(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    fetch.requests()
    fetch.forget_requests()
    assert [r.offset for r in fetch.requests()] == [0, 1000, 2000]


def test_wrong_bytes_are_discarded_and_fetched_again(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    evil = bytes(len(DATA))
    with pytest.raises(FetchError, match="hashes to"):
        _deliver_all(fetch, evil)
    assert not fetch.part.exists()
    assert fetch.progress == 0.0
    fetch.forget_requests()
    assert fetch.requests()[0].offset == 0


def test_server_errors_and_stale_sizes(tmp_path: Path) -> None:
    fetch = _fetch(tmp_path)
    with pytest.raises(FetchError, match=r"cannot send bundle .*: not desired"):
        fetch.receive(Chunk(SHA, 0, 0, b"", error="not desired"))
    with pytest.raises(FetchError, match="the desired state is stale"):
        fetch.receive(Chunk(SHA, 0, 99, b"x"))


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.floats(0, 0.5))
def test_any_delivery_order_with_losses_completes(tmp_path_factory: pytest.TempPathFactory,
                                                  rng: random.Random, loss: float) -> None:
    clock = Clock()
    fetch = _fetch(tmp_path_factory.mktemp("f"), clock)
    in_transit: list[ChunkRequest] = []
    for _ in range(2000):
        if fetch.done:
            break
        in_transit += fetch.requests()
        rng.shuffle(in_transit)
        if in_transit:
            request = in_transit.pop()
            if rng.random() >= loss:
                fetch.receive(_answer(request))
            clock.now += 1.0
        else:  # everything asked was lost: nothing happens until the timeout
            clock.now += fetch.timeout_s + 0.1
    assert fetch.done
    assert fetch.path.read_bytes() == DATA

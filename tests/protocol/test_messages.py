"""The fleet protocol's payloads: round trips, validation, chunk integrity."""

from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.messages import (
    Chunk,
    ChunkRequest,
    Desired,
    DesiredModel,
    Event,
    InstallReport,
    ModelReport,
    Reported,
    Telemetry,
    decode_chunk,
    decode_chunk_request,
    decode_desired,
    decode_event,
    decode_reported,
    decode_telemetry,
    encode,
    encode_chunk,
)

SHA = hashlib.sha256(b"bundle").hexdigest()


def test_round_trips() -> None:
    desired = Desired({"digits": DesiredModel(2, SHA, 1234)}, issued_at=5.0)
    assert decode_desired(encode(desired)) == desired
    reported = Reported("x86-64-avx2", "0.1.0", {"digits": ModelReport(2, SHA, "committed")},
                        {"digits": InstallReport(3, SHA, "failed", "rejected:ChecksumError",
                                                 "bad")}, at=7.0)
    assert decode_reported(encode(reported)) == reported
    event = Event("install.failed", 3.0, {"model": "digits"})
    assert decode_event(encode(event)) == event
    numbered = Event("install.failed", 3.0, {"model": "digits"}, seq=2**63 - 1)
    assert decode_event(encode(numbered)) == numbered
    sample = Telemetry(17, 3.5, {"cpu": 1.5})
    assert decode_telemetry(encode(sample)) == sample
    request = ChunkRequest(SHA, 0, 4096)
    assert decode_chunk_request(encode(request)) == request


@given(st.binary(max_size=2048), st.integers(0, 10_000))
def test_chunk_frames_round_trip(data: bytes, offset: int) -> None:
    chunk = Chunk(SHA, offset, offset + len(data) + 5, data)
    assert decode_chunk(encode_chunk(chunk)) == chunk


def test_a_corrupted_chunk_is_refused() -> None:
    frame = bytearray(encode_chunk(Chunk(SHA, 0, 100, b"x" * 100)))
    frame[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match="does not match its sha256"):
        decode_chunk(bytes(frame))
    with pytest.raises(ProtocolError, match="not a chunk frame"):
        decode_chunk(b"XXXX" + bytes(frame[4:]))
    with pytest.raises(ProtocolError, match="too short"):
        decode_chunk(b"EF")
    past = encode_chunk(Chunk(SHA, 90, 100, b"x" * 20))
    with pytest.raises(ProtocolError, match="runs past"):
        decode_chunk(past)
    error = decode_chunk(encode_chunk(Chunk(SHA, 0, 0, b"", error="unknown bundle")))
    assert error.error == "unknown bundle"


@pytest.mark.parametrize(("payload", "message"), [
    (b"{", "is not JSON"),
    (b"[]", "must be a JSON object"),
    (json.dumps({"protocol": 2, "models": {}}).encode(), "protocol version 2"),
    (json.dumps({"protocol": 1, "models": {"Bad/Name": {}}, "issued_at": 1}).encode(),
     "model name 'Bad/Name' is not valid"),
    (json.dumps({"protocol": 1, "models": {"m": {"version": -1}}, "issued_at": 1}).encode(),
     "'version' must be a non-negative integer"),
    (json.dumps({"protocol": 1, "models": {"m": {"version": 1, "bundle_sha256": "ab",
                                                 "size": 1}}, "issued_at": 1}).encode(),
     "64 lowercase hex"),
])
def test_bad_desired_messages(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_desired(payload)


def test_chunk_request_limits() -> None:
    with pytest.raises(ProtocolError, match=r"outside 1\.\.4194304"):
        decode_chunk_request(encode(ChunkRequest(SHA, 0, 0)))
    with pytest.raises(ProtocolError, match="outside"):
        decode_chunk_request(encode(ChunkRequest(SHA, 0, 5 * 2**20)))


def test_seq_must_fit_a_signed_64_bit_integer() -> None:
    with pytest.raises(ProtocolError, match="below 2\\*\\*63"):
        decode_telemetry(encode(Telemetry(2**63, 1.0, {})))
    with pytest.raises(ProtocolError, match="below 2\\*\\*63"):
        decode_event(encode(Event("x", 1.0, {}, seq=2**70)))
    with pytest.raises(ProtocolError, match="non-negative integer"):
        decode_event(b'{"protocol": 1, "kind": "x", "at": 1, "seq": "5"}')
    # An event from an agent before seq existed.
    assert decode_event(b'{"protocol": 1, "kind": "x", "at": 1}').seq is None


@given(st.binary(max_size=200))
def test_decoders_raise_only_protocol_errors(payload: bytes) -> None:
    for decode in (decode_desired, decode_reported, decode_event, decode_telemetry,
                   decode_chunk_request, decode_chunk):
        with contextlib.suppress(ProtocolError):
            decode(payload)

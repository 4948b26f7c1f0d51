"""The fleet protocol's payloads: round trips, validation, chunk integrity."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.messages import (
    FEATURE_EVENT_BATCH,
    MAX_CHUNK_REQUEST_BYTES,
    MAX_EVENT_BYTES,
    MAX_EVENTS_PER_MESSAGE,
    MAX_FEATURES,
    MAX_REPORTED_BYTES,
    MAX_TELEMETRY_BYTES,
    Chunk,
    ChunkRequest,
    Desired,
    DesiredModel,
    DesiredShadow,
    Event,
    EventBatch,
    InstallReport,
    ModelReport,
    Reported,
    Telemetry,
    decode_chunk,
    decode_chunk_request,
    decode_desired,
    decode_event,
    decode_events,
    decode_reported,
    decode_telemetry,
    encode,
    encode_chunk,
)

SHA = hashlib.sha256(b"bundle").hexdigest()


def test_round_trips() -> None:
    desired = Desired({"digits": DesiredModel(2, SHA, 1234)}, issued_at=5.0)
    assert decode_desired(encode(desired)) == desired
    staged = Desired({"digits": DesiredModel(2, SHA, 1234, DesiredShadow(3, SHA, 99, 0.1),
                                             compare_previous=0.25)}, issued_at=5.0)
    assert decode_desired(encode(staged)) == staged
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
     "'version' must be an integer from 0"),
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


def test_an_event_seq_is_optional_and_must_fit_a_signed_64_bit_integer() -> None:
    with pytest.raises(ProtocolError, match="2\\*\\*63 - 1"):
        decode_event(encode(Event("install.staged", 1.0, {}, seq=2**70)))
    with pytest.raises(ProtocolError, match="integer"):
        decode_event(b'{"protocol": 1, "kind": "offline", "at": 1, "seq": "5"}')
    # An event from an agent before seq existed, or the MQTT will.
    assert decode_event(b'{"protocol": 1, "kind": "offline", "at": 1}').seq is None


@given(st.binary(max_size=200))
def test_decoders_raise_only_protocol_errors(payload: bytes) -> None:
    for decode in (decode_desired, decode_reported, decode_event, decode_events,
                   decode_telemetry, decode_chunk_request, decode_chunk):
        with contextlib.suppress(ProtocolError):
            decode(payload)


_DECODERS = (decode_desired, decode_reported, decode_event, decode_events, decode_telemetry,
             decode_chunk_request)


@pytest.mark.parametrize("decode", _DECODERS)
def test_deep_nesting_is_a_protocol_error(decode: Callable[[bytes], object]) -> None:
    deep = b'{"protocol": 1, "x": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    with pytest.raises(ProtocolError, match="nests JSON too deeply"):
        decode(deep)


@pytest.mark.parametrize(("decode", "limit"), [
    (decode_reported, MAX_REPORTED_BYTES), (decode_event, MAX_EVENT_BYTES),
    (decode_telemetry, MAX_TELEMETRY_BYTES), (decode_chunk_request, MAX_CHUNK_REQUEST_BYTES)])
def test_each_kind_has_a_size_limit(decode: Callable[[bytes], object], limit: int) -> None:
    payload = b'{"protocol": 1, "pad": "' + b"x" * limit + b'"}'
    with pytest.raises(ProtocolError, match="exceeds the"):
        decode(payload)


@pytest.mark.parametrize("seq", [2**63, 2**70, -1])
def test_integers_fit_a_bigint(seq: int) -> None:
    payload = json.dumps({"protocol": 1, "seq": seq, "at": 1.0, "metrics": {}}).encode()
    with pytest.raises(ProtocolError, match="2\\*\\*63"):
        decode_telemetry(payload)


@pytest.mark.parametrize("at", ["1e999", "NaN", "Infinity", str(10**400)])
def test_times_are_finite(at: str) -> None:
    payload = f'{{"protocol": 1, "kind": "offline", "at": {at}, "detail": {{}}}}'.encode()
    with pytest.raises(ProtocolError, match="finite number"):
        decode_event(payload)


@pytest.mark.parametrize("kind", ["device.enrolled", "desired.set", "install", "INSTALL.x",
                                  "install.committed\n", "rollout.halted", ""])
def test_devices_send_only_device_event_kinds(kind: str) -> None:
    with pytest.raises(ProtocolError):
        decode_event(encode(Event(kind, 1.0, {})))


@pytest.mark.parametrize("kind", ["offline", "protocol_error", "fetch.started", "fetch.failed",
                                  "install.committed", "install.rolled_back"])
def test_device_event_kinds(kind: str) -> None:
    assert decode_event(encode(Event(kind, 1.0, {}))).kind == kind


def test_an_older_servers_desired_state_has_no_shadow_and_no_comparison() -> None:
    old = b'{"protocol":1,"issued_at":1,"models":{"m":{"version":1,"bundle_sha256":"%s",' \
          b'"size":5}}}' % SHA.encode()
    assert decode_desired(old).models["m"] == DesiredModel(1, SHA, 5, None, 0.0)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("compare_previous", 1.5, "share between 0 and 1"),
    ("compare_previous", -0.1, "share between 0 and 1"),
    ("shadow", {"version": 2, "bundle_sha256": SHA, "size": 5, "sample_rate": 0},
     "must be above 0"),
    ("shadow", {"version": 2, "bundle_sha256": SHA, "size": 5, "sample_rate": 2},
     "share between 0 and 1"),
    ("shadow", [1], "must be a JSON object"),
])
def test_bad_shadow_or_comparison_shares_are_refused(field: str, value: object,
                                                     message: str) -> None:
    model = {"version": 1, "bundle_sha256": SHA, "size": 5, field: value}
    payload = json.dumps({"protocol": 1, "issued_at": 1, "models": {"m": model}}).encode()
    with pytest.raises(ProtocolError, match=message):
        decode_desired(payload)


def test_desired_urls_are_optional_bounded_http_urls() -> None:
    sha = "a" * 64
    url = f"https://cdn.example.com/b/{sha}.efb"
    desired = Desired({"m": DesiredModel(1, sha, 10, urls=(url,))}, 1.0)
    assert decode_desired(encode(desired)) == desired
    bare = encode(Desired({"m": DesiredModel(1, sha, 10)}, 1.0))
    assert "urls" not in json.loads(bare)["models"]["m"]  # left out: an older server's form
    assert decode_desired(bare).models["m"].urls == ()
    for bad in (["ftp://x/y"], ["file:///etc/passwd"], [url] * 9, ["https://" + "x" * 2100],
                "https://x/y", [7], ["https://exa mple.com/x"]):
        payload = json.loads(encode(desired))
        payload["models"]["m"]["urls"] = bad
        with pytest.raises(ProtocolError):
            decode_desired(json.dumps(payload).encode())


def _install_event(i: int) -> Event:
    return Event(f"install.s{chr(97 + i % 26)}", 1_700_000_000.0 + i,
                 {"install_id": "gw-1-1", "n": i}, seq=100 + i)


@given(st.integers(1, MAX_EVENTS_PER_MESSAGE))
def test_an_event_batch_round_trips_in_order(count: int) -> None:
    events = tuple(_install_event(i) for i in range(count))
    assert decode_events(encode(EventBatch(events))) == events


def test_a_single_event_is_a_batch_of_one_to_decode_events() -> None:
    event = _install_event(0)
    assert decode_events(encode(event)) == (event,)
    assert decode_event(encode(event)) == event


@pytest.mark.parametrize(("events", "message"), [
    ([], "1 to 32 events"),
    ([{"kind": "install.x", "at": 1.0, "detail": {}}] * (MAX_EVENTS_PER_MESSAGE + 1),
     "1 to 32 events"),
    ({"kind": "install.x"}, "1 to 32 events"),
    ([{"kind": "install.x", "at": 1.0, "detail": {}}, {"kind": "server.x", "at": 1.0,
                                                        "detail": {}}],
     "not one a device may send"),
    (["install.x"], "events[0]"),
    ([{"kind": "install.x", "at": 1.0, "detail": {"text": "x" * MAX_EVENT_BYTES}}],
     "events[0]'s detail exceeds"),
])
def test_bad_event_batches_are_refused(events: object, message: str) -> None:
    payload = json.dumps({"protocol": 1, "events": events}).encode()
    with pytest.raises(ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_events(payload)


def test_an_event_batch_has_a_size_limit_and_a_single_event_keeps_its_own() -> None:
    big = {"kind": "install.x", "at": 1.0, "detail": {"text": "x" * (MAX_EVENT_BYTES - 100)}}
    with pytest.raises(ProtocolError, match="64 KiB"):
        decode_events(json.dumps({"protocol": 1, "events": [big] * 5}).encode())
    alone = {"protocol": 1, **big, "detail": {"text": "x" * MAX_EVENT_BYTES}}
    with pytest.raises(ProtocolError, match="16 KiB"):
        decode_events(json.dumps(alone).encode())


def test_desired_features_are_optional_bounded_names_kept_as_sent() -> None:
    plain = Desired(models={}, issued_at=1.0)
    assert b"features" not in encode(plain)
    assert decode_desired(encode(plain)).features == ()
    listed = Desired(models={}, issued_at=1.0,
                     features=(FEATURE_EVENT_BATCH, "some.future.feature"))
    assert decode_desired(encode(listed)) == listed
    for bad in (["x"] * (MAX_FEATURES + 1), [""], ["x" * 65], "events.batch", [3]):
        payload = json.dumps({"protocol": 1, "models": {}, "issued_at": 1.0,
                              "features": bad}).encode()
        with pytest.raises(ProtocolError, match="'features' must be a list"):
            decode_desired(payload)

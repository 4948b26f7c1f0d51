"""The server's MQTT session (fleet_server.device_link) over a real Mosquitto, on SQLite and
on PostgreSQL: chunk requests answered for desired bundles only, within a device's rate;
reports, events and telemetry stored in batches and acknowledged once stored; what hostile
devices send refused and recorded (conventions: test_service.py)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleet_server.ingest import DEVICE_EVENT_PREFIX, PROTOCOL_ERROR
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF
from tests.fleet_server.server_env import (
    PROFILE,
    connect_device,
    enroll,
    fetch_bundle,
    reported_payload,
    request_chunk,
    wait_until,
)
from tests.mqtt_broker import TIMEOUT, Recorder

pytestmark = pytest.mark.integration


# --- chunks -----------------------------------------------------------------------------

def test_chunks_are_served_for_desired_bundles_only(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    big, v1, v2 = (service.add_bundle(bundles[k]) for k in ("big", "v1", "v2"))
    service.publish(big.sha256, devices=["gw-1"])
    recorder = connect_device(device, clients)

    data = fetch_bundle(recorder, device, big.sha256, big.size)
    assert hashlib.sha256(data).hexdigest() == big.sha256
    assert len(recorder.messages) == -(-big.size // messages.DEFAULT_CHUNK_BYTES)

    # Stored but never desired for this device, and not stored at all: the same refusal.
    for sha in (v1.sha256, "0" * 64):
        answer = request_chunk(recorder, device, sha, 0, 1024)
        assert answer.data == b""
        assert answer.error == (f"bundle {sha} is not available to device gw-1; only "
                                "bundles in its desired state can be fetched")
    past = request_chunk(recorder, device, big.sha256, big.size, 10)
    assert past.error is not None
    assert "past the end" in past.error

    # Once desired, always fetchable (a device may still be finishing an older download).
    # (Set in the registry: publish would refuse these, whose metadata is older than big's.)
    service.registry.set_desired(v2.sha256, devices=["gw-1"])
    service.registry.set_desired(v1.sha256, devices=["gw-1"])
    assert fetch_bundle(recorder, device, v2.sha256, v2.size) == bundles["v2"]


def test_cached_chunks_go_only_to_devices_they_are_desired_for(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    """Chunks are read and framed once, then served from memory: still only to devices the
    bundle is or was desired for."""
    a1, b1 = enroll(service, tmp_path, "a1"), enroll(service, tmp_path, "b1")
    big = service.add_bundle(bundles["big"])
    service.publish(big.sha256, devices=["a1"])
    r_a1, r_b1 = connect_device(a1, clients, "inbox/#"), connect_device(b1, clients, "inbox/#")
    size = messages.DEFAULT_CHUNK_BYTES
    first = request_chunk(r_a1, a1, big.sha256, 0, size)
    assert (first.error, first.data) == (None, bundles["big"][:size])

    refused = request_chunk(r_b1, b1, big.sha256, 0, size)  # the very bytes in the cache
    assert (refused.data, refused.error) == (b"", f"bundle {big.sha256} is not available to "
                                             "device b1; only bundles in its desired state "
                                             "can be fetched")
    big.path.unlink()  # from memory now; bytes not read before need the blob
    assert request_chunk(r_a1, a1, big.sha256, 0, size) == first
    assert request_chunk(r_a1, a1, big.sha256, size, size).error == (
        "the server cannot read this bundle right now; retry later")


# --- ingest -----------------------------------------------------------------------------

def test_reported_events_and_telemetry_land_in_the_registry(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    v1 = service.add_bundle(bundles["v1"])
    service.publish(v1.sha256, group="lab")
    recorder = connect_device(device, clients)
    registry = service.registry

    recorder.publish(device.topic("reported"), reported_payload(v1.sha256, 1))
    stored = wait_until(lambda: (d := registry.get_device("gw-1")) and d.reported and d,
                        "the reported state")
    assert stored.online
    assert stored.converged
    assert stored.reported["models"]["digits"] == {"version": 1, "bundle_sha256": v1.sha256,
                                                   "state": "committed"}

    recorder.publish(device.topic("events"), messages.encode(messages.Event(
        "install.committed", 12.5, {"version": 1})))
    event = wait_until(lambda: [e for e in registry.events(device="gw-1")
                                if e.kind == "agent.install.committed"], "the event")[0]
    assert event.detail == {"version": 1, "device_at": 12.5}

    def telemetry(seq: int) -> bytes:
        return messages.encode(messages.Telemetry(seq, 100.0 + seq, {"latency_ms": seq}))

    for seq in (1, 2, 1, 2, 3):  # 1 and 2 re-sent after a lost acknowledgement
        recorder.publish(device.topic("telemetry"), telemetry(seq))
    wait_until(lambda: len(registry.telemetry("gw-1")) == 3, "three telemetry samples")
    assert [(t.sample.seq, t.sample.metrics) for t in registry.telemetry("gw-1")] == [
        (1, {"latency_ms": 1}), (2, {"latency_ms": 2}), (3, {"latency_ms": 3})]

    recorder.publish(device.topic("events"), messages.encode(messages.Event("offline", 13.0)))
    wait_until(lambda: not registry.get_device("gw-1").online,  # type: ignore[union-attr]
               "the device marked offline")


def test_an_event_a_device_numbered_is_stored_once_however_often_it_is_sent(
        service: FleetService, tmp_path: Path, clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)

    def event(kind: str, seq: int | None) -> bytes:
        return messages.encode(messages.Event(kind, 1.0, {"n": seq}, seq=seq))

    # The agent's outbox sends again whatever lacked a PUBACK when its link broke; an
    # older agent (or the MQTT will) sends no seq, and is stored as sent.
    for kind, seq in (("install.staged", 5), ("install.staged", 5), ("install.activating", 6),
                      ("install.staged", 5), ("fetch.started", None), ("fetch.started", None),
                      ("install.committed", 7)):
        recorder.publish(device.topic("events"), event(kind, seq))
    wait_until(lambda: [e for e in service.registry.events(device="gw-1")
                        if e.kind == "agent.install.committed"], "the last event")
    assert [e.kind for e in service.registry.events(device="gw-1")
            if e.kind.startswith("agent.")] == [
        "agent.install.staged", "agent.install.activating", "agent.fetch.started",
        "agent.fetch.started", "agent.install.committed"]
    other = enroll(service, tmp_path, "gw-2")  # seq is per device
    connect_device(other, clients).publish(other.topic("events"), event("install.staged", 5))
    wait_until(lambda: [e for e in service.registry.events(device="gw-2")
                        if e.kind == "agent.install.staged"], "the other device's event")


def test_malformed_messages_are_recorded_and_ingest_goes_on(
        service: FleetService, tmp_path: Path, clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)
    garbage = {"reported": b"\xff not json", "events": b'{"protocol": 1}',
               "telemetry": b'{"protocol": 99, "seq": 1}', "outbox/chunks": b"[]",
               "outbox/other": b"{}"}
    for leaf, payload in garbage.items():
        recorder.publish(device.topic(leaf), payload)
    recorder.publish(device.topic("telemetry"),
                     messages.encode(messages.Telemetry(7, 1.0, {"ok": True})))
    wait_until(lambda: service.registry.telemetry("gw-1"), "the valid sample after garbage")
    errors = [e for e in service.registry.events(device="gw-1") if e.kind == PROTOCOL_ERROR]
    assert [e.detail["topic"] for e in errors] == list(garbage)
    assert "protocol version 99" in errors[2].detail["error"]
    assert service.connected


def _event(kind: str, step: int) -> bytes:
    return messages.encode(messages.Event(kind, float(step), {"step": step}))


def _steps(service: FleetService, device: str, kind: str) -> list[int]:
    """The steps of a device's events of ``kind`` (as the device sent it), in log order."""
    return [e.detail["step"] for e in service.registry.events(device=device)
            if e.kind == DEVICE_EVENT_PREFIX + kind]


def test_a_burst_is_stored_in_batches_each_device_in_order(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder], monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [enroll(service, tmp_path, f"gw-{i}") for i in range(3)]
    v1 = service.add_bundle(bundles["v1"])
    service.publish(v1.sha256, group="lab")
    recorders = [connect_device(d, clients) for d in devices]
    sizes: list[int] = []
    release = threading.Event()
    store = service.ingest._store_batch

    def counted(batch: list[Any]) -> None:
        sizes.append(len(batch))
        # Each ingest thread's first batch waits until the whole burst has arrived.
        release.wait(TIMEOUT)
        store(batch)

    monkeypatch.setattr(service.ingest, "_store_batch", counted)
    steps = 40
    total = 2 * steps * len(devices)
    for step in range(steps):
        for recorder, device in zip(recorders, devices, strict=True):
            recorder.client.publish(device.topic("events"), _event("install.verifying", step),
                                    qos=1)
            state = "committed" if step == steps - 1 else "probation"
            recorder.client.publish(device.topic("reported"), reported_payload(v1.sha256, 1, state),
                                    qos=1)
    wait_until(lambda: sum(sizes) + service.ingest.depth == total,
               "the burst to reach the service")
    release.set()
    wait_until(lambda: all(d.converged for d in service.registry.list_devices()),
               "the last reports stored")
    for device in devices:
        assert _steps(service, device.id, "install.verifying") == list(range(steps))
    assert sum(sizes) == total
    # Per thread, what arrived while its first batch waited: at most 200 per batch.
    assert len(sizes) <= 3 * service.ingest.workers


def test_messages_are_acknowledged_only_once_stored(
        service: FleetService, tmp_path: Path, clients: list[Recorder],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message the service received but had not stored when its connection broke is
    delivered again by the broker (the service had not acknowledged it)."""
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)
    holding, release = threading.Event(), threading.Event()
    original = service.registry.batch

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        holding.set()
        release.wait(TIMEOUT)
        with original():
            yield

    monkeypatch.setattr(service.registry, "batch", held)
    recorder.publish(device.topic("events"), _event("install.committed", 1))
    assert holding.wait(TIMEOUT)  # received, not stored
    recorder.close()
    service.broker.stop()  # saves the service's session: the unacknowledged message in it
    service.broker.start()
    wait_until(lambda: service.connected, "the service to reconnect", timeout=10)
    release.set()
    # Stored twice: as received first, and as delivered again after the reconnect.
    wait_until(lambda: _steps(service, "gw-1", "install.committed") == [1, 1],
               "the message delivered again")


def test_when_a_batch_fails_each_message_is_stored_alone(
        service: FleetService, tmp_path: Path, clients: list[Recorder],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)
    original = service.registry.batch
    failed: list[int] = []

    @contextlib.contextmanager
    def commit_fails_once() -> Iterator[None]:
        with original():
            yield
            if not failed:
                failed.append(1)
                raise OSError("disk I/O error")  # as a failing commit would: all undone

    monkeypatch.setattr(service.registry, "batch", commit_fails_once)
    with caplog.at_level(logging.WARNING, logger="fleet_server.service"):
        recorder.publish(device.topic("events"), _event("install.committed", 1))
        recorder.publish(device.topic("events"), _event("install.committed", 2))
        wait_until(lambda: _steps(service, "gw-1", "install.committed") == [1, 2],
                   "both events stored")
    assert failed == [1]
    assert "storing them one by one" in caplog.text


# --- hostile devices -------------------------------------------------------------------

def _protocol_errors(service: FleetService, device: str) -> list[str]:
    return [e.detail["error"] for e in service.registry.events(device=device)
            if e.kind == PROTOCOL_ERROR]


def test_retained_messages_from_devices_are_cleared_and_recorded(
        config: ServiceConfig, tmp_path: Path, clients: list[Recorder]) -> None:
    with FleetService(config) as service:
        device = enroll(service, tmp_path, "gw-1")
        recorder = connect_device(device, clients)
        for leaf in ("telemetry", "outbox/made-up-1", "outbox/made-up-2"):
            recorder.publish(device.topic(leaf), b"x" * 1000, retain=True)
        wait_until(lambda: len(_protocol_errors(service, "gw-1")) == 3,
                   "three protocol errors")
        assert all("retained" in error for error in _protocol_errors(service, "gw-1"))
    # Nothing is left on the broker: a restarted service subscribes again and is handed no
    # retained message before the sample the device sends after it is back.
    with FleetService(config) as service:
        recorder.publish(device.topic("telemetry"),
                         messages.encode(messages.Telemetry(1, 1.0, {"ok": True})))
        wait_until(lambda: service.registry.telemetry("gw-1"), "the sample")
        errors = [e for e in service.registry.events(device="gw-1") if e.kind == PROTOCOL_ERROR]
        assert len(errors) == 3, [(e.at, e.detail) for e in errors]


def test_oversized_and_forged_messages_are_refused(
        service: FleetService, tmp_path: Path, clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)
    big = messages.Reported(PROFILE, "0.1.0", {}, at=1.0)
    padded = messages.encode(big)[:-1] + b', "pad": "' + b"x" * 100_000 + b'"}'
    recorder.publish(device.topic("reported"), padded)
    recorder.publish(device.topic("events"), messages.encode(messages.Event(
        "device.enrolled", 1.0, {"group": "prod"})))
    recorder.publish(device.topic("events"), messages.encode(messages.Event(
        "install.committed", 2.0, {"version": 1})))
    wait_until(lambda: any(e.kind == "agent.install.committed"
                           for e in service.registry.events(device="gw-1")),
               "the genuine event")
    errors = _protocol_errors(service, "gw-1")
    assert any("exceeds the 64 KiB limit" in e for e in errors)
    assert any("'device.enrolled' is not one a device may send" in e for e in errors)
    kinds = [e.kind for e in service.registry.events(device="gw-1")]
    assert kinds.count("device.enrolled") == 1  # only the server's own, at enrollment
    record = service.registry.get_device("gw-1")
    assert record is not None
    assert record.reported == {}


def test_a_message_past_the_servers_packet_size_is_dropped_by_the_broker(
        service: FleetService, tmp_path: Path, clients: list[Recorder]) -> None:
    """The service announces its maximum packet size (MQTT 5): a device's 3 MiB publish,
    which the broker itself accepts (its own limit is a chunk frame's 4 MiB), is dropped
    by the broker instead of being sent to the server. The server never sees it (no
    protocol error recorded, as one for a message it read would be), stays connected, and
    stores the device's next sample."""
    device = enroll(service, tmp_path, "gw-1")
    recorder = connect_device(device, clients)
    recorder.publish(device.topic("telemetry"), b"x" * (3 * 1024 * 1024))
    recorder.publish(device.topic("telemetry"),
                     messages.encode(messages.Telemetry(1, 1.0, {"ok": True})))
    wait_until(lambda: service.registry.telemetry("gw-1"), "the genuine sample")
    assert _protocol_errors(service, "gw-1") == []
    assert service.connected
    assert service.disconnected_since is None
    assert (f"Dropping too large outgoing PUBLISH for {service.client_name}"
            in service.broker.log_tail(200))


def test_chunk_requests_beyond_a_devices_rate_go_unanswered(
        config: ServiceConfig, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    chunk = 4096
    limited = replace(config, chunk_rate_bytes=1.0, chunk_burst_bytes=3 * chunk)
    with FleetService(limited) as service:
        device = enroll(service, tmp_path, "gw-1")
        record = service.add_bundle(bundles["big"])
        service.publish(record.sha256, devices=["gw-1"])
        recorder = connect_device(device, clients, "inbox/#")
        for offset in range(0, 10 * chunk, chunk):
            recorder.client.publish(device.topic(CHUNK_REQUEST_LEAF), messages.encode(
                messages.ChunkRequest(record.sha256, offset, chunk)), qos=1)
        # A second device's answer, requested after, shows the service went through them.
        other = enroll(service, tmp_path, "gw-2")
        service.publish(record.sha256, devices=["gw-2"])
        other_recorder = connect_device(other, clients, "inbox/#")
        request_chunk(other_recorder, other, record.sha256, 0, chunk)
        # The service answered gw-1's requests before gw-2's, but the broker delivers on two
        # connections in no set order: wait for gw-1's answers, then none may be beyond 3.
        def answered() -> list[Any]:
            return [m for m in recorder.messages if m.topic == device.topic(CHUNK_LEAF)]

        wait_until(lambda: len(answered()) >= 3, "gw-1's answers within its burst")
        assert len(answered()) == 3

"""FleetService end to end over a real Mosquitto, on SQLite and on PostgreSQL.

Devices are real paho clients with certificates obtained through ``service.enroll``; they
can only use their own topics (the broker's ACL), exactly like agents. Negative checks use
a sentinel instead of sleeping: the server's messages reach the broker in the order it sent
them, and the broker delivers in order, so once a later message arrived an earlier stray one
would have too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from bundle.errors import ChecksumError, UntrustedSignatureError
from bundle.trust import TrustedState, verify_bundle
from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.errors import (
    BrokerError,
    CSRError,
    EnrollmentError,
    RegistryError,
    ReleaseError,
    ServiceError,
)
from fleet_server.ingest import DEVICE_EVENT_PREFIX, PROTOCOL_ERROR
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from protocol.enrollment import EnrollmentToken, new_secret, pin_of
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF
from tests.bundle.repo import NOW, Repo
from tests.fleet_server.server_env import (
    PROFILE,
    SimDevice,
    desired_messages,
    enroll,
    fetch_bundle,
    request_chunk,
    service_config,
    wait_until,
    write_keys,
)
from tests.mqtt_broker import TIMEOUT, Recorder
from transport.mqtt import BrokerAddress
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

pytestmark = pytest.mark.integration


@pytest.fixture
def clients() -> Iterator[list[Recorder]]:
    """Recorders to close at the end of the test (append them)."""
    made: list[Recorder] = []
    yield made
    for recorder in made:
        recorder.close()


def _connect(device: SimDevice, clients: list[Recorder], *leaves: str) -> Recorder:
    recorder = device.client()
    clients.append(recorder)
    if leaves:
        recorder.subscribe(*(device.topic(leaf) for leaf in leaves))
    return recorder


def _wait_desired(recorder: Recorder, device: SimDevice, count: int) -> messages.Desired:
    """Wait for the device's ``count``-th desired message; returns the newest."""
    recorder.wait(lambda: len(desired_messages(recorder, device)) >= count,
                  f"desired message #{count} of {device.id}")
    return desired_messages(recorder, device)[-1]


def _reported(sha: str | None, version: int, state: str = "committed") -> bytes:
    return messages.encode(messages.Reported(
        profile=PROFILE, agent_version="0.1.0",
        models={"digits": messages.ModelReport(version, sha, state)}, at=1.0))


# --- enrollment ---------------------------------------------------------------------------

def test_enroll_returns_identity_broker_and_root(service: FleetService, tmp_path: Path,
                                                 repo: Repo) -> None:
    device = enroll(service, tmp_path, "gw-1", group="lab", tags=("canary",))
    e = device.enrollment
    cert = x509.load_pem_x509_certificate(e.certificate_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    assert (e.fleet, e.group, e.root_json) == ("testfleet", "lab", repo.root)
    assert e.ca_certificate_pem == service.ca.cert_pem
    assert BrokerAddress.from_url(e.broker_url) == BrokerAddress("127.0.0.1",
                                                                 service.broker.address.port)
    record = service.registry.get_device("gw-1")
    assert record is not None
    assert (record.group, record.profile, record.tags) == ("lab", PROFILE, ("canary",))
    assert record.cert_fingerprint == certificate_fingerprint(e.certificate_pem)


def test_enroll_refusals_keep_the_token_unless_it_was_used(service: FleetService) -> None:
    token = service.issue_token("lab", 600).token
    _, csr = make_device_key_and_csr("gw-2")
    with pytest.raises(CSRError, match="does not carry a PEM CSR"):
        service.enroll(token, "gw-2", b"not a csr", PROFILE)
    with pytest.raises(CSRError, match="service identity"):
        service.enroll(token, "fleet-server", csr, PROFILE)
    with pytest.raises(RegistryError, match="invalid profile"):
        service.enroll(token, "gw-2", csr, " padded ")
    service.enroll(token, "gw-2", csr, PROFILE)  # the token survived every refusal
    with pytest.raises(EnrollmentError, match="already used by device 'gw-2'"):
        service.enroll(token, "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)
    with pytest.raises(EnrollmentError, match="not an enrollment token"):
        service.enroll("nope", "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)
    unknown = EnrollmentToken(new_secret(), service.ca_pin, pin_of(service.root_json()))
    with pytest.raises(EnrollmentError, match="unknown enrollment token"):
        service.enroll(unknown.encode(), "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)


# --- (a) publishing -----------------------------------------------------------------------

def test_publish_to_group_reaches_exactly_that_group(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    a1, a2 = (enroll(service, tmp_path, d, group="lab") for d in ("a1", "a2"))
    b1 = enroll(service, tmp_path, "b1", group="field")
    r_a1, r_b1 = _connect(a1, clients, "desired"), _connect(b1, clients, "desired")
    # Enrollment published an empty desired state, retained: a fresh device gets it at once.
    for recorder, device in ((r_a1, a1), (r_b1, b1)):
        _wait_desired(recorder, device, 1)
        assert desired_messages(recorder, device)[0].models == {}

    record = service.add_bundle(bundles["v1"])
    result = service.publish(record.sha256, group="lab")
    assert result.devices == ("a1", "a2")
    assert [c.device for c in result.changes] == ["a1", "a2"]
    want = {"digits": messages.DesiredModel(1, record.sha256, len(bundles["v1"]))}
    assert _wait_desired(r_a1, a1, 2).models == want
    # a2 connects afterwards: the retained message is there for it.
    r_a2 = _connect(a2, clients, "desired")
    assert _wait_desired(r_a2, a2, 1).models == want

    # Sentinel: b1's own publish comes after the group's; b1 gets only that one.
    service.publish(record.sha256, devices=["b1"])
    _wait_desired(r_b1, b1, 2)
    assert [m.models for m in desired_messages(r_b1, b1)] == [{}, want]
    assert r_b1.topics() == {b1.topic("desired")}


def test_rollback_publishes_a_re_release_of_the_previous_state(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes], repo: Repo,
        clients: list[Recorder]) -> None:
    """Issue 9.13: devices refuse v1 once they trust v2, so a rollback re-releases v1's
    contents as v3 under fresh metadata, signed by the server, and desires that."""
    device = enroll(service, tmp_path, "gw-1")
    v1, v2 = service.add_bundle(bundles["v1"]), service.add_bundle(bundles["v2"])
    service.publish(v1.sha256, group="lab")
    service.publish(v2.sha256, devices=["gw-1"])
    result = service.rollback(group="lab", model="digits")
    [v3] = result.released
    assert (v3.name, v3.version, v3.rollback_of) == ("digits", 3, 1)
    assert [(c.before and c.before.version, c.after and c.after.version)
            for c in result.changes] == [(2, 3)]
    recorder = _connect(device, clients, "desired")
    want = _wait_desired(recorder, device, 1).models["digits"]
    assert (want.version, want.bundle_sha256) == (3, v3.sha256)

    # What the device fetches verifies on a device that trusts v2, and carries v1.
    data = fetch_bundle(recorder, device, v3.sha256, v3.size)
    trusted = TrustedState(root=repo.root)
    for earlier in (bundles["v1"], bundles["v2"]):
        verified = verify_bundle(earlier, trusted, now=NOW)
        trusted = verified.trusted.with_installed("digits", verified.manifest.version,
                                                  verified.manifest_sha256)
    verified = verify_bundle(data, trusted, now=NOW)
    assert (verified.manifest.version, verified.manifest.rollback_of) == (3, 1)
    assert verified.artifacts == verify_bundle(bundles["v1"], TrustedState(root=repo.root),
                                               now=NOW).artifacts

    service.rollback(devices=["gw-1"])  # back to nothing: an empty desired is published
    recorder.wait(lambda: desired_messages(recorder, device)[-1].models == {},
                  "the empty desired state")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        service.rollback(devices=["gw-1"])


def test_without_online_keys_a_rollback_says_so_and_changes_nothing(
        tmp_path: Path, db_url: str, repo: Repo, bundles: dict[str, bytes]) -> None:
    keys = write_keys(tmp_path / "keys", repo, online=False)
    with FleetService(service_config(tmp_path / "server", keys, db_url)) as service:
        enroll(service, tmp_path, "gw-1")
        v1, v2 = service.add_bundle(bundles["v1"]), service.add_bundle(bundles["v2"])
        service.publish(v1.sha256, group="lab")
        service.publish(v2.sha256, group="lab")
        with pytest.raises(ReleaseError, match=r"cannot sign a re-release of digits v1 .*"
                           r"fleet serve --keys"):
            service.rollback(group="lab")
        device = service.registry.get_device("gw-1")
        assert device is not None
        assert device.desired["digits"].version == 2
        assert [b.version for b in service.registry.list_bundles()] == [1, 2]


def test_bad_bundles_are_refused_with_the_reason(service: FleetService,
                                                 bundles: dict[str, bytes]) -> None:
    tampered = bytearray(bundles["v1"])
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(ChecksumError):
        service.add_bundle(bytes(tampered))
    with pytest.raises(UntrustedSignatureError):
        service.add_bundle(Repo().build())  # signed by keys this fleet does not trust
    assert service.registry.list_bundles() == []


# --- (b) chunks ---------------------------------------------------------------------------

def test_chunks_are_served_for_desired_bundles_only(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    big, v1, v2 = (service.add_bundle(bundles[k]) for k in ("big", "v1", "v2"))
    service.publish(big.sha256, devices=["gw-1"])
    recorder = _connect(device, clients)

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
    r_a1, r_b1 = _connect(a1, clients, "inbox/#"), _connect(b1, clients, "inbox/#")
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


# --- (c) ingest ---------------------------------------------------------------------------

def test_reported_events_and_telemetry_land_in_the_registry(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    v1 = service.add_bundle(bundles["v1"])
    service.publish(v1.sha256, group="lab")
    recorder = _connect(device, clients)
    registry = service.registry

    recorder.publish(device.topic("reported"), _reported(v1.sha256, 1))
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
    recorder = _connect(device, clients)

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
    _connect(other, clients).publish(other.topic("events"), event("install.staged", 5))
    wait_until(lambda: [e for e in service.registry.events(device="gw-2")
                        if e.kind == "agent.install.staged"], "the other device's event")


def test_malformed_messages_are_recorded_and_ingest_goes_on(
        service: FleetService, tmp_path: Path, clients: list[Recorder]) -> None:
    device = enroll(service, tmp_path, "gw-1")
    recorder = _connect(device, clients)
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
    recorders = [_connect(d, clients) for d in devices]
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
            recorder.client.publish(device.topic("reported"), _reported(v1.sha256, 1, state),
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
    recorder = _connect(device, clients)
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
    recorder = _connect(device, clients)
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


# --- (d) restart --------------------------------------------------------------------------

def test_restart_keeps_state_and_republishes_desired(
        config: ServiceConfig, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    with FleetService(config) as service:
        device = enroll(service, tmp_path, "gw-1")
        v1 = service.add_bundle(bundles["v1"])
        service.publish(v1.sha256, group="lab")
        url = service.broker_url
        events = len(service.registry.events())
    # A broker crash can lose retained messages: wipe its database to prove the re-publish.
    shutil.rmtree(config.data_dir / "broker" / "persistence")

    with FleetService(config) as service:
        assert service.broker_url == url  # the same port: enrolled devices find it
        record = service.registry.get_device("gw-1")
        assert record is not None
        assert record.desired["digits"].bundle_sha256 == v1.sha256
        assert [b.sha256 for b in service.registry.list_bundles()] == [v1.sha256]
        assert len(service.registry.events()) >= events
        recorder = _connect(device, clients, "desired")
        assert _wait_desired(recorder, device, 1).models["digits"].version == 1
        assert fetch_bundle(recorder, device, v1.sha256, v1.size) == bundles["v1"]
        recorder.close()  # before its broker goes, or it waits out a reconnect attempt


def test_service_reconnects_after_a_broker_restart(
        tmp_path: Path, repo: Repo, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    config = service_config(tmp_path / "server", write_keys(tmp_path / "keys", repo),
                            f"sqlite:///{tmp_path / 'fleet.db'}")
    with FleetService(config) as service:
        device = enroll(service, tmp_path, "gw-1")
        service.broker.stop()
        wait_until(lambda: not service.connected, "the service to notice")
        shutil.rmtree(config.data_dir / "broker" / "persistence")
        service.broker.start()
        wait_until(lambda: service.connected, "the service to reconnect", timeout=10)
        # Re-subscribed (the broker lost the session) and re-published the desired state.
        recorder = _connect(device, clients, "desired")
        _wait_desired(recorder, device, 1)
        v1 = service.add_bundle(bundles["v1"])
        service.publish(v1.sha256, devices=["gw-1"])
        recorder.publish(device.topic("reported"), _reported(v1.sha256, 1))
        wait_until(lambda: service.registry.get_device("gw-1").converged,  # type: ignore[union-attr]
                   "the report after the reconnect")
        recorder.close()


def test_external_broker_by_url(tmp_path: Path, repo: Repo, clients: list[Recorder]) -> None:
    """A broker the service does not run (here a Mosquitto started beside it, trusting the
    fleet CA in the data directory): the service connects to it and hands its URL out."""
    data = tmp_path / "server"
    ca = FleetCA.create(data / "ca", "testfleet")
    tls = ca.write_identity(ca.issue_server_cert(), tmp_path / "broker-tls", "broker")
    with Broker.embedded(BrokerConfig("testfleet", tmp_path / "broker", tls,
                                      bind_address="127.0.0.1")) as broker:
        config = replace(service_config(data, write_keys(tmp_path / "keys", repo),
                                        f"sqlite:///{tmp_path / 'fleet.db'}"),
                         broker_url=broker.address.url)
        with FleetService(config) as service:
            assert service.broker_url == broker.address.url
            device = enroll(service, tmp_path, "gw-1")
            assert device.enrollment.broker_url == broker.address.url
            recorder = _connect(device, clients, "desired")
            assert _wait_desired(recorder, device, 1).models == {}
            recorder.close()
        assert broker.running  # not the service's to stop


def test_unreachable_broker_fails_start_with_a_reason(tmp_path: Path, repo: Repo) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = replace(service_config(tmp_path / "server", write_keys(tmp_path / "keys", repo),
                                    f"sqlite:///{tmp_path / 'fleet.db'}"),
                     broker_url=f"mqtts://127.0.0.1:{port}", connect_timeout=1.0)
    service = FleetService(config)
    started = time.monotonic()
    with pytest.raises(BrokerError, match=f"could not connect to the broker at "
                       f"mqtts://127.0.0.1:{port} as fleet-server within 1 s"):
        service.start()
    assert time.monotonic() - started < 4
    with pytest.raises(RuntimeError, match="not started"):
        service.registry  # noqa: B018 (everything was closed again)


# --- hostile devices ----------------------------------------------------------------------

def _protocol_errors(service: FleetService, device: str) -> list[str]:
    return [e.detail["error"] for e in service.registry.events(device=device)
            if e.kind == PROTOCOL_ERROR]


def test_retained_messages_from_devices_are_cleared_and_recorded(
        config: ServiceConfig, tmp_path: Path, clients: list[Recorder]) -> None:
    with FleetService(config) as service:
        device = enroll(service, tmp_path, "gw-1")
        recorder = _connect(device, clients)
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
    recorder = _connect(device, clients)
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


def test_chunk_requests_beyond_a_devices_rate_go_unanswered(
        config: ServiceConfig, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    chunk = 4096
    limited = replace(config, chunk_rate_bytes=1.0, chunk_burst_bytes=3 * chunk)
    with FleetService(limited) as service:
        device = enroll(service, tmp_path, "gw-1")
        record = service.add_bundle(bundles["big"])
        service.publish(record.sha256, devices=["gw-1"])
        recorder = _connect(device, clients, "inbox/#")
        for offset in range(0, 10 * chunk, chunk):
            recorder.client.publish(device.topic(CHUNK_REQUEST_LEAF), messages.encode(
                messages.ChunkRequest(record.sha256, offset, chunk)), qos=1)
        # A second device's answer, requested after, shows the service went through them.
        other = enroll(service, tmp_path, "gw-2")
        service.publish(record.sha256, devices=["gw-2"])
        other_recorder = _connect(other, clients, "inbox/#")
        request_chunk(other_recorder, other, record.sha256, 0, chunk)
        answered = [m for m in recorder.messages if m.topic == device.topic(CHUNK_LEAF)]
        assert len(answered) == 3


def test_publishing_without_a_broker_says_it_was_not_delivered(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    """kill -9 of the embedded broker: the service says it is cut off, publishes are stored
    but reported undelivered, and all is sent once the supervisor has restarted it."""
    device = enroll(service, tmp_path, "gw-1")
    record = service.add_bundle(bundles["v1"])
    pid = service.broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not service.connected, "the service to see the broker gone")
    assert service.disconnected_since is not None
    result = service.publish(record.sha256, devices=["gw-1"])
    assert result.delivered is False
    wait_until(lambda: service.connected, "the broker's restart and the reconnection",
               timeout=30)
    assert service.broker.restarts == 1
    recorder = _connect(device, clients, "desired")
    assert _wait_desired(recorder, device, 1).models["digits"].version == 1


def test_a_second_server_on_the_same_data_directory_is_refused(
        service: FleetService, config: ServiceConfig) -> None:
    with pytest.raises(ServiceError, match=f"another fleet server \\(pid {os.getpid()}\\)"):
        FleetService(config).start()
    assert service.connected  # the first one is untouched


@pytest.mark.parametrize(("content", "message"), [
    (b"garbage", "is not TUF metadata"),
    (b"", "is not TUF metadata"),
])
def test_a_root_that_is_not_a_root_is_refused_at_start(
        config: ServiceConfig, content: bytes, message: str) -> None:
    (config.keys_dir / "root.json").write_bytes(content)
    with pytest.raises(ServiceError, match=message):
        FleetService(config).start()

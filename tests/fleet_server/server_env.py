"""A fleet service for tests: real Mosquitto, real registry (SQLite or PostgreSQL), a TUF
root from the in-memory test repository, and simulated devices that enroll through the
service and talk to it with real paho clients and their own certificates.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from common.atomic import write_atomic
from fleet_server.enroller import Enrollment
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF, device_topic
from tests.bundle.repo import Repo
from tests.mqtt_broker import TIMEOUT, Recorder, require_mosquitto
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client
from transport.x509 import make_device_key_and_csr

PROFILE = "x86-avx2"


def protocol_bytes(n: int) -> bytes:
    """``n`` bytes that do not compress or repeat in chunk-sized blocks."""
    return (secrets.token_bytes(4096) * (n // 4096 + 1))[:n]


def write_keys(directory: Path, repo: Repo, *, online: bool = True) -> Path:
    """``repo``'s keys as a keys directory (fleet_server.keys layout): root.json, the root
    history and, with ``online``, the online keys the server signs re-releases with."""
    write_atomic(directory / "root.json", repo.root_chain[-1])
    for version, root in enumerate(repo.root_chain, start=1):
        write_atomic(directory / "repository" / "root_history" / f"{version}.root.json", root)
    for role in ("targets", "snapshot", "timestamp") if online else ():
        for signer in repo.signers[role]:
            assert isinstance(signer, CryptoSigner)
            write_atomic(directory / "online" / f"{role}-{signer.public_key.keyid[:16]}.pem",
                         signer.private_bytes, 0o600)
    return directory


def service_config(data_dir: Path, keys_dir: Path, db_url: str, **options: Any) -> ServiceConfig:
    """A service on loopback with a free MQTT port (kept across restarts in data_dir)."""
    require_mosquitto()
    return ServiceConfig(data_dir=data_dir, keys_dir=keys_dir, fleet="testfleet",
                         db_url=db_url, mqtt_port=0, mqtt_bind="127.0.0.1",
                         connect_timeout=TIMEOUT, **options)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class SimDevice:
    """A device enrolled through the service, with its key, certificate and enrollment."""

    id: str
    enrollment: Enrollment
    identity: TLSIdentity
    fleet: str

    def topic(self, leaf: str) -> str:
        return device_topic(self.fleet, self.id, leaf)

    def client(self) -> Recorder:
        """A connected recorder (MQTT 5, persistent session) as this device."""
        address = BrokerAddress.from_url(self.enrollment.broker_url)
        recorder = Recorder(create_client(ClientSettings(address, self.identity)))
        recorder.connect()
        return recorder


def enroll(service: FleetService, directory: Path, device_id: str, *, group: str = "lab",
           tags: tuple[str, ...] = ()) -> SimDevice:
    """Enroll a device the way the agent does: key and CSR made here, token from the
    registry, certificate from the service; files written under ``directory``."""
    key_pem, csr_pem = make_device_key_and_csr(device_id)
    token = service.issue_token(group, 600).token
    enrollment = service.enroll(token, device_id, csr_pem, PROFILE, tags)
    home = directory / "devices" / device_id
    write_atomic(home / "device.key", key_pem, 0o600)
    write_atomic(home / "device.crt", enrollment.certificate_pem)
    write_atomic(home / "ca.crt", enrollment.ca_certificate_pem)
    identity = TLSIdentity(home / "ca.crt", home / "device.crt", home / "device.key")
    return SimDevice(device_id, enrollment, identity, enrollment.fleet)


def desired_messages(recorder: Recorder, device: SimDevice) -> list[messages.Desired]:
    """Every desired message the device received, decoded, oldest first."""
    with recorder._changed:
        payloads = [m.payload for m in recorder.messages if m.topic == device.topic("desired")]
    return [messages.decode_desired(bytes(p)) for p in payloads]


def fetch_bundle(recorder: Recorder, device: SimDevice, sha256: str, size: int,
                 chunk: int = 256 * 1024) -> bytes:
    """Pull a bundle chunk by chunk as an agent does (one request at a time), checking each
    chunk's hash (decode_chunk does) and that the whole matches ``sha256``."""
    recorder.subscribe(device.topic("inbox/#"))
    data = bytearray()
    while len(data) < size:
        answer = request_chunk(recorder, device, sha256, len(data), chunk)
        assert answer.error is None, answer.error
        assert answer.total == size
        data += answer.data
    return bytes(data)


def request_chunk(recorder: Recorder, device: SimDevice, sha256: str, offset: int,
                  length: int) -> messages.Chunk:
    """Send one chunk request and return the decoded answer (the device must be subscribed
    to its inbox)."""
    topic = device.topic(CHUNK_LEAF)
    with recorder._changed:
        before = sum(1 for m in recorder.messages if m.topic == topic)
    recorder.publish(device.topic(CHUNK_REQUEST_LEAF), messages.encode(
        messages.ChunkRequest(sha256, offset, length)))

    def answered() -> bool:
        return sum(1 for m in recorder.messages if m.topic == topic) > before

    recorder.wait(answered, f"the chunk at {offset}")
    with recorder._changed:
        payload = [m.payload for m in recorder.messages if m.topic == topic][before]
    return messages.decode_chunk(bytes(payload))


def connect_device(device: SimDevice, clients: list[Recorder], *leaves: str) -> Recorder:
    """Connect ``device`` (closed with ``clients``), subscribed to its own ``leaves``."""
    recorder = device.client()
    clients.append(recorder)
    if leaves:
        recorder.subscribe(*(device.topic(leaf) for leaf in leaves))
    return recorder


def wait_desired(recorder: Recorder, device: SimDevice, count: int) -> messages.Desired:
    """Wait for the device's ``count``-th desired message; returns the newest."""
    recorder.wait(lambda: len(desired_messages(recorder, device)) >= count,
                  f"desired message #{count} of {device.id}")
    return desired_messages(recorder, device)[-1]


def reported_payload(sha: str | None, version: int, state: str = "committed") -> bytes:
    """A device's ``reported`` message: digits at ``version`` (bundle ``sha``) in ``state``."""
    return messages.encode(messages.Reported(
        profile=PROFILE, agent_version="0.1.0",
        models={"digits": messages.ModelReport(version, sha, state)}, at=1.0))


def check_device_round_trip(service: FleetService, directory: Path, bundle: bytes,
                            model: str, protocol: Any) -> None:
    """A device enrolled on ``service``'s (external) broker gets its desired state, its
    event sent twice is stored once, and it fetches ``bundle`` (of ``model``) in chunks:
    what every broker the fleet runs on must carry."""
    device = enroll(service, directory, "gw-1")
    record = service.add_bundle(bundle)
    service.publish(record.sha256, devices=["gw-1"])
    recorder = Recorder(create_client(ClientSettings(
        BrokerAddress.from_url(device.enrollment.broker_url), device.identity,
        protocol=protocol)))
    try:
        recorder.connect()
        recorder.subscribe(device.topic("desired"))
        desired = recorder.wait_message(device.topic("desired"))
        assert model in messages.decode_desired(bytes(desired.payload)).models
        for _ in range(2):  # the same event twice: stored once
            recorder.publish(device.topic("events"), messages.encode(messages.Event(
                "fetch.started", time.time(), {"model": model}, seq=7)))
        wait_until(lambda: [e for e in service.registry.events(device="gw-1")
                            if e.kind == "agent.fetch.started"], "the event stored")
        assert fetch_bundle(recorder, device, record.sha256, record.size) == bundle
        assert len([e for e in service.registry.events(device="gw-1")
                    if e.kind == "agent.fetch.started"]) == 1
    finally:
        recorder.close()

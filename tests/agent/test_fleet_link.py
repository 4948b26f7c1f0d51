"""The agent's fleet link against a real Mosquitto (TLS, ACL), with the test as the server.

The server side here is a plain MQTT client with the server's certificate that publishes a
desired state and answers chunk requests from bundles it holds: enough to drive the link
through fetch, install, report, a broker outage mid-transfer, and a rejected bundle.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client, MQTTMessage

from agent.config import FleetSettings
from agent.fleet_link import FleetLink, TelemetrySource, next_fetch
from agent.install_state import InstallState
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from agent.telemetry import TelemetryBuffer, TelemetryCollector, TelemetryFeed
from agent.trust_store import TrustStore
from bundle.trust import TrustedState
from firmware_profiles.model import Profile
from fleet_server.broker import Broker
from protocol.messages import (
    Chunk,
    Desired,
    DesiredModel,
    Telemetry,
    decode_chunk_request,
    decode_event,
    decode_reported,
    decode_telemetry,
    encode,
    encode_chunk,
)
from protocol.topics import CHUNK_LEAF, CHUNK_REQUEST_LEAF
from tests.agent.bundles import DIGITS, digits_spec, samples
from tests.agent.conftest import fill_disk
from tests.bundle.repo import Repo
from tests.mqtt_broker import TestFleet, require_mosquitto
from transport.mqtt import close_client

pytestmark = pytest.mark.integration

DEVICE = "gw-1"
S = InstallState


@dataclass
class FakeServer:
    """Desired state out, chunk answers and reports in."""

    client: Client
    fleet: TestFleet
    bundles: dict[str, bytes] = field(default_factory=dict)
    served_bytes: int = 0
    requests: list[int] = field(default_factory=list)
    reports: list[bytes] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    telemetry: list[int] = field(default_factory=list)
    answer: Callable[[int], bool] = lambda offset: True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def topic(self, leaf: str) -> str:
        return self.fleet.topic(DEVICE, leaf)

    def on_message(self, client: Client, userdata: object, message: MQTTMessage) -> None:
        if message.topic == self.topic(CHUNK_REQUEST_LEAF):
            request = decode_chunk_request(bytes(message.payload))
            with self.lock:
                self.requests.append(request.offset)
            if not self.answer(request.offset):
                return
            data = self.bundles[request.bundle_sha256]
            piece = data[request.offset:request.offset + request.length]
            with self.lock:
                self.served_bytes += len(piece)
            client.publish(self.topic(CHUNK_LEAF), encode_chunk(
                Chunk(request.bundle_sha256, request.offset, len(data), piece)), qos=1)
        elif message.topic == self.topic("reported"):
            self.reports.append(bytes(message.payload))
        elif message.topic == self.topic("events"):
            self.events.append(decode_event(bytes(message.payload)).kind)
        elif message.topic == self.topic("telemetry"):
            self.telemetry.append(decode_telemetry(bytes(message.payload)).seq)

    def want(self, version: int, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.bundles[sha] = data
        desired = Desired({"digits": DesiredModel(version, sha, len(data))}, time.time())
        self.client.publish(self.topic("desired"), encode(desired), qos=1, retain=True)
        return sha

    def last_report(self) -> dict[str, object] | None:
        if not self.reports:
            return None
        reported = decode_reported(self.reports[-1])
        return {name: (m.version, m.bundle_sha256, m.state)
                for name, m in reported.models.items()}


def wait(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fleet(tmp_path: Path) -> TestFleet:
    require_mosquitto()
    return TestFleet.create(tmp_path / "pki")


@pytest.fixture
def broker(fleet: TestFleet, tmp_path: Path) -> Iterator[Broker]:
    with Broker.embedded(fleet.broker_config(tmp_path / "broker")) as broker:
        yield broker


@pytest.fixture
def server(fleet: TestFleet, broker: Broker) -> Iterator[FakeServer]:
    client = broker.client(fleet.server_identity())
    fake = FakeServer(client, fleet)
    client.on_message = fake.on_message
    client.on_connect = lambda c, *a: c.subscribe(fleet.topic("+", "#"), qos=1)
    client.loop_start()
    wait(client.is_connected, "the server client to connect")
    yield fake
    close_client(client)


@pytest.fixture
def link_factory(fleet: TestFleet, broker: Broker, state_dir: Path,
                 x86: Profile) -> Iterator[Callable[..., FleetLink]]:
    made: list[tuple[FleetLink, Runtime]] = []
    identity = fleet.device_identity(DEVICE)

    def make(chunk_bytes: int = 16 * 1024, telemetry: Callable[[Runtime], TelemetrySource]
             | None = None, state: Path | None = None) -> FleetLink:
        runtime = Runtime(state or state_dir, x86, policy=ProbationPolicy(window_s=0.0))
        runtime.start(interval_s=0.1)
        settings = FleetSettings(fleet.ca.fleet, DEVICE, broker.address.url,
                                 identity.ca_file, identity.cert_file, identity.key_file,
                                 telemetry_interval_s=0.2)
        link = FleetLink(runtime, settings, chunk_bytes=chunk_bytes,
                         telemetry=telemetry(runtime) if telemetry else None)
        link.start()
        made.append((link, runtime))
        return link

    yield make
    for link, runtime in made:
        link.stop()
        runtime.close()


def test_desired_bundle_is_fetched_installed_and_reported(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory()
    sha1 = server.want(1, repo.build(digits_spec(1)))
    wait(lambda: server.last_report() == {"digits": (1, sha1, "committed")}, "v1 committed")
    assert link.runtime.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
    sha2 = server.want(2, repo.build(digits_spec(2)))
    wait(lambda: server.last_report() == {"digits": (2, sha2, "committed")}, "v2 committed")
    assert "install.probation" in server.events
    assert "install.committed" in server.events
    assert "fetch.started" in server.events


def test_a_broker_outage_mid_transfer_resumes_where_it_broke(
        server: FakeServer, broker: Broker, repo: Repo,
        link_factory: Callable[..., FleetLink]) -> None:
    data = repo.build(digits_spec(1))
    chunk = 16 * 1024
    assert len(data) > 6 * chunk
    # The server answers only the first three chunks, then the broker goes down.
    server.answer = lambda offset: offset < 3 * chunk
    link = link_factory(chunk_bytes=chunk)
    sha = server.want(1, data)
    wait(lambda: _partial_size(link) == 3 * chunk, "3 chunks on disk")
    broker.stop()
    wait(lambda: not link.connected, "the link to notice")
    server.answer = lambda offset: True
    with server.lock:
        server.requests.clear()
    broker.start()
    wait(lambda: server.last_report() == {"digits": (1, sha, "committed")}, "v1 committed")
    assert min(server.requests) == 3 * chunk  # resumed, not restarted
    assert server.served_bytes < len(data) + 4 * chunk


def _partial_size(link: FleetLink) -> int:
    parts = list(link.installer.dirs.incoming.glob("*.part"))
    return parts[0].stat().st_size if parts else -1


def test_a_fetch_resumes_across_an_agent_restart_from_the_last_whole_chunk(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    # issue 10 item 3: a partial file cut mid-chunk (a short write) stayed at 81% forever;
    # issue 11: downloading is the real fetch, its record resumed after a restart.
    data = repo.build(digits_spec(1))
    chunk = 16 * 1024
    server.answer = lambda offset: offset < 3 * chunk
    link = link_factory(chunk_bytes=chunk)
    sha = server.want(1, data)
    wait(lambda: _partial_size(link) == 3 * chunk, "3 chunks on disk")
    pending = link.installer.pending()
    assert [(r.state, r.bundle_sha256) for r in pending] == [(S.DOWNLOADING, sha)]
    link.stop()
    link.runtime.close()
    part = next(link.installer.dirs.incoming.glob("*.part"))
    with part.open("ab") as f:
        f.write(b"half a chunk" * 100)  # as a write cut short by a full disk leaves it
    server.answer = lambda offset: True
    with server.lock:
        server.requests.clear()
    restarted = link_factory(chunk_bytes=chunk)
    restarted.runtime.resume_installs()
    wait(lambda: server.last_report() == {"digits": (1, sha, "committed")}, "v1 committed")
    assert min(server.requests) == 3 * chunk  # resumed at the last whole chunk
    latest = restarted.installer.records()[0]
    assert (latest.install_id, latest.state) == (pending[0].install_id, S.COMMITTED)
    assert not list(restarted.installer.dirs.incoming.iterdir())


def test_a_rejected_bundle_is_reported_and_not_retried(
        server: FakeServer, repo: Repo, link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory()
    sha1 = server.want(1, repo.build(digits_spec(1)))
    wait(lambda: server.last_report() == {"digits": (1, sha1, "committed")}, "v1 committed")
    good = repo.build(digits_spec(2))
    server.want(2, good[:-50] + bytes(50))  # tampered in transit or at rest
    def failed_reported() -> bool:
        install = decode_reported(server.reports[-1]).installs.get("digits")
        return install is not None and install.state == "failed"

    wait(lambda: "install.failed" in server.events and failed_reported(),
         "the install to fail and be reported")
    reported = decode_reported(server.reports[-1])
    assert reported.models["digits"].version == 1
    install = reported.installs["digits"]
    assert install.state == "failed"
    assert install.reason is not None
    assert install.reason.startswith("rejected:")
    fetches = server.events.count("fetch.started")
    # The link's worker looks again and decides there is nothing to fetch: given up on
    # that bundle, also by a restarted agent (the failed record says so).
    link.in_line.clear()
    assert link.in_line.wait(20)
    assert server.events.count("fetch.started") == fetches
    assert link.runtime.model("digits").version == 1
    link.stop()
    link.runtime.close()
    restarted = link_factory()
    restarted.runtime.resume_installs()
    assert restarted.in_line.wait(20)
    assert server.events.count("fetch.started") == fetches
    assert restarted.runtime.model("digits").version == 1
    assert not list(restarted.installer.dirs.incoming.iterdir())  # nothing left behind


def test_telemetry_survives_a_broker_outage_in_order_and_complete(
        server: FakeServer, broker: Broker, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    appended: list[int] = []

    class Recording(TelemetryBuffer):
        def append(self, at: float, metrics: Mapping[str, Any]) -> Telemetry:
            sample = super().append(at, metrics)
            appended.append(sample.seq)
            return sample

    buffer = Recording(tmp_path / "telemetry.db")
    link = link_factory(telemetry=lambda runtime: TelemetryFeed(TelemetryCollector(runtime),
                                                                buffer))
    link.runtime.load_file(DIGITS, "digits")
    wait(lambda: len(server.telemetry) >= 3, "telemetry to flow")
    broker.stop()
    wait(lambda: not link.connected, "the link to notice")
    # Apps on the device do not notice: the runtime serves on.
    assert link.runtime.infer("digits", {"input": samples(2)})["logits"].shape == (2, 10)
    during = len(appended)
    wait(lambda: len(appended) >= during + 4, "samples to pile up in the buffer meanwhile")
    assert len(buffer) >= 4
    broker.start()
    last = appended[-1]
    wait(lambda: last in server.telemetry, "the buffered samples to arrive")
    received = [seq for seq in server.telemetry if seq <= last]
    # Everything sampled reached the server, first arrivals in order. A sample whose PUBACK
    # was lost with the connection is sent again (the server ignores a seq it has).
    assert sorted(set(received)) == [seq for seq in appended if seq <= last]
    first_arrivals = list(dict.fromkeys(received))
    assert first_arrivals == sorted(first_arrivals)
    buffer.close()


def test_next_fetch_decides_without_a_broker() -> None:
    a, b = ("a" * 64, "b" * 64)
    desired = Desired({"zeta": DesiredModel(2, b, 10), "alpha": DesiredModel(1, a, 10)}, 0.0)
    assert next_fetch(None, {}, {}) is None
    assert next_fetch(desired, {}, {}) == ("alpha", desired.models["alpha"])  # name order
    assert next_fetch(desired, {"alpha": a}, {}) == ("zeta", desired.models["zeta"])
    assert next_fetch(desired, {"alpha": a, "zeta": b}, {}) is None  # in line
    assert next_fetch(desired, {"alpha": a}, {"zeta": b}) is None  # failed: not again
    newer = Desired({"zeta": DesiredModel(3, "c" * 64, 10)}, 1.0)
    assert next_fetch(newer, {}, {"zeta": b}) == ("zeta", newer.models["zeta"])


def test_a_disk_that_fills_during_a_fetch_fails_the_install_and_the_link_lives_on(
        server: FakeServer, repo: Repo, small_disk: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    # issue 10 item 2: ENOSPC escaped bundle_fetch.receive into paho's thread, which died;
    # the server saw "downloading 23%" forever and the agent never reconnected.
    state = small_disk / "state"
    TrustStore(state / "trust").save(TrustedState(root=repo.root))
    link = link_factory(state=state)
    sha1 = server.want(1, repo.build(digits_spec(1)))
    wait(lambda: server.last_report() == {"digits": (1, sha1, "committed")}, "v1 committed")
    chunk = 16 * 1024
    filled: list[Path] = []

    def fill_after_two_chunks(offset: int) -> bool:
        if offset >= 2 * chunk and not filled:
            filled.append(fill_disk(small_disk, 0))  # something else takes the last byte
        return True

    server.answer = fill_after_two_chunks
    data2 = repo.build(digits_spec(2))
    sha2 = server.want(2, data2)

    def failed_disk_full() -> bool:
        install = decode_reported(server.reports[-1]).installs.get("digits")
        return install is not None and install.state == "failed" and (
            install.reason == "disk_full")

    wait(failed_disk_full, "the install to fail on the full disk")
    assert server.events.count("install.failed") == 1
    assert link.connected
    assert link.runtime.model("digits").version == 1
    assert not list(link.installer.dirs.incoming.iterdir())  # the partial file reclaimed
    link.in_line.clear()
    assert link.in_line.wait(20)  # waits for room rather than failing again
    assert server.events.count("install.failed") == 1
    filled[0].unlink()
    wait(lambda: server.last_report() == {"digits": (2, sha2, "committed")}, "v2 committed")

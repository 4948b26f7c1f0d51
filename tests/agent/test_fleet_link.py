"""The agent's fleet link against a real Mosquitto (TLS, ACL), with the test as the server.

The server side here is a plain MQTT client with the server's certificate that publishes a
desired state and answers chunk requests from bundles it holds: enough to drive the link
through fetch, install, report, a broker outage mid-transfer, and a rejected bundle; and
the outbox's events and telemetry through outages, a half-open link (the broker stopped
with SIGSTOP), restarts, and installs or reports that hold a thread up.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from paho.mqtt.client import Client, MQTTMessage

from agent.config import FleetSettings
from agent.fleet_link import FleetLink
from agent.install_state import InstallRecord, InstallState
from agent.outbox import Outbox
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from agent.telemetry import TelemetryCollector, TelemetrySource
from agent.trust_store import TrustStore
from bundle.trust import TrustedState
from firmware_profiles.model import Profile
from fleet_server.broker import Broker
from protocol.messages import (
    FEATURE_EVENT_BATCH,
    Chunk,
    Desired,
    DesiredModel,
    DesiredShadow,
    Event,
    Telemetry,
    decode_chunk_request,
    decode_events,
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
    event_log: list[Event] = field(default_factory=list)
    #: Per ``events`` message, the seqs it carried (several: a batch).
    event_messages: list[tuple[int | None, ...]] = field(default_factory=list)
    #: What the desired states this server publishes advertise (Desired.features).
    features: tuple[str, ...] = ()
    telemetry: list[int] = field(default_factory=list)
    samples: list[Telemetry] = field(default_factory=list)
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
            events = decode_events(bytes(message.payload))
            self.event_messages.append(tuple(e.seq for e in events))
            self.event_log.extend(events)
            self.events.extend(e.kind for e in events)
        elif message.topic == self.topic("telemetry"):
            sample = decode_telemetry(bytes(message.payload))
            self.telemetry.append(sample.seq)
            self.samples.append(sample)

    def want(self, version: int, data: bytes, *, shadow: tuple[int, bytes, float] | None = None,
             compare_previous: float = 0.0) -> str:
        """Publish a desired state for digits ``version`` (bundle ``data``), with a shadow
        candidate (version, bundle, sample rate) and a share to compare with the previous
        version when given."""
        sha = hashlib.sha256(data).hexdigest()
        self.bundles[sha] = data
        candidate = None
        if shadow is not None:
            shadow_sha = hashlib.sha256(shadow[1]).hexdigest()
            self.bundles[shadow_sha] = shadow[1]
            candidate = DesiredShadow(shadow[0], shadow_sha, len(shadow[1]), shadow[2])
        self.publish_desired(Desired({"digits": DesiredModel(
            version, sha, len(data), candidate, compare_previous)}, time.time()))
        return sha

    def publish_desired(self, desired: Desired) -> None:
        """Publish ``desired`` (retained) with this server's features."""
        desired = replace(desired, features=self.features)
        self.client.publish(self.topic("desired"), encode(desired), qos=1, retain=True)

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
             | None = None, outbox: Outbox | None = None,
             state: Path | None = None) -> FleetLink:
        runtime = Runtime(state or state_dir, x86, policy=ProbationPolicy(window_s=0.0))
        runtime.start(interval_s=0.1)
        settings = FleetSettings(fleet.ca.fleet, DEVICE, broker.address.url,
                                 identity.ca_file, identity.cert_file, identity.key_file,
                                 telemetry_interval_s=0.2)
        link = FleetLink(runtime, settings, chunk_bytes=chunk_bytes, outbox=outbox,
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


class Recording(Outbox):
    """The outbox, telling the test what was added to it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.samples: list[int] = []
        self.added = threading.Condition()

    def add_sample(self, at: float, metrics: Mapping[str, Any]) -> Telemetry:
        sample = super().add_sample(at, metrics)
        with self.added:
            self.samples.append(sample.seq)
            self.added.notify_all()
        return sample

    def wait_samples(self, count: int, what: str, timeout: float = 15.0) -> None:
        """Wait until ``count`` more samples than now have been added."""
        with self.added:
            target = len(self.samples) + count
            assert self.added.wait_for(lambda: len(self.samples) >= target, timeout), (
                f"{count} samples were not taken within {timeout} s {what}")


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Recording]:
    outbox = Recording(tmp_path / "outbox.db")
    yield outbox
    outbox.close()


def _sampling(recording: Recording) -> dict[str, Any]:
    return {"telemetry": TelemetryCollector, "outbox": recording}


def _in_order_and_complete(received: Sequence[int], sent: Sequence[int]) -> None:
    """Everything sent reached the server, first arrivals in order. A message whose PUBACK
    was lost with the connection is sent again (the server ignores a seq it has)."""
    last = sent[-1]
    arrived = [seq for seq in received if seq <= last]
    assert sorted(set(arrived)) == sorted(sent)
    first_arrivals = list(dict.fromkeys(arrived))
    assert first_arrivals == sorted(first_arrivals)


def test_telemetry_survives_a_broker_outage_in_order_and_complete(
        server: FakeServer, broker: Broker, recording: Recording,
        link_factory: Callable[..., FleetLink]) -> None:
    link = link_factory(**_sampling(recording))
    link.runtime.load_file(DIGITS, "digits")
    wait(lambda: len(server.telemetry) >= 3, "telemetry to flow")
    broker.stop()
    wait(lambda: not link.connected, "the link to notice")
    # Apps on the device do not notice: the runtime serves on.
    assert link.runtime.infer("digits", {"input": samples(2)})["logits"].shape == (2, 10)
    recording.wait_samples(4, "while the broker is down")  # they pile up in the outbox
    assert len(recording) >= 4
    broker.start()
    sent = list(recording.samples)
    wait(lambda: sent[-1] in server.telemetry, "the buffered samples to arrive")
    _in_order_and_complete(server.telemetry, sent)


def _install_log(server: FakeServer, install_id: str) -> list[tuple[str, float]]:
    return [(e.kind, e.at) for e in server.event_log
            if e.detail.get("install_id") == install_id]


def _bundle_file(repo: Repo, tmp_path: Path, version: int) -> Path:
    path = tmp_path / f"digits-{version}.efb"
    path.write_bytes(repo.build(digits_spec(version)))
    return path


def _install_during_an_outage(server: FakeServer, broker: Broker, repo: Repo, tmp_path: Path,
                               link: FleetLink) -> tuple[InstallRecord, list[int | None]]:
    """A local install while the broker is down, then the broker back: the install's record
    and the seqs of its events once the server has them all."""
    wait(lambda: server.reports, "the link to report")
    server.publish_desired(Desired({}, time.time()))
    wait(lambda: link.desired is not None, "the desired state")
    broker.stop()
    wait(lambda: not link.connected, "the link to notice")
    record = link.runtime.install(_bundle_file(repo, tmp_path, 1))
    wait(lambda: link.runtime.model("digits").state == "serving", "v1 committed")
    broker.start()
    [final] = [r for r in link.installer.records() if r.install_id == record.install_id]
    wait(lambda: ("install.committed", final.history[-1][1])
         in _install_log(server, record.install_id), "the install's events")
    seqs = [e.seq for e in server.event_log if e.detail.get("install_id") == record.install_id]
    return final, seqs


def test_events_while_the_broker_is_down_arrive_in_order_once_it_is_back(
        server: FakeServer, broker: Broker, repo: Repo, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    """Issue 9 item 17: events were published only while connected, so an install done
    during an outage (here a local one) left the server without its transitions."""
    final, _ = _install_during_an_outage(server, broker, repo, tmp_path, link_factory())
    assert final.state is InstallState.COMMITTED
    assert _install_log(server, final.install_id) == [
        (f"install.{state}", at) for state, at in final.history[1:]]
    # Every event but the MQTT will (sent by the broker) is numbered, in order.
    seqs = [e.seq for e in server.event_log if e.kind != "offline"]
    assert None not in seqs
    assert seqs == sorted(seqs)  # type: ignore[type-var]


def test_with_the_feature_an_install_s_waiting_events_arrive_in_one_batch_message(
        server: FakeServer, broker: Broker, repo: Repo, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    server.features = (FEATURE_EVENT_BATCH,)
    final, seqs = _install_during_an_outage(server, broker, repo, tmp_path, link_factory())
    assert _install_log(server, final.install_id) == [
        (f"install.{state}", at) for state, at in final.history[1:]]
    assert len(seqs) >= 4  # verifying, staged, activating, probation, committed...
    assert tuple(seqs) in server.event_messages  # all of them in one message


def test_without_the_feature_every_event_is_a_message_of_its_own(
        server: FakeServer, broker: Broker, repo: Repo, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    _, seqs = _install_during_an_outage(server, broker, repo, tmp_path, link_factory())
    assert len(seqs) >= 4
    assert all(len(message) == 1 for message in server.event_messages)


def test_a_batch_unacknowledged_when_the_broker_died_is_sent_again_whole(
        server: FakeServer, broker: Broker, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    """The broker is stopped (SIGSTOP) while a batch is in flight, then killed and started
    again: the client sends the batch again on reconnect, the outbox keeps it until then,
    and the server (deduping by seq, as here) has every event once."""
    server.features = (FEATURE_EVENT_BATCH,)
    # A clean restart saves the sessions (the server's subscription among them) in the
    # broker's persistence: the killed broker starts from there, and keeps what the link
    # sends again for the server even if the server's client reconnects later.
    broker.restart()
    link = link_factory()
    wait(lambda: server.reports, "the link to report")
    server.publish_desired(Desired({}, time.time()))
    wait(lambda: link.desired is not None, "the desired state")
    mosquitto = _broker_process(tmp_path / "broker")
    mosquitto.send_signal(signal.SIGSTOP)
    try:
        # Added at once, as an install's transitions are when the link was not listening;
        # the publisher finds them on its next pass (at the latest its retry, 5 s).
        added = [e.seq for e in link.outbox.add_events(
            [(f"install.{state}", time.time(), {"install_id": "i-1"})
             for state in ("verifying", "staged", "activating", "probation")])]
        wait(lambda: link.in_flight() == 1, "the batch handed to the client")
    finally:
        broker.stop(timeout=0.5)  # SIGKILL: the stopped broker cannot take SIGTERM
        with contextlib.suppress(psutil.NoSuchProcess):  # if stop() did not get to kill it
            mosquitto.send_signal(signal.SIGCONT)
    assert [m.seq for m in link.outbox.pending(10)] == added  # kept until acknowledged
    broker.start()
    wait(lambda: len(link.outbox) == 0, "the batch acknowledged")
    assert tuple(added) in server.event_messages  # the same batch, sent again
    log = [(e.seq, e.kind) for e in server.event_log if e.detail.get("install_id") == "i-1"]
    assert list(dict.fromkeys(log)) == [
        (seq, f"install.{state}") for seq, state in
        zip(added, ("verifying", "staged", "activating", "probation"), strict=True)]


@pytest.fixture
def offline_install(state_dir: Path, x86: Profile, repo: Repo, tmp_path: Path,
                    ) -> InstallRecord:
    """v1 installed with no fleet link, left in probation (no watchdog ran)."""
    offline = Runtime(state_dir, x86)
    record = offline.install(_bundle_file(repo, tmp_path, 1))
    offline.close()
    assert record.state is InstallState.PROBATION
    return record


def test_transitions_persisted_while_no_link_listened_are_announced_once(
        server: FakeServer, offline_install: InstallRecord, recording: Recording,
        link_factory: Callable[..., FleetLink]) -> None:
    """Issue 10 item 4: transitions made before the link listened (a resume at start-up,
    or the one persisted just before a kill) were never sent."""
    record = offline_install
    link = link_factory(**_sampling(recording))
    link.runtime.resume_installs()  # as edge-agent run does: the probation, then a commit
    wait(lambda: any(e.kind == "install.committed" for e in server.event_log),
         "the install's events")
    [final] = [r for r in link.installer.records() if r.install_id == record.install_id]
    expected = [(f"install.{state}", at) for state, at in final.history[1:]]
    assert _install_log(server, record.install_id) == expected
    # Restarted: nothing is announced twice. The outbox is in order, so once a sample taken
    # after the start arrives, anything the start announced would have arrived before it.
    link.stop()
    link.runtime.close()
    again = link_factory(**_sampling(recording))
    after = recording.samples[-1] if recording.samples else 0
    wait(lambda: any(seq > after for seq in server.telemetry), "a sample from the restart")
    assert again.connected
    assert _install_log(server, record.install_id) == expected


def _broker_process(broker_dir: Path) -> psutil.Process:
    """The test's Mosquitto (a child of this process started with that directory's
    configuration)."""
    conf = str(broker_dir / "mosquitto.conf")
    [found] = [p for p in psutil.Process().children() if conf in p.cmdline()]
    return found


def test_sampling_keeps_its_schedule_on_a_half_open_link(
        server: FakeServer, recording: Recording, tmp_path: Path,
        link_factory: Callable[..., FleetLink]) -> None:
    """Issue 10 item 6: on a link that looks up but answers nothing, each flush waited 5 s
    for a PUBACK in the sampling thread (one sample per 5.3 s instead of every interval).
    Here the broker is stopped with SIGSTOP: TCP stays up, nothing is acknowledged."""
    link = link_factory(**_sampling(recording))
    wait(lambda: len(server.telemetry) >= 2, "telemetry to flow")
    mosquitto = _broker_process(tmp_path / "broker")
    mosquitto.send_signal(signal.SIGSTOP)
    try:
        assert link.connected
        # At 0.2 s an interval, 12 samples take 2.4 s; stalled by 5 s waits, a minute.
        recording.wait_samples(12, "with the broker stopped")
        assert link.connected  # still half-open: the samples were not taken offline
    finally:
        mosquitto.send_signal(signal.SIGCONT)
    sent = list(recording.samples)
    wait(lambda: sent[-1] in server.telemetry, "the samples once the broker answers")
    _in_order_and_complete(server.telemetry, sent)


def test_sampling_keeps_its_schedule_while_an_install_runs(
        server: FakeServer, repo: Repo, recording: Recording,
        link_factory: Callable[..., FleetLink], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 6: the link's worker sampled between installs, so an install stopped
    sampling for as long as it ran. Here the install's verification waits until the test
    lets it go."""
    link = link_factory(**_sampling(recording))
    entered, release = threading.Event(), threading.Event()
    verify_and_stage = link.installer.verify_and_stage

    def held(record: InstallRecord) -> Any:
        entered.set()
        release.wait(30)
        return verify_and_stage(record)

    monkeypatch.setattr(link.installer, "verify_and_stage", held)
    sha = server.want(1, repo.build(digits_spec(1)))
    try:
        assert entered.wait(20), "the install did not start"
        recording.wait_samples(8, "while an install runs")
    finally:
        release.set()
    wait(lambda: server.last_report() == {"digits": (1, sha, "committed")}, "v1 committed")


def test_sampling_keeps_its_schedule_while_the_reported_state_is_slow(
        server: FakeServer, recording: Recording, link_factory: Callable[..., FleetLink],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10 item 6 / the reported state: building and publishing ``reported`` happened
    in the sampling thread, so a report that took long held the samples up."""
    link = link_factory(**_sampling(recording))
    wait(lambda: server.reports, "a first report")
    entered, release = threading.Event(), threading.Event()
    reported = link.reported

    def held_report() -> Any:
        entered.set()
        release.wait(30)
        return reported()

    monkeypatch.setattr(link, "reported", held_report)
    try:
        assert entered.wait(20), "no report was built"
        recording.wait_samples(8, "while a report is being built")
    finally:
        release.set()


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
    # The event and the reported state are separate messages: neither waits for the other.
    wait(lambda: server.events.count("install.failed") == 1, "the install.failed event")
    assert link.connected
    assert link.runtime.model("digits").version == 1
    assert not list(link.installer.dirs.incoming.iterdir())  # the partial file reclaimed
    link.in_line.clear()
    assert link.in_line.wait(20)  # waits for room rather than failing again
    assert server.events.count("install.failed") == 1
    filled[0].unlink()
    wait(lambda: server.last_report() == {"digits": (2, sha2, "committed")}, "v2 committed")


def test_a_clean_stop_says_offline_at_once(
        server: FakeServer, link_factory: Callable[..., FleetLink]) -> None:
    """The broker sends the will only for a lost connection: a clean stop must say so
    itself, or the server shows the device online until its last-seen time runs out."""
    link = link_factory()
    wait(lambda: link.connected and server.reports, "the link's first report")
    link.stop()
    wait(lambda: "offline" in server.events, "the offline event")
    offline = next(e for e in server.event_log if e.kind == "offline")
    assert offline.detail == {"clean": True}

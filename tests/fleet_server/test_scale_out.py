"""Two ``fleet serve`` processes on one PostgreSQL and one Mosquitto, splitting device
messages through an MQTT 5 shared subscription, with leadership by advisory lock. The
leader is killed with SIGKILL mid-stream: the other takes the leadership, and every device
event is stored exactly once (after the killed process is restarted, as a supervisor
would, and takes the messages its persistent session holds)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509

from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.errors import ServiceError
from fleet_server.registry import Registry, open_registry
from fleet_server.service import FleetService, ServiceConfig
from protocol import messages
from protocol.topics import device_topic
from tests.bundle.repo import Repo
from tests.fleet_server.live_fleet import DIGITS, GROUP, converged, live_fleet
from tests.fleet_server.server_env import wait_until, write_keys
from tests.mqtt_broker import recorders, require_mosquitto
from tests.postgres import postgres_schema
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client, wait_published
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLEET = "scale"
DEVICES = 12
EVENTS = 30


class Servers:
    """The two server processes, by instance name."""

    def __init__(self, home: Path, keys: Path, db_url: str, broker_url: str) -> None:
        self.home, self.keys, self.db_url, self.broker_url = home, keys, db_url, broker_url
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        data = self.home / name
        argv = [sys.executable, "-m", "fleet_server", "-v", "serve", "--data", str(data),
                "--keys", str(self.keys), "--db", self.db_url, "--broker-url",
                self.broker_url, "--instance", name, "--shared-subscriptions", "--port", "0"]
        (data / "server.json").unlink(missing_ok=True)
        with (self.home / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(argv, cwd=ROOT, stdout=log,
                                                    stderr=subprocess.STDOUT)
        wait_until(lambda: (data / "server.json").exists() or self.processes[name].poll(),
                   f"server {name} to start", 60)
        assert self.processes[name].poll() is None, self.log(name)

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")

    def leader(self) -> str | None:
        leaders = [n for n in self.processes if self.log(n).count("is now the leader")
                   > self.log(n).count("is no longer the leader")
                   and self.processes[n].poll() is None]
        return leaders[0] if len(leaders) == 1 else None

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Servers, Registry, FleetCA, Broker]]:
    require_mosquitto()
    ca = FleetCA.create(tmp_path / "a" / "ca", FLEET)
    shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")  # one CA, two copies
    keys = write_keys(tmp_path / "keys", Repo())
    tls = ca.write_identity(ca.issue_server_cert(), tmp_path / "broker-tls", "broker")
    config = BrokerConfig(FLEET, tmp_path / "broker", tls, bind_address="127.0.0.1",
                          server_identity="fleet-server-a",
                          more_server_identities=("fleet-server-b",), crl_file=ca.crl_path)
    with postgres_schema() as (url, _), Broker.embedded(config) as broker:
        registry = open_registry(url)
        servers = Servers(tmp_path, keys, url, broker.address.url)
        try:
            yield servers, registry, ca, broker
        finally:
            servers.close()
            registry.close()


def _device(registry: Registry, ca: FleetCA, home: Path, device_id: str) -> TLSIdentity:
    key_pem, csr_pem = make_device_key_and_csr(device_id)
    cert = ca.sign_device_csr(csr_pem, device_id)
    token = registry.issue_token("lab", 600)
    registry.enroll_device(token, device_id, profile="x86-avx2",
                           cert_fingerprint=certificate_fingerprint(cert))
    directory = home / "devices" / device_id
    directory.mkdir(parents=True)
    (directory / "device.key").write_bytes(key_pem)
    (directory / "device.crt").write_bytes(cert)
    (directory / "ca.crt").write_bytes(ca.cert_pem)
    os.chmod(directory / "device.key", 0o600)
    return TLSIdentity(directory / "ca.crt", directory / "device.crt", directory / "device.key")


def test_a_killed_leader_is_replaced_and_every_event_is_stored_once(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path) -> None:
    servers, registry, ca, broker = fleet
    servers.start("a")
    servers.start("b")
    identities = {f"d{i}": _device(registry, ca, tmp_path, f"d{i}") for i in range(DEVICES)}
    clients = {}
    for device, identity in identities.items():
        client = create_client(ClientSettings(BrokerAddress.from_url(broker.address.url),
                                              identity))
        client.reconnect()
        client.loop_start()
        clients[device] = client
    wait_until(servers.leader, "a leader")
    first = servers.leader()
    assert first is not None

    def send(seq: int) -> None:
        infos = [client.publish(device_topic(FLEET, device, "events"), messages.encode(
            messages.Event("fetch.started", time.time(), {"n": seq}, seq)), qos=1)
            for device, client in clients.items()]
        for info in infos:
            wait_published(info)

    for seq in range(1, EVENTS // 2 + 1):
        send(seq)
    os.kill(servers.processes[first].pid, signal.SIGKILL)
    servers.processes[first].wait()
    for seq in range(EVENTS // 2 + 1, EVENTS + 1):
        send(seq)
    other = "b" if first == "a" else "a"
    wait_until(lambda: servers.leader() == other, f"{other} to take the leadership", 30)

    def stored() -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for event in registry.events(limit=100_000):
            if event.kind == "agent.fetch.started" and event.device is not None:
                found.setdefault(event.device, []).append(int(event.detail["n"]))
        return found

    # Mosquitto 2.0.11 goes on giving the dead process's persistent session its share of
    # the messages (measured: 181 of 360 stored before the restart; docs/scale.md): they
    # are queued for it, not lost, and arrive when it is back, as under a supervisor.
    servers.start(first)

    wait_until(lambda: sum(map(len, stored().values())) >= DEVICES * EVENTS,
               "every event stored", 60)
    assert {d: sorted(n) for d, n in stored().items()} == {
        d: list(range(1, EVENTS + 1)) for d in identities}
    for client in clients.values():
        client.loop_stop()
        client.disconnect()


def test_a_server_killed_mid_rollout_every_agent_converges_and_no_event_is_doubled(
        tmp_path: Path) -> None:
    """Real agents (``edge-agent run``) enrolled through server ``a``, a rollout published
    there, server ``b`` killed with SIGKILL right after and restarted as a supervisor would:
    every device converges, and each install transition is stored once."""
    require_mosquitto()
    home = tmp_path / "fleet"
    ca = FleetCA.create(home / "server" / "ca", "live")
    shutil.copytree(home / "server" / "ca", tmp_path / "b" / "ca")
    tls = ca.write_identity(ca.issue_server_cert(), tmp_path / "broker-tls", "broker")
    config = BrokerConfig("live", tmp_path / "broker", tls, bind_address="127.0.0.1",
                          server_identity="fleet-server-a",
                          more_server_identities=("fleet-server-b",), crl_file=ca.crl_path)
    with postgres_schema() as (url, _), Broker.embedded(config) as broker:
        shared = ("--db", url, "--broker-url", broker.address.url, "--shared-subscriptions",
                  "--bundle-port", "0")
        with live_fleet(home, *shared, "--instance", "a") as fleet:
            servers = Servers(tmp_path, fleet.keys, url, broker.address.url)
            try:
                servers.start("b")
                devices = ["gw-1", "gw-2", "gw-3"]
                for device in devices:
                    fleet.enroll(device, fleet.token("--group", GROUP))
                    fleet.run_agent(device, fleet.state(device))
                v1 = fleet.build(1, DIGITS)
                fleet.fleet("publish", v1, "--group", GROUP, "--data", fleet.data)
                os.kill(servers.processes["b"].pid, signal.SIGKILL)
                servers.processes["b"].wait()
                time.sleep(2)
                servers.start("b")
                fleet.wait(converged(fleet, devices, 1), "v1 on every device")
            finally:
                servers.close()
        with psycopg.connect(url) as db:
            rows = db.execute("SELECT device_id, kind, detail FROM events "
                              "WHERE kind LIKE 'agent.install.%'").fetchall()
    installs = [(device, kind, (json.loads(detail) if isinstance(detail, str)
                                else detail)["install_id"]) for device, kind, detail in rows]
    assert installs, "no install event stored"
    assert len(installs) == len(set(installs)), "an install transition was stored twice"
    assert {d for d, _, _ in installs} == {"gw-1", "gw-2", "gw-3"}


def test_desired_states_are_re_published_once_per_reconnection_by_the_leader(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path) -> None:
    """Two services (in this process) on one PostgreSQL schema and one broker: each sends
    every desired state on its first connection; on a reconnection only the leader does
    (one copy per device, not one per process); the other, once it becomes leader, sends
    them too."""
    servers, registry, ca, broker = fleet
    services = {}
    for name in ("a", "b"):
        data = tmp_path / f"service-{name}"
        shutil.copytree(tmp_path / "a" / "ca", data / "ca")
        services[name] = FleetService(ServiceConfig(
            data_dir=data, keys_dir=servers.keys, fleet=FLEET, db_url=servers.db_url,
            broker_url=broker.address.url, instance=name, shared_subscriptions=True,
            leader_interval_s=0.1))
    identity = _device(registry, ca, tmp_path, "gw-1")
    topic = device_topic(FLEET, "gw-1", "desired")
    with contextlib.ExitStack() as stack, recorders(broker) as connect:
        for service in services.values():
            stack.enter_context(service)
        device = connect(identity)
        device.subscribe(topic)
        wait_until(lambda: services["a"].leadership.is_leader()
                   != services["b"].leadership.is_leader(), "one leader")
        leader, other = sorted(services, key=lambda n: not services[n].leadership.is_leader())
        def copies() -> int:
            return sum(m.topic == topic and not m.payload.startswith(b"sentinel")
                       for m in device.messages)

        def flush() -> int:
            """The desired states received once a sentinel sent through each connected
            service after them is in (one connection delivers in order)."""
            marks = []
            for name, service in services.items():
                if service.connected:
                    mark = f"sentinel {name} {time.monotonic_ns()}".encode()
                    service._link.publish("gw-1", "desired", mark)  # type: ignore[union-attr]
                    marks.append(mark)
            for mark in marks:
                device.wait_message(topic, mark)
            return copies()

        time.sleep(1.0)  # a start's re-publish by a leader elected after connecting
        before = flush()
        for service in services.values():  # both reconnected (the broker restarted)
            service._on_connected()
        assert flush() == before + 1  # the leader's copy, not the other's too

        services[leader].stop()
        wait_until(services[other].leadership.is_leader, f"{other} to take over")
        wait_until(lambda: copies() >= before + 2, "the new leader's copy")


def _service(servers: Servers, tmp_path: Path, directory: str, instance: str,
             **options: object) -> FleetService:
    """A service (in this process) on the fixture's schema and broker, with a copy of the
    fleet CA in a data directory of its own."""
    data = tmp_path / f"service-{directory}"
    shutil.copytree(tmp_path / "a" / "ca", data / "ca")
    return FleetService(ServiceConfig(
        data_dir=data, keys_dir=servers.keys, fleet=FLEET, db_url=servers.db_url,
        broker_url=servers.broker_url, instance=instance, shared_subscriptions=True,
        leader_interval_s=0.1, **options))  # type: ignore[arg-type]


def test_a_cleanly_stopped_instance_leaves_the_shared_subscription(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path) -> None:
    """b stops cleanly (retired): its persistent session no longer holds a share, so a,
    the one left, gets and stores every event sent afterwards, not every other one."""
    servers, registry, ca, broker = fleet
    identity = _device(registry, ca, tmp_path, "gw-1")
    a, b = _service(servers, tmp_path, "a", "a"), _service(servers, tmp_path, "b", "b")
    with contextlib.ExitStack() as stack, recorders(broker) as connect:
        stack.enter_context(a)
        with b:
            pass  # connected, subscribed to the share, stopped cleanly
        device = connect(identity)
        for seq in range(1, EVENTS + 1):
            device.publish(device_topic(FLEET, "gw-1", "events"), messages.encode(
                messages.Event("fetch.started", float(seq), {"n": seq}, seq)))
        wait_until(lambda: len([e for e in registry.events(device="gw-1")
                                if e.kind == "agent.fetch.started"]) == EVENTS,
                   "every event stored by a", 15)


def test_the_last_instance_keeps_the_shared_subscription_when_it_stops(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path) -> None:
    """With no other process of the fleet running, a clean stop keeps the share: the broker
    queues what devices send meanwhile for a's session, and a stores it all when it starts
    again (had it left, nobody would have been subscribed and the broker would have dropped
    every message)."""
    servers, registry, ca, broker = fleet
    identity = _device(registry, ca, tmp_path, "gw-1")
    with _service(servers, tmp_path, "a", "a"):
        pass  # connected, subscribed to the share, stopped cleanly as the only one
    with recorders(broker) as connect:
        device = connect(identity)
        for seq in range(1, EVENTS + 1):
            device.publish(device_topic(FLEET, "gw-1", "events"), messages.encode(
                messages.Event("fetch.started", float(seq), {"n": seq}, seq)))
        with _service(servers, tmp_path, "a-again", "a"):  # a restarted (same identity)
            wait_until(lambda: len([e for e in registry.events(device="gw-1")
                                    if e.kind == "agent.fetch.started"]) == EVENTS,
                       "every event queued while a was stopped, stored", 15)


def test_refusals_are_logged_and_a_second_process_of_one_identity_refused(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """An instance the broker's ACL does not grant (c) says so when its publishes are
    refused; a second process started with an --instance name already running is refused
    at start, before it takes the first one's broker session (Mosquitto 2.0.11 would drop
    the older connection without a reason, over and over)."""
    servers, registry, ca, _ = fleet
    _device(registry, ca, tmp_path, "gw-1")  # its desired state is sent at every start
    caplog.set_level("ERROR", logger="fleet_server.device_link")
    with _service(servers, tmp_path, "c", "c"):
        wait_until(lambda: "refused to let fleet-server-c publish device topics (desired"
                   in caplog.text, "the refusal logged")
    assert caplog.text.count("refused to let") == 1  # once per kind, not per message
    second = _service(servers, tmp_path, "a2", "a")
    with _service(servers, tmp_path, "a1", "a"), pytest.raises(
            ServiceError, match="already runs as fleet-server-a on this registry"):
        second.start()


def test_a_device_enrolled_through_one_process_is_revoked_by_a_reset_through_the_other(
        fleet: tuple[Servers, Registry, FleetCA, Broker], tmp_path: Path) -> None:
    """Each process has its own copy of the CA directory; the issued and revoked
    certificates live in the shared registry, so b's reset revokes what a issued (the
    message is true), and a's CRL lists it too once a looks again (every 10 s)."""
    servers, registry, _, _ = fleet
    a, b = _service(servers, tmp_path, "a", "a"), _service(servers, tmp_path, "b", "b")
    with a, b:
        _, csr = make_device_key_and_csr("gw-1")
        enrollment = a.enroll(a.issue_token("lab", 600).token, "gw-1", csr, "x86-avx2")
        serial = x509.load_pem_x509_certificate(enrollment.certificate_pem).serial_number
        b.reset_device("gw-1")
        kinds = [e.kind for e in registry.events(device="gw-1")]
        assert "certificate.revoked" in kinds
        assert "certificate.not_revoked" not in kinds

        def listed(service: FleetService) -> bool:
            crl = x509.load_pem_x509_crl(service.ca.crl_path.read_bytes())
            return crl.get_revoked_certificate_by_serial_number(serial) is not None

        assert listed(b)
        wait_until(lambda: listed(a), "a's CRL to list the certificate b revoked", 15)

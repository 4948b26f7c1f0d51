"""The embedded broker: mutual TLS, per-device ACLs, persistent sessions and persistence,
proved against a real Mosquitto (its own process, port and configuration per test).

Negative checks never sleep: after the message that must not arrive, a sentinel the client
may receive is sent along the same path; Mosquitto is single-threaded and delivers in order
per client, so once the sentinel is in, the forbidden message would have been too.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet_server.broker import Broker, BrokerConfig
from fleet_server.broker_config import render_config
from fleet_server.ca import FleetCA
from fleet_server.errors import BrokerError
from protocol.topics import fleet_topic_filter
from tests.fleet_server.server_env import wait_until
from tests.mqtt_broker import (
    FLEET,
    Recorder,
    TestFleet,
    connection_outcome,
    process_rss,
    recorders,
    require_mosquitto,
    stalled_subscriber,
)
from transport.mqtt import BrokerAddress, TLSIdentity, tls_context
from transport.x509 import certificate_fingerprint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOT_AUTHORIZED = 0x87
Connect = Callable[..., Recorder]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> TestFleet:
    return TestFleet.create(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def ids(fleet: TestFleet) -> dict[str, TLSIdentity]:
    """The server's identity and two devices'."""
    return {"server": fleet.server_identity(), "dev1": fleet.device_identity("dev1"),
            "dev2": fleet.device_identity("dev2")}


@pytest.fixture
def broker(fleet: TestFleet, tmp_path: Path) -> Iterator[Broker]:
    require_mosquitto()
    with Broker.embedded(fleet.broker_config(tmp_path / "broker")) as started:
        yield started


@pytest.fixture
def connect(broker: Broker) -> Iterator[Connect]:
    with recorders(broker) as factory:
        yield factory


def test_server_publishes_desired_and_receives_reported(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    assert server.subscribe(fleet.topic("+", "reported")) == [1]
    dev1, dev2 = connect(ids["dev1"]), connect(ids["dev2"])
    for device, name in ((dev1, "dev1"), (dev2, "dev2")):
        device.subscribe(fleet.topic(name, "desired"))
        assert not server.publish(fleet.topic(name, "desired"), f"v2 {name}".encode(),
                                  retain=True).is_failure
        assert device.wait_message(fleet.topic(name, "desired")).payload == f"v2 {name}".encode()

    assert not dev1.publish(fleet.topic("dev1", "reported"), b"running v2").is_failure
    assert server.wait_message(fleet.topic("dev1", "reported")).payload == b"running v2"


def test_device_receives_its_retained_desired_state(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    server.publish(fleet.topic("dev1", "desired"), b"model v3", retain=True)

    dev1 = connect(ids["dev1"])
    assert dev1.subscribe(fleet.topic("dev1", "desired")) == [1]
    message = dev1.wait_message(fleet.topic("dev1", "desired"))
    assert (message.payload, message.retain, message.qos) == (b"model v3", True, 1)


def test_device_cannot_read_another_devices_topics(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    server.publish(fleet.topic("dev2", "desired"), b"secret desired", retain=True)
    dev2 = connect(ids["dev2"])

    dev1 = connect(ids["dev1"])
    codes = dev1.subscribe(fleet.topic("dev2", "desired"), fleet.topic("dev2", "inbox/#"),
                           fleet.topic("dev2", "reported"), fleet_topic_filter(FLEET), "#",
                           "$SYS/#")
    # Mosquitto 2.0 grants these (QoS 1) and filters every delivery through the ACL; a
    # broker that refuses the subscription outright answers "not authorized". ($SYS has
    # retained topics: they would arrive right after the SUBACK if the ACL let them.)
    assert all(code in (1, NOT_AUTHORIZED) for code in codes), codes
    # Live messages to and from dev2, each fully handled by the broker before the next.
    assert not server.publish(fleet.topic("dev2", "desired"), b"new desired").is_failure
    assert not server.publish(fleet.topic("dev2", "inbox/chunk-0"), b"weights").is_failure
    assert not dev2.publish(fleet.topic("dev2", "reported"), b"dev2 state").is_failure
    assert not dev2.publish(fleet.topic("dev2", "telemetry"), b"dev2 load").is_failure

    server.publish(fleet.topic("dev1", "desired"), b"sentinel")
    dev1.wait_message(fleet.topic("dev1", "desired"), b"sentinel")
    assert dev1.topics() == {fleet.topic("dev1", "desired")}


def test_device_cannot_publish_into_another_devices_subtree(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    server.subscribe(fleet_topic_filter(FLEET))
    dev2 = connect(ids["dev2"])
    dev2.subscribe(fleet.topic("dev2", "desired"), fleet.topic("dev2", "inbox/#"))

    dev1 = connect(ids["dev1"])
    forged = [fleet.topic("dev2", leaf) for leaf in ("desired", "inbox/chunk-0", "reported",
                                                     "telemetry", "events", "outbox/req")]
    # Nor may a device write its own desired state or its inbox, or outside any device.
    forged += [fleet.topic("dev1", "desired"), fleet.topic("dev1", "inbox/x"),
               f"edgefleet/{FLEET}/broadcast", "edgefleet/otherfleet/devices/dev1/reported"]
    for topic in forged:
        retain = topic.endswith("desired")
        assert dev1.publish(topic, b"forged", retain=retain) == NOT_AUTHORIZED, topic

    assert not dev1.publish(fleet.topic("dev1", "reported"), b"sentinel").is_failure
    server.wait_message(fleet.topic("dev1", "reported"), b"sentinel")
    server.publish(fleet.topic("dev2", "inbox/sentinel"), b"sentinel")
    dev2.wait_message(fleet.topic("dev2", "inbox/sentinel"))
    assert all(m.payload != b"forged" for m in [*server.messages, *dev2.messages])
    # Nothing forged was retained either: subscribing again delivers no retained message
    # before the sentinel.
    dev2.messages.clear()
    dev2.subscribe(fleet.topic("dev2", "desired"))
    server.publish(fleet.topic("dev2", "desired"), b"sentinel")
    dev2.wait_message(fleet.topic("dev2", "desired"), b"sentinel")
    assert [m.payload for m in dev2.messages] == [b"sentinel"]


def test_device_cannot_take_over_another_devices_session(
        fleet: TestFleet, ids: dict[str, TLSIdentity], broker: Broker, connect: Connect) -> None:
    server = connect(ids["server"])
    dev1 = connect(ids["dev1"])
    dev1.subscribe(fleet.topic("dev1", "desired"))
    # dev2's certificate, but asking for dev1's client id: the broker uses the CN instead.
    impostor = Recorder(Client(CallbackAPIVersion.VERSION2, client_id="dev1",
                               protocol=MQTTProtocolVersion.MQTTv5))
    impostor.client.tls_set_context(tls_context(ids["dev2"]))
    try:
        impostor.client.connect(broker.address.host, broker.address.port, clean_start=False)
        impostor.client.loop_start()
        impostor.wait(lambda: impostor.connack is not None, "the impostor's CONNACK")
        server.publish(fleet.topic("dev1", "desired"), b"still dev1's")
        dev1.wait_message(fleet.topic("dev1", "desired"), b"still dev1's")
        assert dev1.disconnects == []
        assert impostor.messages == []
    finally:
        impostor.close()


def _bare_client(identity: TLSIdentity | None, ca_file: Path) -> Client:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca_file)
    if identity is not None:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    client = Client(CallbackAPIVersion.VERSION2, client_id="intruder",
                    protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set_context(context)
    return client


@pytest.mark.parametrize("credentials", ["none", "other CA", "broker certificate"])
def test_clients_without_a_fleet_client_certificate_cannot_connect(
        fleet: TestFleet, broker: Broker, tmp_path: Path, credentials: str) -> None:
    if credentials == "none":
        identity = None
    elif credentials == "other CA":
        # Same fleet name and device id, but a CA the broker does not trust.
        other = TestFleet.create(tmp_path / "other")
        identity = other.device_identity("dev1")
    else:
        # A server certificate of the right CA: its key usage is serverAuth only.
        identity = fleet.broker_config(tmp_path / "unused").tls
    client = _bare_client(identity, fleet.ca.cert_path)
    outcome = connection_outcome(client, broker.address.host, broker.address.port)
    assert outcome != "connected"


def test_persistent_session_queues_qos1_messages_while_away(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    dev1 = connect(ids["dev1"])
    dev1.subscribe(fleet.topic("dev1", "inbox/#"))
    dev1.close()

    server.publish(fleet.topic("dev1", "inbox/chunk-7"), b"while away")
    back = connect(ids["dev1"])
    # No new SUBSCRIBE: the session kept the subscription and the queued message.
    assert back.connack is not None
    assert back.connack[1] is True
    message = back.wait_message(fleet.topic("dev1", "inbox/chunk-7"))
    assert (message.payload, message.qos) == (b"while away", 1)


def test_unacknowledged_messages_are_not_held_back(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    """No limit on messages in flight to a client (BrokerConfig.max_inflight_messages):
    Mosquitto 2.0.11 queues those over its default limit of 20 and may then deliver them out
    of order, which at 1,000 devices let a device's older report overwrite its newer one at
    the fleet server (benchmarks/fleet_bench.py)."""
    server = connect(ids["server"])
    server.client.manual_ack_set(True)  # acknowledges nothing, like a server still storing
    server.subscribe(fleet.topic("+", "events"))
    dev1 = connect(ids["dev1"])
    for i in range(50):
        dev1.client.publish(fleet.topic("dev1", "events"), str(i).encode(), qos=1)
    server.wait(lambda: len(server.messages) == 50, "50 messages, none acknowledged")
    assert [int(m.payload) for m in server.messages] == list(range(50))


def test_persistent_session_with_mqtt_311(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    server = connect(ids["server"])
    dev1 = connect(ids["dev1"], MQTTProtocolVersion.MQTTv311)
    dev1.subscribe(fleet.topic("dev1", "inbox/#"))
    dev1.close()

    server.publish(fleet.topic("dev1", "inbox/chunk-1"), b"3.1.1")
    back = connect(ids["dev1"], MQTTProtocolVersion.MQTTv311)
    assert back.wait_message(fleet.topic("dev1", "inbox/chunk-1")).payload == b"3.1.1"


def test_restart_keeps_retained_messages_and_sessions(
        fleet: TestFleet, ids: dict[str, TLSIdentity], broker: Broker) -> None:
    with recorders(broker) as connect:
        server = connect(ids["server"])
        dev1 = connect(ids["dev1"])
        dev1.subscribe(fleet.topic("dev1", "inbox/#"))
        dev1.close()
        server.publish(fleet.topic("dev2", "desired"), b"kept", retain=True)
        server.publish(fleet.topic("dev1", "inbox/chunk-3"), b"queued")
    port = broker.address.port

    broker.stop()
    assert not broker.running
    broker.start()
    assert broker.address.port == port

    with recorders(broker) as connect:
        dev2 = connect(ids["dev2"])
        dev2.subscribe(fleet.topic("dev2", "desired"))
        message = dev2.wait_message(fleet.topic("dev2", "desired"))
        assert (message.payload, message.retain) == (b"kept", True)
        dev1 = connect(ids["dev1"])
        assert dev1.wait_message(fleet.topic("dev1", "inbox/chunk-3")).payload == b"queued"


def test_start_failure_reports_the_log(fleet: TestFleet, tmp_path: Path) -> None:
    require_mosquitto()
    config = fleet.broker_config(tmp_path / "broker")
    # The CA's key is not the key of the broker's certificate.
    bad = replace(config, tls=replace(config.tls, key_file=fleet.ca.directory / "ca.key"))
    broker = Broker.embedded(bad)
    with pytest.raises(BrokerError, match="mosquitto exited") as info:
        broker.start()
    assert "mosquitto version" in str(info.value)  # the log tail is in the message
    assert not broker.running


def test_port_in_use_is_reported(fleet: TestFleet, tmp_path: Path) -> None:
    require_mosquitto()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        config = replace(fleet.broker_config(tmp_path / "broker"),
                         port=taken.getsockname()[1])
        with pytest.raises(BrokerError, match="Address already in use"):
            Broker.embedded(config).start()


def test_broker_certificate_from_another_ca_is_refused(fleet: TestFleet, tmp_path: Path) -> None:
    require_mosquitto()
    config = fleet.broker_config(tmp_path / "broker")
    other = FleetCA.create(tmp_path / "other-ca", FLEET)
    # Mosquitto starts (it trusts the other CA for clients), but clients of this fleet
    # could never verify it: start() says so instead of returning a useless broker.
    bad = replace(config, tls=replace(config.tls, ca_file=other.cert_path))
    with pytest.raises(BrokerError, match="does not verify"):
        Broker.embedded(bad).start()


def test_missing_mosquitto_is_reported(fleet: TestFleet, tmp_path: Path) -> None:
    config = fleet.broker_config(tmp_path / "broker")
    broker = Broker.embedded(config, mosquitto=str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(BrokerError, match="cannot start"):
        broker.start()


def test_external_broker_is_only_an_address() -> None:
    broker = Broker.external("mqtts://broker.example.com:8884")
    with broker:
        assert broker.address == BrokerAddress("broker.example.com", 8884)
        assert not broker.running
    assert Broker.external("mqtts://[::1]").address == BrokerAddress("::1", 8883)


@pytest.mark.parametrize("url", ["mqtt://host:1883", "https://host", "mqtts://",
                                 "mqtts://host:99999", "mqtts://user:pw@host",
                                 "mqtts://host/path"])
def test_external_broker_url_must_be_mqtts(url: str) -> None:
    with pytest.raises(BrokerError, match="mqtts://"):
        Broker.external(url)


def test_broker_address_url_round_trip() -> None:
    for address in (BrokerAddress("example.com", 8883), BrokerAddress("::1", 1234)):
        assert BrokerAddress.from_url(address.url) == address


def test_invalid_fleet_name_is_refused(fleet: TestFleet, tmp_path: Path) -> None:
    config = replace(fleet.broker_config(tmp_path / "broker"), fleet="a/b")
    with pytest.raises(BrokerError, match="invalid fleet name"):
        Broker.embedded(config, mosquitto="mosquitto")


def test_config_is_written_for_tls_only(broker: Broker, tmp_path: Path) -> None:
    config = (tmp_path / "broker" / "mosquitto.conf").read_text(encoding="utf-8")
    listeners = [line for line in config.splitlines() if line.startswith("listener")]
    assert listeners == [f"listener {broker.address.port} 127.0.0.1"]
    for option in ("require_certificate true", "use_identity_as_username true",
                   "use_username_as_clientid true", "allow_anonymous false",
                   "persistence true"):
        assert option in config.splitlines()


def test_a_killed_broker_is_restarted_on_its_port(
        fleet: TestFleet, ids: dict[str, TLSIdentity], broker: Broker) -> None:
    """kill -9 of the Mosquitto child: the supervisor starts it again, same port, and
    the retained state it had saved is back."""
    port, pid = broker.address.port, broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: broker.restarts == 1 and broker.running, "the broker's restart",
               timeout=15)
    assert broker.pid != pid
    assert broker.address.port == port
    assert broker.down_since is None
    with recorders(broker) as connect:
        dev1 = connect(ids["dev1"])
        assert dev1.connack is not None


def test_broker_dies_with_the_server_process(fleet: TestFleet, tmp_path: Path) -> None:
    """kill -9 of the process that supervises the broker takes Mosquitto with it."""
    require_mosquitto()
    config = fleet.broker_config(tmp_path / "broker")
    pickled = tmp_path / "config.pickle"
    pickled.write_bytes(pickle.dumps(config))
    code = textwrap.dedent(f"""
        import pickle, sys, time
        from fleet_server.broker import Broker
        broker = Broker.embedded(pickle.loads(open({str(pickled)!r}, "rb").read()))
        broker.start()
        print(broker.pid, flush=True)
        time.sleep(600)
    """)
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                          stdout=subprocess.PIPE) as server:
        try:
            assert server.stdout is not None
            mosquitto_pid = int(server.stdout.readline())
            assert _alive(mosquitto_pid)
        finally:
            server.kill()
    wait_until(lambda: not _alive(mosquitto_pid), "mosquitto to exit with its server",
               timeout=10)


def test_an_orphaned_broker_is_stopped_not_adopted(
        fleet: TestFleet, ids: dict[str, TLSIdentity], tmp_path: Path) -> None:
    """A Mosquitto left running on the data directory (its server was killed where no death
    signal reaches it) is stopped at the next start, which then runs its own broker."""
    mosquitto = require_mosquitto()
    config = replace(fleet.broker_config(tmp_path / "broker"), port=_free_port())
    first = Broker.embedded(config)
    first.start()
    conf = config.data_dir / "mosquitto.conf"
    first.stop()
    orphan = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until((config.data_dir / "mosquitto.pid").exists,
                   "the orphan's pid file")
        with Broker.embedded(config) as second:
            assert orphan.wait(timeout=10) is not None
            assert second.pid != orphan.pid
            assert second.running
            with recorders(second) as connect:
                assert connect(ids["dev1"]).connack is not None
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


def test_a_foreign_listener_on_the_port_is_named(fleet: TestFleet, tmp_path: Path) -> None:
    require_mosquitto()
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = replace(fleet.broker_config(tmp_path / "broker"),
                         port=taken.getsockname()[1])
        broker = Broker.embedded(config)
        with pytest.raises(BrokerError, match="in use by another process"):
            broker.start()
        assert not broker.running


def test_a_client_that_stops_reading_cannot_grow_the_broker(
        fleet: TestFleet, ids: dict[str, TLSIdentity], broker: Broker) -> None:
    """A device subscribed to its inbox that never reads: 128 MiB published to it grow the
    broker by about twice its per-client bounds (8 MiB in flight + 32 MiB queued, each held
    as a message and as an outgoing packet), not by twice the 128 MiB (252 MiB measured
    without the bounds)."""
    pid = broker.pid
    assert pid is not None
    stalled = stalled_subscriber(broker.address, ids["dev1"], fleet.topic("dev1", "inbox/#"))
    try:
        with recorders(broker) as connect:
            server = connect(ids["server"])
            before = process_rss(pid)
            chunk = os.urandom(256 * 1024)
            for _ in range(512):
                server.client.publish(fleet.topic("dev1", "inbox/chunks"), chunk, qos=1)
            # Every message has reached the broker once the server's sentinel to itself is
            # back (one connection, delivered in order).
            server.subscribe(fleet.topic("dev2", "events"))
            server.publish(fleet.topic("dev2", "events"), b"sentinel")
            server.wait_message(fleet.topic("dev2", "events"), b"sentinel")
            grown = process_rss(pid) - before
        config = BrokerConfig(FLEET, Path(), ids["server"])
        bound = 2 * (config.max_inflight_bytes + config.max_queued_bytes) + 16 * 2**20
        assert grown < bound, f"the broker grew by {grown / 2**20:.0f} MiB"
    finally:
        stalled.close()


def test_the_servers_session_keeps_a_rollouts_burst_of_reports_while_away(
        fleet: TestFleet, ids: dict[str, TLSIdentity], connect: Connect) -> None:
    """What devices send while the fleet server is away (restarting) or behind: 12,000
    reports, as 1,000 devices send in a rollout (install events and reports), all queued
    for its persistent session and delivered when it is back. With Mosquitto's default of
    1,000 queued messages per client, or this broker's earlier 10,000, some were dropped
    (docs/scale.md, "Broker queues")."""
    server = connect(ids["server"])
    server.subscribe(fleet.topic("+", "reported"))
    server.close()
    report = b"r" * 330  # a report's size, about
    per_device = 6000
    for name in ("dev1", "dev2"):
        device = connect(ids[name])
        infos = [device.client.publish(fleet.topic(name, "reported"), report, qos=1)
                 for _ in range(per_device)]
        wait_until(lambda infos=infos: all(i.is_published() for i in infos),  # type: ignore[misc]
                   f"{name}'s reports acknowledged by the broker", 60)
    back = connect(ids["server"])
    wait_until(lambda: len(back.messages) >= 2 * per_device, "every queued report", 60)
    assert sorted({m.topic for m in back.messages}) == [fleet.topic("dev1", "reported"),
                                                        fleet.topic("dev2", "reported")]
    assert len(back.messages) == 2 * per_device


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_revoked_certificates_are_refused_once_the_broker_reloads_its_crl(
        tmp_path: Path) -> None:
    """Issue 9.2: a replaced certificate stops working. The CA puts it on its CRL, and
    after reload_crl (SIGHUP) the broker refuses it at the handshake, while other devices,
    and connections already open, are not touched; restart() then cuts those off too."""
    require_mosquitto()
    fleet = TestFleet.create(tmp_path / "fleet")
    old, other = fleet.device_identity("dev1"), fleet.device_identity("dev2")
    config = fleet.broker_config(tmp_path / "broker", crl_file=fleet.ca.crl_path)
    assert f"crlfile {fleet.ca.crl_path.resolve()}" in render_config(config, 1883).splitlines()
    with Broker.embedded(config) as broker, recorders(broker) as connect:
        def outcome(identity: TLSIdentity) -> str:
            return connection_outcome(broker.client(identity), broker.address.host,
                                      broker.address.port)

        assert outcome(old) == "connected"
        still_open = connect(old)
        fingerprint = certificate_fingerprint(old.cert_file.read_bytes())
        assert fleet.ca.revoke(fingerprint, "replaced")
        assert fleet.ca.revoke(fingerprint, "replaced")  # idempotent
        assert [r.fingerprint for r in fleet.ca.revoked()] == [fingerprint]

        assert broker.reload_crl()
        assert outcome(old).startswith(("handshake failed", "disconnected"))
        assert outcome(other) == "connected"
        assert still_open.client.is_connected()

        broker.restart()
        assert broker.restarts == 0  # asked for, not a crash
        wait_until(lambda: still_open.disconnects, "the revoked device's connection to drop")
        assert outcome(old).startswith(("handshake failed", "disconnected"))
        assert outcome(other) == "connected"


def test_revoking_a_certificate_the_ca_never_recorded(tmp_path: Path) -> None:
    fleet = TestFleet.create(tmp_path / "fleet")
    assert not fleet.ca.revoke("ab" * 32, "replaced")
    assert fleet.ca.revoked() == []
    assert FleetCA.load(fleet.ca.directory).crl_path.read_bytes().startswith(
        b"-----BEGIN X509 CRL-----")

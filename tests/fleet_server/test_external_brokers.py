"""The external-broker mode against a second broker implementation: NATS 2.9 with MQTT
enabled (TLS client certificates mapped to users, per-device permissions). What it
supports is asserted as found (docs/scale.md, "External brokers"), then a real fleet service
runs on it with MQTT 3.1.1: a device gets its retained desired state, its events are
stored once, and it fetches a bundle in chunks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from fleet_server.ca import FleetCA
from fleet_server.data_dir import server_identity
from fleet_server.service import FleetService, ServiceConfig
from tests.fleet_server.server_env import check_device_round_trip
from tests.mqtt_broker import FLEET, Recorder, TestFleet
from tests.nats_broker import NatsBroker
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client

pytestmark = pytest.mark.integration

V311 = MQTTProtocolVersion.MQTTv311


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA.create(tmp_path / "server" / "ca", FLEET)


@pytest.fixture
def nats(tmp_path: Path, ca: FleetCA) -> Iterator[NatsBroker]:
    tls = ca.write_identity(ca.issue_server_cert(), tmp_path / "nats-tls", "broker")
    broker = NatsBroker(tmp_path / "nats", FLEET, tls)
    broker.allow(server_identity(tmp_path / "server", ca).cert_file.read_bytes())
    broker.start()
    yield broker
    broker.stop()


def _recorder(url: str, identity: TLSIdentity, protocol: MQTTProtocolVersion = V311,
              ) -> Recorder:
    return Recorder(create_client(ClientSettings(BrokerAddress.from_url(url), identity,
                                                 protocol=protocol)))


def _device(ca: FleetCA, nats: NatsBroker, tmp_path: Path, device: str) -> TLSIdentity:
    identity = TestFleet(ca, tmp_path / "pki").device_identity(device)
    nats.allow(identity.cert_file.read_bytes(), device=device)
    return identity


def test_what_nats_supports(tmp_path: Path, ca: FleetCA, nats: NatsBroker) -> None:
    server_files = server_identity(tmp_path / "server", ca)
    gw1, gw2 = (_device(ca, nats, tmp_path, d) for d in ("gw-1", "gw-2"))
    topic = f"edgefleet/{FLEET}/devices"

    # MQTT 5: refused ("unacceptable protocol version of 5").
    v5 = _recorder(nats.url, server_files, MQTTProtocolVersion.MQTTv5)
    v5.client.reconnect()
    v5.client.loop_start()
    time.sleep(1.0)
    assert not v5.client.is_connected()
    v5.client.loop_stop()
    assert "unacceptable protocol version of 5" in nats.log

    # MQTT 3.1.1 over TLS, the identity from the certificate; QoS 1 and retained messages.
    server = _recorder(nats.url, server_files)
    server.connect()
    server.subscribe(f"{topic}/+/events", f"$share/g/{topic}/+/telemetry")
    assert not server.publish(f"{topic}/gw-1/desired", b"D1", retain=True).is_failure
    server.publish(f"{topic}/gw-2/desired", b"D2", retain=True)
    device = _recorder(nats.url, gw1)
    device.connect()
    device.subscribe(f"{topic}/gw-1/desired")
    assert device.wait_message(f"{topic}/gw-1/desired").retain
    device.publish(f"{topic}/gw-1/events", b"E1")
    server.wait_message(f"{topic}/gw-1/events", b"E1")

    # The ACL: another device's topics can be neither read nor written.
    device.client.subscribe(f"{topic}/gw-2/desired", qos=1)
    device.publish(f"{topic}/gw-2/events", b"forged")
    # No shared subscriptions (an MQTT 5 feature): "$share/..." is a topic of its own.
    device.publish(f"{topic}/gw-1/telemetry", b"T1")
    time.sleep(1.0)
    assert f"{topic}/gw-2/desired" not in device.topics()
    assert b"forged" not in [m.payload for m in server.messages]
    assert f"{topic}/gw-1/telemetry" not in server.topics()

    # The server's persistent session queues QoS 1 messages while it is away.
    server.close()
    device.publish(f"{topic}/gw-1/events", b"while-away")
    again = _recorder(nats.url, server_files)
    assert again.connect()  # session present
    again.wait_message(f"{topic}/gw-1/events", b"while-away")

    # Adding a device's permissions means a configuration reload, after which NATS 2.9.10
    # no longer delivers to certificate-mapped MQTT clients connected before it
    # ("user found in connect proto, but user required from cert").
    _device(ca, nats, tmp_path, "gw-3")
    device.publish(f"{topic}/gw-1/events", b"after-reload")
    time.sleep(1.0)
    assert b"after-reload" not in [m.payload for m in again.messages]
    assert not again.disconnects  # silently: nobody is told

    # The client id is not bound to the certificate: gw-2 connecting with the server's
    # client id takes the server's connection away (a gap: docs/scale.md).
    impostor = create_client(ClientSettings(BrokerAddress.from_url(nats.url), gw2,
                                            protocol=V311))
    impostor._client_id = b"fleet-server"
    impostor.reconnect()
    impostor.loop_start()
    again.wait(lambda: len(again.disconnects) > 0, "the server to be disconnected")
    impostor.loop_stop()
    impostor.disconnect()
    device.close()


def test_the_fleet_service_runs_on_nats(tmp_path: Path, ca: FleetCA, nats: NatsBroker,
                                        config: ServiceConfig,
                                        bundles: dict[str, bytes]) -> None:
    config = replace(config, data_dir=tmp_path / "server", broker_url=nats.url,
                     mqtt_protocol=V311)
    # The subject the CA will give gw-1's certificate, allowed before anyone connects.
    nats.allow_user(f"CN=gw-1,O=edgefleet fleet {FLEET}", device="gw-1")
    with FleetService(config) as service:
        check_device_round_trip(service, tmp_path, bundles["big"], "speech", V311)

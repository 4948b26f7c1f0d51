"""The per-device ACL for Mosquitto's dynamic security plugin that docs/scale.md documents,
against a real Mosquitto with the plugin, certificates from the fleet CA as identities: a
device gets its own leaves and nothing else, a server process the fleet's tree and its
shared subscription, and a device refused that shared subscription. Also what Mosquitto
2.0.11 does not do: substitute ``%u`` in a dynsec ACL, refuse a SUBSCRIBE with acl_file."""

from __future__ import annotations

import glob
import json
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fleet_server.broker import Broker
from fleet_server.mosquitto import find_mosquitto
from protocol.topics import DEVICE_READS, DEVICE_WRITES, device_topic
from tests.mqtt_broker import FLEET, Recorder, TestFleet, recorders
from transport.mqtt import BrokerAddress, ClientSettings, TLSIdentity, create_client

pytestmark = pytest.mark.integration

SERVER = "fleet-server-a"
TREE = f"edgefleet/{FLEET}/#"


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def device_role(device: str) -> dict[str, Any]:
    """The role docs/scale.md gives one device: its own leaves, spelled out."""
    return {"rolename": f"device-{device}", "acls": [
        *(_acl("subscribePattern", device_topic(FLEET, device, leaf)) for leaf in DEVICE_READS),
        *(_acl("publishClientSend", device_topic(FLEET, device, leaf))
          for leaf in DEVICE_WRITES)]}


def dynsec_config(devices: list[str], *, pattern_role: bool = False) -> dict[str, Any]:
    """The plugin's configuration of docs/scale.md; with ``pattern_role`` the devices get
    one role written with ``%u`` instead of a role each."""
    pattern = {"rolename": "device-pattern", "acls": device_role("%u")["acls"]}
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
        "clients": [{"username": SERVER, "roles": [{"rolename": "fleet-server"}]}] + [
            {"username": d, "roles": [{"rolename": "device-pattern" if pattern_role
                                       else f"device-{d}"}]} for d in devices],
        "roles": [{"rolename": "fleet-server", "acls": [
            _acl("publishClientSend", TREE), _acl("subscribePattern", TREE),
            _acl("subscribePattern", f"$share/edgefleet-{FLEET}/{TREE}")]},
            pattern, *(device_role(d) for d in devices)],
    }


def _plugin() -> str:
    found = glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob(
        "/usr/lib/mosquitto_dynamic_security.so")
    if not found or find_mosquitto() is None:
        pytest.fail("Mosquitto's dynamic security plugin is missing: apt-get install "
                    "mosquitto (2.0 or later ships it)")
    return found[0]


@pytest.fixture
def fleet(tmp_path: Path) -> TestFleet:
    return TestFleet.create(tmp_path / "pki")


@contextmanager
def _start(fleet: TestFleet, home: Path, config: dict[str, Any]) -> Iterator[str]:
    home.mkdir(parents=True)
    (home / "dynsec.json").write_text(json.dumps(config))
    tls = fleet.ca.write_identity(fleet.ca.issue_server_cert(), home / "tls", "broker")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "mosquitto.conf").write_text(f"""\
user {pwd.getpwuid(os.geteuid()).pw_name}
per_listener_settings false
plugin {_plugin()}
plugin_opt_config_file {home / "dynsec.json"}
listener {port} 127.0.0.1
cafile {tls.ca_file}
certfile {tls.cert_file}
keyfile {tls.key_file}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
""")
    log = (home / "mosquitto.log").open("wb")
    process = subprocess.Popen([str(find_mosquitto()), "-c", str(home / "mosquitto.conf")],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while b"running" not in (home / "mosquitto.log").read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mosquitto did not start: "
                                     f"{(home / 'mosquitto.log').read_text()}")
            time.sleep(0.05)
        yield f"mqtts://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _client(url: str, identity: TLSIdentity) -> Recorder:
    recorder = Recorder(create_client(ClientSettings(BrokerAddress.from_url(url), identity)))
    recorder.connect()
    return recorder


def test_the_documented_roles_confine_each_device(fleet: TestFleet, tmp_path: Path) -> None:
    gw1, _ = fleet.device_identity("gw-1"), fleet.device_identity("gw-2")
    with _start(fleet, tmp_path / "broker", dynsec_config(["gw-1", "gw-2"])) as url:
        server = _client(url, fleet.server_identity(SERVER))
        device = _client(url, gw1)

        def topic(d: str, leaf: str) -> str:
            return device_topic(FLEET, d, leaf)

        assert not any(c.is_failure for c in server.subscribe(
            topic("+", "events"), f"$share/edgefleet-{FLEET}/{topic('+', 'telemetry')}"))
        assert not server.publish(topic("gw-1", "desired"), b"D1", retain=True).is_failure
        server.publish(topic("gw-2", "desired"), b"D2", retain=True)
        assert not device.subscribe(topic("gw-1", "desired"))[0].is_failure
        assert device.wait_message(topic("gw-1", "desired")).payload == b"D1"
        for refused in (topic("gw-2", "desired"), "#", TREE):
            assert device.subscribe(refused)[0].is_failure, refused
        assert not device.publish(topic("gw-1", "events"), b"E1").is_failure
        device.publish(topic("gw-1", "telemetry"), b"T1")
        for refused in (topic("gw-2", "events"), topic("gw-1", "desired")):
            assert device.publish(refused, b"forged").is_failure, refused
        server.wait_message(topic("gw-1", "events"), b"E1")
        server.wait_message(topic("gw-1", "telemetry"), b"T1")  # through $share
        time.sleep(0.5)
        assert b"forged" not in [m.payload for m in server.messages]
        device.close()
        server.close()


def test_mosquitto_2_0_dynsec_does_not_substitute_the_user_name(fleet: TestFleet,
                                                                  tmp_path: Path) -> None:
    """Why docs/scale.md gives each device a role of its own."""
    gw1 = fleet.device_identity("gw-1")
    config = dynsec_config(["gw-1"], pattern_role=True)
    with _start(fleet, tmp_path / "broker", config) as url:
        device = _client(url, gw1)
        assert device.subscribe(device_topic(FLEET, "gw-1", "desired"))[0].is_failure
        assert device.publish(device_topic(FLEET, "gw-1", "events"), b"E").is_failure
        device.close()


SHARE = f"$share/edgefleet-{FLEET}/{device_topic(FLEET, '+', 'events')}"
SENT = 12


def _share_outcome(servers: list[Recorder], thief: Recorder, sender: Recorder,
                   sender_id: str) -> tuple[bool, int, int]:
    """``thief`` (a device) asks for the servers' shared subscription, then ``sender``
    publishes SENT events: (whether the thief's SUBACK granted it, how many distinct events
    the servers got, how many the thief got)."""
    for server in servers:
        assert not server.subscribe(SHARE)[0].is_failure
    granted = not thief.subscribe(SHARE)[0].is_failure
    for n in range(SENT):
        assert not sender.publish(device_topic(FLEET, sender_id, "events"),
                                  f"E{n}".encode()).is_failure
    marker = b"last"
    sender.publish(device_topic(FLEET, sender_id, "events"), marker)
    # Round robin: whichever member gets the marker, the messages before it are handed out.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(
            m.payload == marker for s in servers for m in s.messages):
        time.sleep(0.05)
    time.sleep(0.3)
    got = {m.payload for s in servers for m in s.messages if m.payload.startswith(b"E")}
    return granted, len(got), len(thief.messages)


def test_the_dynsec_roles_refuse_a_device_the_shared_subscription(fleet: TestFleet,
                                                                  tmp_path: Path) -> None:
    """A device asking for the servers' ``$share`` group is refused at SUBSCRIBE, so it
    takes no turn of the round robin: the two server processes get every event."""
    config = dynsec_config(["gw-1", "gw-2"])
    config["clients"].append({"username": "fleet-server-b",
                              "roles": [{"rolename": "fleet-server"}]})
    with _start(fleet, tmp_path / "broker", config) as url:
        servers = [_client(url, fleet.server_identity(n)) for n in (SERVER, "fleet-server-b")]
        thief, sender = (_client(url, fleet.device_identity(d)) for d in ("gw-2", "gw-1"))
        granted, stored, stolen = _share_outcome(servers, thief, sender, "gw-1")
        for client in (*servers, thief, sender):
            client.close()
    assert (granted, stored, stolen) == (False, SENT, 0)


def test_mosquitto_2_0_acl_file_cannot_refuse_a_device_the_shared_subscription(
        fleet: TestFleet, tmp_path: Path) -> None:
    """Why docs/scale.md requires the dynamic security plugin for shared subscriptions on
    Mosquitto 2.0, and why the embedded broker refuses them: its acl_file plugin grants
    every SUBSCRIBE (src/security_default.c: "FIXME - implement ACL subscription strings")
    and checks read access only on delivery, so a device joins the group, is given its
    turn, and the ACL then drops that message: neither server gets it."""
    config = fleet.broker_config(tmp_path / "broker", server_identity=SERVER,
                                 more_server_identities=("fleet-server-b",))
    with Broker.embedded(config) as broker, recorders(broker) as connect:
        servers = [connect(fleet.server_identity(n)) for n in (SERVER, "fleet-server-b")]
        thief, sender = connect(fleet.device_identity("gw-2")), connect(
            fleet.device_identity("gw-1"))
        granted, stored, stolen = _share_outcome(servers, thief, sender, "gw-1")
    assert granted
    assert stolen == 0
    assert stored < SENT  # the thief's turns are lost for good

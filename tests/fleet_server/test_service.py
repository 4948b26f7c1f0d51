"""FleetService end to end over a real Mosquitto, on SQLite and on PostgreSQL.

Devices are real paho clients with certificates obtained through ``service.enroll``; they
can only use their own topics (the broker's ACL), exactly like agents. Negative checks use
a sentinel instead of sleeping: the server's messages reach the broker in the order it sent
them, and the broker delivers in order, so once a later message arrived an earlier stray one
would have too.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleet_server.broker import Broker, BrokerConfig
from fleet_server.ca import FleetCA
from fleet_server.errors import (
    BrokerError,
    ServiceError,
)
from fleet_server.service import FleetService, ServiceConfig
from tests.bundle.repo import Repo
from tests.fleet_server.server_env import (
    connect_device,
    enroll,
    fetch_bundle,
    reported_payload,
    service_config,
    wait_desired,
    wait_until,
    write_keys,
)
from tests.mqtt_broker import Recorder

pytestmark = pytest.mark.integration


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
        recorder = connect_device(device, clients, "desired")
        assert wait_desired(recorder, device, 1).models["digits"].version == 1
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
        recorder = connect_device(device, clients, "desired")
        wait_desired(recorder, device, 1)
        v1 = service.add_bundle(bundles["v1"])
        service.publish(v1.sha256, devices=["gw-1"])
        recorder.publish(device.topic("reported"), reported_payload(v1.sha256, 1))
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
            recorder = connect_device(device, clients, "desired")
            assert wait_desired(recorder, device, 1).models == {}
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


def test_a_second_server_on_the_same_data_directory_is_refused(
        service: FleetService, config: ServiceConfig) -> None:
    with pytest.raises(ServiceError, match=f"another fleet server \\(pid {os.getpid()}\\)"):
        FleetService(config).start()
    assert service.connected  # the first one is untouched


def test_shared_subscriptions_need_mqtt_5_and_an_external_broker(tmp_path: Path) -> None:
    """A 3.1.1 broker takes ``$share/...`` for an ordinary topic; the embedded broker
    serves one server process, and its acl_file cannot refuse a device the share."""
    from paho.mqtt.enums import MQTTProtocolVersion
    base = ServiceConfig(data_dir=tmp_path, keys_dir=tmp_path, shared_subscriptions=True,
                         broker_url="mqtts://broker.example:8883")
    with pytest.raises(ServiceError, match="shared subscriptions need MQTT 5"):
        replace(base, mqtt_protocol=MQTTProtocolVersion.MQTTv311)
    with pytest.raises(ServiceError, match="need an external broker"):
        replace(base, broker_url=None)
    assert replace(base, shared_subscriptions=False, broker_url=None).broker_url is None


@pytest.mark.parametrize(("content", "message"), [
    (b"garbage", "is not TUF metadata"),
    (b"", "is not TUF metadata"),
])
def test_a_root_that_is_not_a_root_is_refused_at_start(
        config: ServiceConfig, content: bytes, message: str) -> None:
    (config.keys_dir / "root.json").write_bytes(content)
    with pytest.raises(ServiceError, match=message):
        FleetService(config).start()

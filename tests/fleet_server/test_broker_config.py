"""The embedded Mosquitto's files as rendered from a BrokerConfig (pure). The broker that
reads them is tested against a real Mosquitto in test_broker.py."""

from __future__ import annotations

from fleet_server.broker_config import render_acl


def test_acl_grants_devices_only_their_subtree() -> None:
    acl = render_acl("f1", "fleet-server").splitlines()
    grants = [line for line in acl if line and not line.startswith("#")]
    assert grants == [
        "pattern read edgefleet/f1/devices/%u/desired",
        "pattern read edgefleet/f1/devices/%u/inbox/#",
        "pattern write edgefleet/f1/devices/%u/reported",
        "pattern write edgefleet/f1/devices/%u/telemetry",
        "pattern write edgefleet/f1/devices/%u/events",
        "pattern write edgefleet/f1/devices/%u/outbox/#",
        "user fleet-server",
        "topic readwrite edgefleet/f1/#",
    ]

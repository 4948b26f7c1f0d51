"""Telemetry: stored once per (device, seq), read per device, pruned by age."""

from __future__ import annotations

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from protocol.messages import Telemetry
from tests.fleet_server.registry.helpers import Clock, enroll


def test_telemetry_insert_is_idempotent(reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-0")
    enroll(reg, "gw-1")
    batch = [Telemetry(seq, 1000.0 + seq, {"cpu": seq / 10}) for seq in (1, 2, 3)]
    assert reg.add_telemetry("gw-0", batch) == 3
    assert reg.add_telemetry("gw-0", batch) == 0  # the same buffered batch re-sent
    more = [*batch[1:], Telemetry(4, 1004.0, {"cpu": 0.4})]
    assert reg.add_telemetry("gw-0", more) == 1
    assert reg.add_telemetry("gw-1", batch[:1]) == 1  # seq is per device
    assert [t.sample for t in reg.telemetry("gw-0")] == [*batch, more[-1]]
    assert [t.sample.seq for t in reg.telemetry("gw-0", since_seq=2, limit=1)] == [3]
    latest = reg.latest_telemetry()
    assert {d: (t.device, t.sample) for d, t in latest.items()} == {
        "gw-0": ("gw-0", more[-1]), "gw-1": ("gw-1", batch[0])}
    assert list(reg.latest_telemetry(group="elsewhere")) == []
    device = reg.get_device("gw-0")
    assert device is not None
    assert (device.online, device.last_seen) == (True, clock.now)
    assert reg.prune_telemetry(before=1002.5) == 3
    assert [t.sample.seq for t in reg.telemetry("gw-0")] == [3, 4]
    with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
        reg.add_telemetry("gw-9", batch)
    with pytest.raises(RegistryError, match="telemetry metrics is not JSON-serialisable"):
        reg.add_telemetry("gw-0", [Telemetry(9, 1.0, {"x": {1, 2}})])

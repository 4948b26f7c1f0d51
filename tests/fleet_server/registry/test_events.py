"""The event log: id order, polling from the last id, per device, bounded reads."""

from __future__ import annotations

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from tests.fleet_server.registry.helpers import Clock


def test_events_order_since_id_device_and_limit(reg: Registry, clock: Clock) -> None:
    ids = []
    for i in range(5):
        clock.now += 1
        ids.append(reg.add_event("agent.install", device=f"gw-{i % 2}",
                                 detail={"n": i, "reason": None}))
    assert ids == sorted(ids)
    events = reg.events()
    assert [e.detail["n"] for e in events] == [0, 1, 2, 3, 4]
    assert events[0].at == clock.now - 4
    assert [e.detail["n"] for e in reg.events(ids[2])] == [3, 4]
    assert [e.detail["n"] for e in reg.events(device="gw-1")] == [1, 3]
    assert [e.id for e in reg.events(ids[0], limit=2)] == ids[1:3]
    assert reg.events(ids[-1]) == []
    assert reg.add_event("fleet.note") > ids[-1]
    assert reg.events(ids[-1])[0].device is None
    with pytest.raises(RegistryError, match="limit must be at least 1"):
        reg.events(limit=0)
    with pytest.raises(RegistryError, match="event detail is not JSON-serialisable"):
        reg.add_event("x", detail={"nan": float("nan")})
    with pytest.raises(RegistryError, match="invalid event kind"):
        reg.add_event("")


def test_an_event_a_device_numbered_is_stored_once(reg: Registry) -> None:
    first = reg.add_event("install.staged", device="gw-0", detail={"n": 1}, seq=5)
    assert first > 0
    assert reg.add_event("install.staged", device="gw-0", detail={"n": 2}, seq=5) == 0
    assert reg.add_event("install.staged", device="gw-1", seq=5) > first  # per device
    assert reg.add_event("install.staged", device="gw-0", seq=6) > first
    assert [(e.device, e.detail) for e in reg.events()] == [
        ("gw-0", {"n": 1}), ("gw-1", {}), ("gw-0", {})]

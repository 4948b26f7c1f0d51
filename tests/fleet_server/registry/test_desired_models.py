"""Per-device desired models that carry a shadow candidate or compare_previous (rollouts):
stored, read back, published as such, and their shadow bundle fetchable."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from protocol.messages import DesiredShadow
from tests.fleet_server.registry.helpers import bundle, enroll, kinds


def test_extras_round_trip_and_history(reg: Registry) -> None:
    for device in ("a", "b", "c"):
        enroll(reg, device)
    v1 = reg.get_bundle(bundle(reg, version=1))
    v2 = reg.get_bundle(bundle(reg, version=2))
    assert v1 is not None
    assert v2 is not None
    reg.set_desired(v1.sha256, group="lab")
    shadowed = replace(v1.desired, shadow=DesiredShadow(2, v2.sha256, v2.size, 0.25))
    compared = replace(v2.desired, compare_previous=0.1)
    changes = reg.set_desired_models("digits", {"a": shadowed, "b": compared, "c": v1.desired})
    assert {c.device for c in changes} == {"a", "b"}  # c is already there
    devices = {d.id: d for d in reg.list_devices()}
    assert devices["a"].desired["digits"] == shadowed
    assert devices["b"].desired["digits"] == compared
    assert devices["c"].desired["digits"] == v1.desired
    assert reg.get_device("a").desired["digits"] == shadowed  # type: ignore[union-attr]
    assert devices["a"].desired_json()["digits"]["shadow"]["sample_rate"] == 0.25
    assert devices["b"].desired_json()["digits"]["compare_previous"] == 0.1
    assert reg.was_desired("a", v2.sha256)  # the shadow candidate may be fetched
    assert not reg.was_desired("c", v2.sha256)
    # Back to plain: the extras go; rollback pops the pushed history as for set_desired.
    reg.set_desired_models("digits", {"b": None})
    assert "digits" not in reg.get_device("b").desired  # type: ignore[union-attr]
    reg.rollback(devices=["b"], model="digits")
    assert reg.get_device("b").desired["digits"] == v2.desired  # type: ignore[union-attr]
    assert kinds(reg, "a")[-1] == "desired.set"


def test_refuses_unknown_devices_and_bundles_of_another_model(reg: Registry) -> None:
    enroll(reg, "a")
    other = reg.get_bundle(bundle(reg, name="speech", version=1))
    digits = reg.get_bundle(bundle(reg, version=1))
    assert other is not None
    assert digits is not None
    with pytest.raises(RegistryError, match="not digits"):
        reg.set_desired_models("digits", {"a": other.desired})
    with pytest.raises(RegistryError, match="unknown device"):
        reg.set_desired_models("digits", {"zz": digits.desired})
    assert reg.get_device("a").desired == {}  # type: ignore[union-attr]

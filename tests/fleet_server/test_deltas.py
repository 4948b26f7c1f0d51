"""Delta or full per device, and the bytes a publish sends (fleet_server.deltas, pure)."""

from __future__ import annotations

from pathlib import Path

from fleet_server.deltas import offer_for, plan_transfers
from fleet_server.registry import DeltaRecord, Device
from protocol.messages import DeltaOffer, DesiredModel, ModelReport

V3 = DesiredModel(3, "3" * 64, 1000)
DELTAS = [DeltaRecord("a" * 64, V3.bundle_sha256, 1, 50, Path("a"), 0.0),
          DeltaRecord("b" * 64, V3.bundle_sha256, 2, 30, Path("b"), 0.0)]


def _device(name: str, running: int | None, sha: str = "x" * 64) -> Device:
    models = {} if running is None else {"digits": ModelReport(running, sha, "committed")}
    return Device(id=name, group="lab", tags=(), profile="p", cert_fingerprint="",
                  enrolled_at=0.0, last_seen=None, online=True, desired={}, running=models,
                  reported={}, reported_at=None)


def test_the_delta_from_the_running_version_is_offered() -> None:
    assert offer_for(V3, ModelReport(2, "x" * 64, "committed"), DELTAS).delta == DeltaOffer(
        "b" * 64, 30, 2)
    assert offer_for(V3, ModelReport(1, None, "probation"), DELTAS).delta == DeltaOffer(
        "a" * 64, 50, 1)


def test_no_delta_without_a_matching_base() -> None:
    for running in (None, ModelReport(4, None, "committed"), ModelReport(3, None, "committed")):
        assert offer_for(V3, running, DELTAS) == V3
    assert offer_for(V3, ModelReport(2, None, "committed"), []) == V3
    other = DesiredModel(3, "4" * 64, 1000)  # a delta of another release is not offered
    assert offer_for(other, ModelReport(2, None, "committed"), DELTAS) == other


def test_the_plan_counts_delta_and_full_devices_and_skips_those_already_there() -> None:
    devices = [_device("a", 1), _device("b", 2), _device("c", 2), _device("d", None),
               _device("e", 3, V3.bundle_sha256)]
    plan = plan_transfers(V3, "digits", devices, DELTAS)
    assert plan.by_delta == {1: ("a",), 2: ("b", "c")}
    assert plan.full == ("d",)
    assert (plan.full_bytes, plan.wire_bytes, plan.saved_bytes) == (4000, 1110, 2890)
    assert plan.as_json()["delta_devices"] == {"1": ["a"], "2": ["b", "c"]}

"""Device messages stored a batch at a time (registry/device_messages.py): the pure
decisions (reorder window, a batch's plan, reported-model changes) and the batch store on
both databases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.errors import RegistryError
from fleet_server.registry import (
    DeviceEvent,
    DeviceMessage,
    DeviceReport,
    DeviceSample,
    Registry,
)
from fleet_server.registry.device_messages import (
    REORDER_WINDOW_S,
    DeviceState,
    is_overtaken,
    model_changes,
    plan_batch,
    report_from_payload,
)
from protocol.messages import ModelReport, Reported, Telemetry, encode
from tests.fleet_server.registry.helpers import Clock, enroll, kinds

_TIMES = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False)


def _report(device: str, version: int, at: float, model: str = "digits") -> DeviceReport:
    return report_from_payload(device, encode(Reported(
        profile="x86_64-avx2", agent_version="0.2.0",
        models={model: ModelReport(version, "a" * 64, "committed")}, at=at)))


def _event(device: str, seq: int | None, kind: str = "agent.install.staged",
           online: bool = True) -> DeviceEvent:
    return DeviceEvent(device, kind, {"seq": seq}, seq, online)


# --- the decisions, pure ---

@given(stored=st.one_of(st.none(), _TIMES), at=_TIMES)
def test_a_report_is_overtaken_only_by_a_newer_one_within_the_window(
        stored: float | None, at: float) -> None:
    overtaken = is_overtaken(stored, at)
    if stored is None or stored <= at:
        assert not overtaken  # nothing newer stored: the report is the newest
    elif stored - at >= REORDER_WINDOW_S:
        assert not overtaken  # sent long before the stored one: the clock was set back
    else:
        assert overtaken


@given(ats=st.lists(_TIMES, min_size=1, max_size=12),
       stored=st.one_of(st.none(), _TIMES))
def test_a_batch_keeps_the_report_that_reports_stored_one_by_one_would_leave(
        ats: list[float], stored: float | None) -> None:
    """Of several reports of one device in one batch, the one kept is the one that storing
    them one at a time, in order, would leave stored: the batch changes cost, not result."""
    kept, last = None, stored
    for index, at in enumerate(ats):
        if not is_overtaken(last, at):
            kept, last = index, at
    messages: list[DeviceMessage] = [_report("gw-0", n, at) for n, at in enumerate(ats)]
    plan = plan_batch(messages, {"gw-0": DeviceState(True, stored)})
    report = plan.reports.get("gw-0")
    assert (None if report is None else report.report.models["digits"].version) == kept


def test_a_plan_refuses_unknown_devices_and_bad_values_and_keeps_the_rest() -> None:
    messages: list[DeviceMessage] = [
        _event("gw-0", 1), _event("gw-9", 1), _event("gw-0", 2, kind=""),
        DeviceSample("gw-0", Telemetry(3, 1.0, {"x": float("nan")})),
        DeviceSample("gw-0", Telemetry(4, 1.0, {"x": 1})), _event("gw-0", 1)]
    plan = plan_batch(messages, {"gw-0": DeviceState(False, None)})
    assert sorted(plan.refused) == [1, 2, 3]
    assert "unknown device 'gw-9'" in str(plan.refused[1])
    assert "invalid event kind" in str(plan.refused[2])
    assert "not JSON-serialisable" in str(plan.refused[3])
    # The repeated event once; the device came online with its first message.
    assert [(kind, seq) for _, kind, _, seq in plan.events] == [
        ("agent.install.staged", 1), ("device.online", None)]
    assert [row[1] for row in plan.samples] == [4]


def test_a_plan_follows_a_device_offline_and_back_in_order() -> None:
    messages: list[DeviceMessage] = [
        _event("gw-0", 1, "agent.offline", online=False), _report("gw-0", 1, 5.0),
        _event("gw-1", None, "agent.offline", online=False)]
    plan = plan_batch(messages, {"gw-0": DeviceState(True, None),
                                 "gw-1": DeviceState(False, None)})
    assert [(device, kind) for device, kind, _, _ in plan.events] == [
        ("gw-0", "agent.offline"), ("gw-0", "device.offline"), ("gw-0", "device.online"),
        ("gw-1", "agent.offline")]
    assert (plan.devices["gw-0"].online, plan.devices["gw-0"].seen) == (True, True)
    assert (plan.devices["gw-1"].online, plan.devices["gw-1"].seen) == (False, False)


def test_reported_models_are_written_only_where_they_changed() -> None:
    stored = {("gw-0", "digits"): (1, "a" * 64, "committed"),
              ("gw-0", "old"): (3, None, "committed"),
              ("gw-1", "digits"): (1, "a" * 64, "committed")}
    reports = {"gw-0": _report("gw-0", 1, 1.0), "gw-1": _report("gw-1", 2, 1.0)}
    gone, changed = model_changes(stored, reports)
    assert gone == [("gw-0", "old")]
    assert changed == [("gw-1", "digits", 2, "a" * 64, "committed")]


# --- the batch store, on both databases ---

def test_a_batch_with_duplicates_stores_each_event_and_sample_once(
        reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-0")
    enroll(reg, "gw-1")
    batch: list[DeviceMessage] = [
        _event("gw-0", 1), _event("gw-1", 1), _event("gw-0", 1), _event("gw-0", None),
        DeviceSample("gw-0", Telemetry(2, 10.0, {"n": 1})),
        DeviceSample("gw-0", Telemetry(2, 10.0, {"n": 1}))]
    stored = reg.store_messages(batch)
    assert stored.refused == {}
    assert stored.new_samples == [("gw-0", Telemetry(2, 10.0, {"n": 1}))]
    assert kinds(reg, "gw-0") == ["device.enrolled", "agent.install.staged", "device.online",
                                  "agent.install.staged"]
    # Delivered again in a later batch (a lost acknowledgement): nothing new.
    clock.now += 5
    again = reg.store_messages(batch)
    assert (again.refused, again.new_samples) == ({}, [])
    assert len(reg.events(device="gw-0")) == 5  # only the unnumbered event again
    assert [r.sample.seq for r in reg.telemetry("gw-0")] == [2]
    device = reg.get_device("gw-0")
    assert device is not None
    assert (device.online, device.last_seen) == (True, clock.now)


def test_a_refused_message_in_the_middle_of_a_batch_leaves_the_others_stored(
        reg: Registry) -> None:
    enroll(reg, "gw-0")
    batch: list[DeviceMessage] = [
        _event("gw-0", 1), _report("gw-9", 1, 1.0), _event("gw-0", 2, kind="bad\nkind"),
        _report("gw-0", 4, 2.0), DeviceSample("gw-0", Telemetry(3, 1.0, {"n": 1}))]
    stored = reg.store_messages(batch)
    assert sorted(stored.refused) == [1, 2]
    device = reg.get_device("gw-0")
    assert device is not None
    assert device.running["digits"].version == 4
    assert [e.detail for e in reg.events(device="gw-0") if e.kind.startswith("agent.")] == [
        {"seq": 1}]
    assert len(stored.new_samples) == 1
    assert reg.get_device("gw-9") is None


def test_of_two_reports_of_a_device_in_one_batch_the_newest_is_stored(
        reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-0")
    enroll(reg, "gw-1")
    reg.store_messages([_report("gw-0", 2, 100.0), _report("gw-1", 1, 50.0),
                        _report("gw-0", 1, 99.0), _report("gw-1", 2, 51.0)])
    versions = {d.id: (d.running["digits"].version, d.reported["at"], d.reported_at)
                for d in reg.list_devices()}
    assert versions == {"gw-0": (2, 100.0, clock.now), "gw-1": (2, 51.0, clock.now)}


def test_reports_out_of_order_across_batches_keep_the_newest_within_the_window(
        reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-0")
    reg.store_messages([_report("gw-0", 3, 1000.0, model="speech")])
    clock.now += 900  # a long server backlog: the device's clock decides
    reg.store_messages([_report("gw-0", 2, 999.0, model="speech")])
    device = reg.get_device("gw-0")
    assert device is not None
    assert dict(device.running) == {"speech": ModelReport(3, "a" * 64, "committed")}
    assert device.last_seen == clock.now
    # A clock set back by more than the window: believed, and its models replace the rest.
    reg.store_messages([_report("gw-0", 1, 1000.0 - REORDER_WINDOW_S - 1)])
    device = reg.get_device("gw-0")
    assert device is not None
    assert dict(device.running) == {"digits": ModelReport(1, "a" * 64, "committed")}


def test_set_reported_and_add_telemetry_store_all_or_nothing(reg: Registry) -> None:
    """The one-device calls over the batch store: a refusal is raised and stores nothing."""
    with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
        reg.set_reported("gw-9", encode(Reported("x86_64-avx2", "0.2.0", {}, at=1.0)))
    enroll(reg, "gw-0")
    with pytest.raises(RegistryError, match="not JSON-serialisable"):
        reg.add_telemetry("gw-0", [Telemetry(1, 1.0, {}),
                                   Telemetry(2, 1.0, {"x": float("inf")})])
    assert reg.telemetry("gw-0") == []
    assert reg.add_telemetry("gw-0", [Telemetry(1, 1.0, {}), Telemetry(1, 1.0, {})]) == 1

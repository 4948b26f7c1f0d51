"""Desired state, its history and rollback, and which bundles a device may fetch."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.errors import RegistryError
from fleet_server.registry import DesiredChange, DesiredState, Registry
from fleet_server.registry.experiments import ExperimentRecord
from protocol.messages import DesiredModel
from tests.fleet_server.registry.helpers import FINGERPRINT, bundle, enroll, kinds, report


def _model(reg: Registry, sha: str) -> DesiredModel:
    record = reg.get_bundle(sha)
    assert record is not None
    return record.desired


def test_set_desired_names_the_bundle_as_published(reg: Registry) -> None:
    for i in range(3):
        enroll(reg, f"gw-{i}")
    sha = bundle(reg, version=2)
    want = DesiredModel(2, sha, len(b"digits v2"))
    assert reg.set_desired(sha, devices=["gw-0", "gw-1"]) == [
        DesiredChange("gw-0", "digits", None, want), DesiredChange("gw-1", "digits", None, want)]
    assert reg.set_desired(sha, devices=["gw-0"]) == []  # already there: no change
    assert {d.id: dict(d.desired) for d in reg.list_devices()} == {
        "gw-0": {"digits": want}, "gw-1": {"digits": want}, "gw-2": {}}
    event = reg.events(device="gw-0")[-1]
    assert (event.kind, dict(event.detail)) == ("desired.set", {
        "model": "digits", "before": None,
        "after": {"version": 2, "bundle_sha256": sha, "size": len(b"digits v2")}})


def test_group_rollout_then_rollback_restores_previous(reg: Registry) -> None:
    for i in range(3):
        enroll(reg, f"gw-{i}", "lab")
    enroll(reg, "cam-0", "field")
    v1, v2, other = bundle(reg, version=1), bundle(reg, version=2), bundle(reg, "vit", 1)
    reg.set_desired(v1, group="lab")
    reg.set_desired(other, devices=["gw-0"])
    assert len(reg.set_desired(v2, group="lab")) == 3

    def digits() -> dict[str, int | None]:
        return {d.id: d.desired["digits"].version if "digits" in d.desired else None
                for d in reg.list_devices()}

    assert digits() == {"cam-0": None, "gw-0": 2, "gw-1": 2, "gw-2": 2}
    restored = reg.rollback(group="lab", model="digits")
    assert [(c.device, c.before, c.after) for c in restored] == [
        (f"gw-{i}", _model(reg, v2), _model(reg, v1)) for i in range(3)]
    assert digits() == {"cam-0": None, "gw-0": 1, "gw-1": 1, "gw-2": 1}
    gw0 = reg.get_device("gw-0")
    assert gw0 is not None
    assert gw0.desired["vit"] == _model(reg, other)  # the other model is untouched
    # Without a model, each device's last change is undone: vit on gw-0, digits elsewhere.
    undone = reg.rollback(group="lab")
    assert [(c.device, c.model, c.after) for c in undone] == [
        ("gw-0", "vit", None), ("gw-1", "digits", None), ("gw-2", "digits", None)]
    assert digits() == {"cam-0": None, "gw-0": 1, "gw-1": None, "gw-2": None}
    assert reg.rollback(devices=["gw-0"])[0].after is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback(group="lab")
    device_kinds = kinds(reg, "gw-0")
    assert device_kinds.count("desired.set") == 3
    assert device_kinds.count("desired.rolled_back") == 3


def test_clear_desired_and_roll_it_back(reg: Registry) -> None:
    enroll(reg, "gw-0")
    sha = bundle(reg)
    reg.set_desired(sha, devices=["gw-0"])
    assert [c.after for c in reg.clear_desired("digits", devices=["gw-0"])] == [None]
    assert reg.clear_desired("digits", devices=["gw-0"]) == []
    assert reg.rollback(devices=["gw-0"], model="digits")[0].after == _model(reg, sha)


def test_desired_changes_refuse_bad_targets_and_change_nothing(reg: Registry) -> None:
    enroll(reg, "gw-0")
    sha = bundle(reg)
    with pytest.raises(RegistryError, match=r"unknown device\(s\): gw-8, gw-9; enroll"):
        reg.set_desired(sha, devices=["gw-0", "gw-9", "gw-8"])
    with pytest.raises(RegistryError, match="group 'nowhere' has no devices"):
        reg.set_desired(sha, group="nowhere")
    with pytest.raises(RegistryError, match="either by a list of ids or by a group"):
        reg.set_desired(sha)
    with pytest.raises(RegistryError, match="either by a list of ids or by a group"):
        reg.set_desired(sha, devices=["gw-0"], group="lab")
    with pytest.raises(RegistryError, match="devices must be a list of ids"):
        reg.set_desired(sha, devices="gw-0")
    with pytest.raises(RegistryError, match="no devices given"):
        reg.set_desired(sha, devices=[])
    with pytest.raises(RegistryError, match="no stored bundle has sha256"):
        reg.set_desired("0" * 64, devices=["gw-0"])
    with pytest.raises(RegistryError, match="nothing to roll back: model 'digits' of"):
        reg.rollback(devices=["gw-0"], model="digits")
    device = reg.get_device("gw-0")
    assert device is not None
    assert dict(device.desired) == {}
    assert not reg.was_desired("gw-0", sha)


def test_set_desired_on_many_devices(reg: Registry) -> None:
    """More devices than one IN (...) chunk."""
    with reg._tx(write=True) as tx:  # white-box bulk insert: 1,200 enrollments one by one
        tx.many("INSERT INTO devices (id, group_name, profile, cert_fingerprint, enrolled_at, "
                "online, reported) VALUES (?, 'lab', 'p', ?, 0, ?, '{}')",
                [(f"gw-{i:04}", FINGERPRINT, False) for i in range(1200)])
    sha = bundle(reg)
    ids = [f"gw-{i:04}" for i in range(1200)]
    assert len(reg.set_desired(sha, devices=ids)) == 1200
    assert len(reg.unconverged(group="lab")) == 1200
    assert len(reg.rollback(devices=ids)) == 1200
    assert reg.was_desired("gw-1199", sha)


def test_was_desired_remembers_every_bundle_ever_desired(reg: Registry) -> None:
    enroll(reg, "gw-0")
    enroll(reg, "gw-1")
    v1, v2 = bundle(reg, version=1), bundle(reg, version=2)
    reg.set_desired(v1, devices=["gw-0"])
    reg.set_desired(v2, devices=["gw-0"])
    reg.rollback(devices=["gw-0"])
    reg.rollback(devices=["gw-0"])  # nothing desired any more
    assert reg.was_desired("gw-0", v1)
    assert reg.was_desired("gw-0", v2.upper())
    assert not reg.was_desired("gw-1", v1)
    assert not reg.was_desired("gw-9", v1)
    assert not reg.was_desired("gw-0", "not a hash")


def test_a_device_cannot_make_a_bundle_fetchable_with_an_event_of_its_own(
        reg: Registry) -> None:
    """Regression: was_desired searched the event log, where the service stores a device's
    events under the device's own kind: a forged "desired.set" opened any bundle to it."""
    enroll(reg, "gw-0")
    secret = bundle(reg, "vit", 1)
    reg.add_event("desired.set", device="gw-0", detail={
        "model": "vit", "before": None, "device_at": 1.0,
        "after": {"version": 1, "bundle_sha256": secret}})
    assert not reg.was_desired("gw-0", secret)


# --- property: desired-state changes and rollbacks behave like a stack --------------------

_MODELS = ("a", "b")
_TARGETS = st.one_of(st.just("group"), st.sampled_from([0, 1, 2]))
_OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_MODELS), st.integers(1, 3), _TARGETS),
    st.tuples(st.just("clear"), st.sampled_from(_MODELS), st.just(0), _TARGETS),
    st.tuples(st.just("rollback"), st.sampled_from((*_MODELS, None)), st.just(0), _TARGETS),
), max_size=12)


class _Spec:
    """The specification: per device, a desired dict and a stack of (model, previous)."""

    def __init__(self, devices: list[str]) -> None:
        self.desired: dict[str, dict[str, DesiredModel]] = {d: {} for d in devices}
        self.history: dict[str, list[tuple[str, DesiredModel | None]]] = {
            d: [] for d in devices}

    def change(self, devices: list[str], model: str,
               after: DesiredModel | None) -> list[DesiredChange]:
        changes = []
        for d in devices:
            before = self.desired[d].get(model)
            if before != after:
                self.history[d].append((model, before))
                self._put(d, model, after)
                changes.append(DesiredChange(d, model, before, after))
        return changes

    def rollback(self, devices: list[str], model: str | None) -> list[DesiredChange]:
        changes = []
        for d in devices:
            stack = self.history[d]
            at = next((i for i in reversed(range(len(stack)))
                       if model is None or stack[i][0] == model), None)
            if at is None:
                continue
            entry_model, previous = stack.pop(at)
            changes.append(DesiredChange(d, entry_model, self.desired[d].get(entry_model),
                                         previous))
            self._put(d, entry_model, previous)
        return changes

    def _put(self, device: str, model: str, value: DesiredModel | None) -> None:
        if value is None:
            self.desired[device].pop(model, None)
        else:
            self.desired[device][model] = value


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_desired_and_rollback_follow_the_stack_model(
        reg: Registry, ops: list[tuple[str, str | None, int, str | int]]) -> None:
    # One registry for every example: each example works on devices of its own.
    prefix = secrets.token_hex(4)
    devices = [f"{prefix}-{i}" for i in range(3)]
    group = f"g-{prefix}"
    for i, d in enumerate(devices):
        enroll(reg, d, group if i < 2 else f"other-{prefix}")
    shas = {(m, v): reg.put_bundle(f"{prefix} {m} v{v}".encode(), f"{prefix}-{m}", v).sha256
            for m in _MODELS for v in (1, 2, 3)}
    spec = _Spec(devices)
    for op, model, version, target in ops:
        selected = devices[:2] if target == "group" else [devices[int(target)]]
        where: dict[str, Any] = ({"group": group} if target == "group"
                                 else {"devices": selected})
        name = f"{prefix}-{model}"
        if op == "set":
            sha = shas[(str(model), version)]
            got = reg.set_desired(sha, **where)
            assert got == spec.change(selected, name, _model(reg, sha))
        elif op == "clear":
            assert reg.clear_desired(name, **where) == spec.change(selected, name, None)
        else:
            expected = spec.rollback(selected, None if model is None else name)
            if expected:
                assert reg.rollback(model=None if model is None else name, **where) == expected
            else:
                with pytest.raises(RegistryError, match="nothing to roll back"):
                    reg.rollback(model=None if model is None else name, **where)
        for d in devices:
            device = reg.get_device(d)
            assert device is not None
            assert dict(device.desired) == spec.desired[d]


def test_desired_states_read_set_based_match_the_per_device_reads(reg: Registry) -> None:
    """What a publish reads for many devices at once (Registry.desired_states and its
    pages) is what reading each device alone gives: desired and running models and the
    running experiments it takes part in, none of another device's."""
    for i in range(7):  # groups interleaved in id order: a page's id range spans both
        enroll(reg, f"gw-{i}", group="lab" if i % 2 else "field")
    v1, v2 = bundle(reg, version=1), bundle(reg, version=2)
    reg.set_desired(v1, group="lab")
    reg.set_desired(v2, devices=["gw-3", "gw-4"])
    reg.set_reported("gw-3", report(1, v1))
    spec = {"name": "speed", "model": "digits", "arms": ["a", "b"]}
    reg.create_experiment(ExperimentRecord("speed", "digits", "running", 0.0, 0.0, 0, spec,
                                           {}), ["a", "b"], ["gw-1", "gw-4"])
    reg.create_experiment(ExperimentRecord("old", "digits", "stopped", 0.0, 0.0, 0, spec, {}),
                          ["a", "b"], ["gw-1"])

    def alone(device_id: str) -> DesiredState:
        device = reg.get_device(device_id)
        assert device is not None
        return DesiredState(device_id, device.desired, device.running,
                            tuple(reg.experiment_declarations(device_id)))

    lab = [alone(f"gw-{i}") for i in (1, 3, 5)]
    assert [s.experiments for s in lab] == [(spec,), (), ()]
    assert lab[1].running["digits"].version == 1
    assert lab[1].desired["digits"].version == 2
    assert reg.desired_states(["gw-5", "nobody", "gw-3", "gw-1", "gw-3"]) == lab
    pages, after = [], ""
    while page := reg.desired_states_page(group="lab", after=after, limit=2):
        pages.append(page)
        after = page[-1].id
    assert pages == [lab[:2], lab[2:]]
    everyone = reg.desired_states_page(limit=100)
    assert everyone == [alone(f"gw-{i}") for i in range(7)]
    assert reg.desired_states_page(after="gw-6") == []

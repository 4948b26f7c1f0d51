"""The rollout controller, table by table: start, judge, halt, advance, commands."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fleet_server.errors import RolloutError
from fleet_server.rollouts.controller import (
    RESTORE_WATCH_S,
    command,
    phase_devices,
    rereleased,
    restore,
    start,
    tick,
)
from fleet_server.rollouts.evidence import Health
from fleet_server.rollouts.model import (
    Emit,
    Observation,
    Rerelease,
    RolloutSpec,
    SetDesired,
    state_from_json,
    state_to_json,
)
from fleet_server.rollouts.plan import Target
from protocol.messages import DesiredModel

V1 = DesiredModel(1, "a" * 64, 10)
V2 = DesiredModel(2, "b" * 64, 20)
T0 = 1000.0


def _spec(n: int = 40, **options: object) -> RolloutSpec:
    targets = tuple(Target(f"d{i:02d}", "x86" if i % 2 else "arm") for i in range(n))
    spec = RolloutSpec(id="r1", model="digits", candidate=V2, targets=targets,
                       previous={t.device: V1 for t in targets}, bake_s=60.0)
    return replace(spec, **options)  # type: ignore[arg-type]


def _healthy(devices: tuple[str, ...], version: int = 2,
             **health: Any) -> dict[str, Observation]:
    h = Health(samples=3, requests=300, pairs=300, agree=300, p99_ms=1.0,
               baseline_p99_ms=1.0)
    return {d: Observation(d, True, version, version, "committed", replace(h, **health))
            for d in devices}


def test_start_exposes_the_first_step_only_with_the_previous_version_kept() -> None:
    state, actions = start(_spec(), T0)
    assert isinstance(actions[0], Emit)
    assert actions[0].kind == "rollout.started"
    desired = actions[1]
    assert isinstance(desired, SetDesired)
    assert set(desired.targets) == set(phase_devices(state)) == set(state.exposed)
    assert len(desired.targets) == 2  # 5% of 20 per profile, rounded up: one each
    assert all(d == replace(V2, compare_previous=0.1) for d in desired.targets.values())


def test_shadow_phase_keeps_serving_the_previous_version() -> None:
    state, actions = start(_spec(shadow_s=30.0), T0)
    assert state.phase == "shadow"
    desired = next(a for a in actions if isinstance(a, SetDesired))
    for model in desired.targets.values():
        assert model is not None
        assert model.version == 1
        assert model.shadow is not None
        assert model.shadow.version == 2


def test_shadow_needs_a_served_version() -> None:
    spec = _spec(shadow_s=30.0)
    spec = replace(spec, previous={t.device: None for t in spec.targets})
    with pytest.raises(RolloutError, match="shadow phase needs"):
        start(spec, T0)


def test_a_step_passes_only_after_its_bake_and_enough_reports() -> None:
    state, _ = start(_spec(), T0)
    devices = phase_devices(state)
    state, actions = tick(state, _healthy(devices), T0 + 30)
    assert actions == []
    assert state.results[-1].verdict == "baking"
    state, actions = tick(state, {}, T0 + 61)
    assert actions == []
    assert state.results[-1].verdict == "waiting"
    assert "0 of 2 devices reporting" in state.results[-1].waiting_for
    state, actions = tick(state, _healthy(devices), T0 + 61)
    assert state.step == 1
    assert [a.kind for a in actions if isinstance(a, Emit)] == [
        "rollout.step"]
    new = next(a for a in actions if isinstance(a, SetDesired))
    assert not set(new.targets) & set(devices)  # only the step's new devices


@pytest.mark.parametrize(("health", "gate"), [
    ({"errors": 30}, "error_rate<=0.01"),
    ({"agree": 200}, "agreement>=0.98"),
    ({"p99_ms": 5.0}, "p99_ratio<=1.5"),
    ({"restarts": 1}, "crash_rate<=0.05"),
    ({"confidence_shift": 0.4}, "confidence_shift<=0.1"),
    ({"drift_psi": 0.9}, "drift<=0.25"),
])
def test_a_failing_gate_halts_and_restores(health: dict[str, Any], gate: str) -> None:
    state, _ = start(_spec(n=200), T0)
    devices = phase_devices(state)
    state, actions = tick(state, _healthy(devices, **health), T0 + 5)
    assert state.status == "halted"
    assert state.reason is not None
    assert state.reason.gate == gate
    restore = next(a for a in actions if isinstance(a, SetDesired))
    assert restore.targets == dict.fromkeys(devices, V1)
    halted = next(a for a in actions if isinstance(a, Emit))
    assert halted.kind == "rollout.halted"
    assert {"rollout", "step", "gate", "value", "threshold", "n", "reason"} <= set(
        halted.detail)
    # Final: nothing moves it any more.
    assert tick(state, _healthy(devices), T0 + 999) == (state, [])
    with pytest.raises(RolloutError, match="halted"):
        command(state, "resume", T0 + 999)


def test_failed_installs_halt() -> None:
    state, _ = start(_spec(n=100), T0)
    devices = phase_devices(state)
    obs = {d: Observation(d, True, 1, 2, "failed") for d in devices}
    state, _ = tick(state, obs, T0 + 5)
    assert state.status == "halted"
    assert state.reason is not None
    assert state.reason.gate == "install_failures<=0.05"


def test_pause_holds_resume_continues_abort_restores() -> None:
    state, _ = start(_spec(), T0)
    devices = phase_devices(state)
    state, actions = command(state, "pause", T0 + 1, "alice")
    assert isinstance(actions[0], Emit)
    assert state.status == "paused"
    assert actions[0].detail["actor"] == "alice"
    with pytest.raises(RolloutError, match="paused already"):
        command(state, "pause", T0 + 1)
    state, actions = tick(state, _healthy(devices), T0 + 100)
    assert actions == []
    assert state.step == 0
    state, _ = command(state, "resume", T0 + 101)
    state, _ = tick(state, _healthy(devices), T0 + 102)
    assert state.step == 1
    state, actions = command(state, "abort", T0 + 103, "bob")
    assert state.status == "aborted"
    restore = next(a for a in actions if isinstance(a, SetDesired))
    assert set(restore.targets) == set(state.exposed)
    assert set(restore.targets.values()) == {V1}


def test_promote_gives_everyone_the_candidate() -> None:
    state, _ = start(_spec(), T0)
    state, actions = command(state, "promote", T0 + 1)
    assert state.status == "succeeded"
    final = next(a for a in actions if isinstance(a, SetDesired))
    assert len(final.targets) == 40
    assert set(final.targets.values()) == {V2}


def test_state_round_trips_through_json() -> None:
    state, _ = start(_spec(shadow_s=10.0), T0)
    state, _ = tick(state, _healthy(phase_devices(state)), T0 + 5)
    assert state_from_json(state_to_json(state)) == state


# --- after a halt: devices that refuse their previous version get a re-release ----------

def test_a_device_that_refuses_its_previous_version_gets_one_rerelease() -> None:
    state, _ = start(_spec(), T0)
    canary = tuple(sorted(state.exposed))
    halted, _ = command(state, "abort", T0 + 10, "alice")
    assert halted.restoring == dict.fromkeys(canary, "switching")
    assert halted.restore_until == T0 + 10 + RESTORE_WATCH_S
    switched, refused = canary
    observations = {
        switched: Observation(switched, True, 1, 1, "committed"),  # switched back at once
        refused: Observation(refused, True, 2, 1, "failed")}  # refused v1: a downgrade
    after, actions = restore(halted, observations, T0 + 20)
    assert after.restoring == {refused: "switching"}
    assert actions == [Rerelease("digits", V1, (refused,))]
    v3 = DesiredModel(3, "c" * 64, 10)
    after, made = rereleased(after, V1.bundle_sha256, v3, [refused])
    assert after.restoring == {refused: "rereleased"}
    assert made[0] == SetDesired("digits", {refused: v3}, "rerelease")
    assert isinstance(made[1], Emit)
    assert made[1].kind == "rollout.rereleased"
    assert state_from_json(state_to_json(after)) == replace(after, revision=0)
    # While it installs v3 nothing more is asked; once it runs v3 it is done.
    installing = {refused: Observation(refused, True, 2, 3, "downloading")}
    assert restore(after, installing, T0 + 30) == (after, [])
    done, actions = restore(after, {refused: Observation(refused, True, 3, 3, "probation")},
                            T0 + 40)
    assert (done.restoring, actions) == ({}, [])


def test_a_second_refusal_reuses_the_rerelease_and_watching_ends() -> None:
    state, _ = start(_spec(), T0)
    first, second = sorted(state.exposed)
    halted, _ = command(state, "abort", T0, "alice")
    v3 = DesiredModel(3, "c" * 64, 10)
    halted, _ = rereleased(halted, V1.bundle_sha256, v3, [first])
    later, actions = restore(halted, {second: Observation(second, True, 2, 1, "failed")},
                             T0 + 60)
    assert not any(isinstance(a, Rerelease) for a in actions)
    assert actions[0] == SetDesired("digits", {second: v3}, "rerelease")
    assert later.restoring == {first: "rereleased", second: "rereleased"}
    # A device that refuses the re-release too is let go; the rest at restore_until.
    gone, _ = restore(later, {first: Observation(first, True, 2, 3, "failed")}, T0 + 70)
    assert gone.restoring == {second: "rereleased"}
    assert restore(gone, {}, T0 + RESTORE_WATCH_S)[0].restoring == {}


def test_states_stored_before_rereleases_existed_still_load() -> None:
    state, _ = start(_spec(), T0)
    old = state_to_json(state)
    for key in ("restoring", "restore_until", "rereleased"):
        del old[key]
    assert state_from_json(old) == replace(state, revision=0)

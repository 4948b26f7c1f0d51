"""The controller driving a simulated fleet (fake clock, no broker): failure modes halt at
the canary with nobody else exposed, good versions go through, and invariants hold for any
fleet and failure mix (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.rollouts.controller import command, start, tick
from fleet_server.rollouts.model import RolloutState
from fleet_server.rollouts.plan import allowed, plan_steps
from fleet_server.rollouts.simulator import Behaviour, SimFleet, make_spec
from protocol.messages import DesiredModel

V1 = DesiredModel(1, "a" * 64, 10)
V2 = DesiredModel(2, "b" * 64, 20)
PROFILES = ("x86-64-avx2", "x86-64-vnni", "arm64-neon")


def _fleet(n: int, bad: Behaviour | None = None, **options: object) -> SimFleet:
    profiles = {f"dev{i:04d}": PROFILES[i % 3] for i in range(n)}
    return SimFleet("digits", V1, profiles, seed=n,
                    behaviour=lambda d, v: bad if (v == 2 and bad is not None) else Behaviour(),
                    **options)  # type: ignore[arg-type]


def _run(fleet: SimFleet, **spec: object) -> RolloutState:
    state, actions = start(make_spec(fleet, V2, bake_s=300.0, **spec), fleet.now)
    fleet.apply(actions)
    return fleet.run(state)


def test_a_good_version_reaches_every_device() -> None:
    fleet = _fleet(300)
    state = _run(fleet)
    assert state.status == "succeeded", state.results[-1]
    assert all(d.version == 2 for d in fleet.devices.values())
    assert [r.name for r in state.results] == ["5%", "25%", "100%"]


@pytest.mark.parametrize("bad", [
    Behaviour(install_fails=True),
    Behaviour(crash_rate=0.5),
    Behaviour(p99_ms=8.0),
    Behaviour(agreement=0.85),
    Behaviour(error_rate=0.2),
    Behaviour(confidence=0.5),
    Behaviour(drift_psi=0.8),
], ids=["install", "crash", "slow", "disagrees", "errors", "unsure", "drift"])
def test_a_bad_version_halts_at_the_canary(bad: Behaviour) -> None:
    fleet = _fleet(300, bad)
    state = _run(fleet)
    assert state.status == "halted"
    assert state.reason is not None
    assert state.reason.phase == "5%"
    canary = set(plan_steps("r-sim", fleet.targets(), (5.0, 25.0, 100.0))[0])
    assert fleet.exposed_to(2) <= canary
    fleet.advance(120)
    assert all(d.version == 1 and d.desired == V1 for d in fleet.devices.values())
    assert [e.kind for e in fleet.events][-1] == "rollout.halted"


def test_a_disagreeing_model_is_caught_in_shadow_before_anyone_serves_it() -> None:
    fleet = _fleet(120, Behaviour(agreement=0.8))
    state = _run(fleet, shadow_s=120.0)
    assert state.status == "halted"
    assert state.reason is not None
    assert state.reason.phase == "shadow"
    assert fleet.exposed_to(2) == set()


def test_offline_devices_get_the_version_when_they_return() -> None:
    fleet = _fleet(60, back={"dev0001": 2000.0}, offline={"dev0001": 0.0})
    state = _run(fleet, min_reporting=0.9)
    assert state.status == "succeeded"
    fleet.advance(3000)
    assert fleet.devices["dev0001"].version == 2


def test_offline_devices_of_a_halted_rollout_never_get_it() -> None:
    fleet = _fleet(300, Behaviour(agreement=0.8), offline={f"dev{i:04d}": 0.0
                                                          for i in range(0, 300, 7)},
                   back={f"dev{i:04d}": 5000.0 for i in range(0, 300, 7)})
    state = _run(fleet)
    assert state.status == "halted"
    fleet.advance(6000)
    assert fleet.exposed_to(2) <= set(state.exposed)
    assert all(d.version == 1 for d in fleet.devices.values())


_behaviours = st.builds(Behaviour, install_fails=st.booleans(),
                        crash_rate=st.sampled_from([0.0, 0.0, 0.3]),
                        p99_ms=st.sampled_from([2.0, 2.0, 9.0]),
                        agreement=st.sampled_from([0.999, 0.999, 0.7]),
                        error_rate=st.sampled_from([0.0, 0.0, 0.3]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 60), bad=st.one_of(st.none(), _behaviours),
       offline=st.sets(st.integers(0, 59), max_size=10),
       shadow=st.sampled_from([0.0, 60.0]), pause_at=st.sampled_from([None, 3, 6]),
       steps=st.sampled_from([(5.0, 25.0, 100.0), (50.0, 100.0), (100.0,)]))
def test_invariants(*, n: int, bad: Behaviour | None, offline: set[int], shadow: float,
                    pause_at: int | None, steps: tuple[float, ...]) -> None:
    fleet = _fleet(n, bad, offline={f"dev{i:04d}": 0.0 for i in offline},
                   back={f"dev{i:04d}": 900.0 for i in offline})
    spec = make_spec(fleet, V2, bake_s=120.0, shadow_s=shadow, steps=steps)
    state, actions = start(spec, fleet.now)
    fleet.apply(actions)
    targets = fleet.targets()
    for t in range(80):
        before = state
        if t == pause_at and not state.final:
            state, actions = command(state, "pause", fleet.now)
            fleet.apply(actions)
        state, actions = tick(state, fleet.observations(state), fleet.now)
        fleet.apply(actions)
        if before.final:
            assert (state, actions) == (before, [])               # final stays final
        if before.status == "paused":
            assert (state.phase, state.step) == (before.phase, before.step)  # no advance
        if state.status != "succeeded":
            share = spec.steps[0 if state.phase == "shadow" else state.step]
            assert len(state.exposed) <= allowed(targets, share)  # never beyond the step
        assert fleet.exposed_to(2) <= set(state.exposed)          # only exposed serve it
        if t == (pause_at or 0) + 5 and state.status == "paused":
            state, actions = command(state, "resume", fleet.now)
        fleet.advance(30.0)
    if state.status in ("halted", "aborted"):
        fleet.advance(1000)
        assert all(d.desired == V1 for d in fleet.devices.values())
        assert all(d.version == 1 for d in fleet.devices.values() if d.online)
    if state.status == "succeeded":
        assert all(d.desired == V2 for d in fleet.devices.values())

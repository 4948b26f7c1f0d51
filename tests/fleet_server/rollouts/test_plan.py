"""Step assignment: deterministic, stratified by profile, within each step's share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.errors import RolloutError
from fleet_server.rollouts.plan import Target, allowed, check_steps, plan_steps

_targets = st.lists(st.tuples(st.text("abcdef0123", min_size=1, max_size=6),
                              st.sampled_from(["x86", "arm", "vnni", "gpu"])),
                    min_size=1, max_size=80, unique_by=lambda t: t[0]).map(
    lambda pairs: [Target(d, p) for d, p in pairs])
_steps = st.lists(st.floats(0.5, 99.5), max_size=4, unique=True).map(
    lambda s: (*sorted(s), 100.0))


@given(_targets, _steps, st.text(max_size=8))
def test_plan_properties(targets: list[Target], steps: tuple[float, ...],
                         rollout: str) -> None:
    plan = plan_steps(rollout, targets, steps)
    flat = [d for added in plan for d in added]
    assert sorted(flat) == sorted(t.device for t in targets)        # everyone, once
    profiles = {t.device: t.profile for t in targets}
    assert {profiles[d] for d in plan[0]} == set(profiles.values())  # every kind first
    for k, share in enumerate(steps):
        reached = sum(len(a) for a in plan[:k + 1])
        assert reached == allowed(targets, share)
        # At most the share rounded up per profile: one extra device per profile at most.
        assert reached <= math.ceil(share * len(targets) / 100) + len(set(profiles.values()))
    assert plan == plan_steps(rollout, list(reversed(targets)), steps)  # order-free


def test_plan_differs_between_rollouts() -> None:
    targets = [Target(f"d{i}", "x86") for i in range(100)]
    assert plan_steps("a", targets, (5.0, 100.0))[0] != plan_steps("b", targets,
                                                                    (5.0, 100.0))[0]
    assert len(plan_steps("a", targets, (5.0, 100.0))[0]) == 5


@pytest.mark.parametrize("steps", [(), (5, 25), (25, 5, 100), (0, 100), (5, 5, 100),
                                   (5, 150)])
def test_check_steps_refuses(steps: tuple[float, ...]) -> None:
    with pytest.raises(RolloutError):
        check_steps(steps)

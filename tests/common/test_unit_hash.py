"""The one hash that places units in [0, 1) (common/unit_hash.py), and that moving rollout
plans and experiment arms onto it changed no assignment: the figures pinned here were
computed with each module's own SHA-256 code before they shared this function."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given
from hypothesis import strategies as st

from common.unit_hash import unit_hash
from experiments.assign import arm_for_key, device_arm
from fleet_server.rollouts.plan import Target, plan_steps

SPLIT = (("a", 0.5), ("b", 0.3), ("c", 0.2))


@given(st.text(max_size=40), st.text(max_size=40))
def test_unit_hash_is_the_sha256_fraction_in_the_unit_interval(scope: str, unit: str) -> None:
    u = unit_hash(scope, unit)
    assert 0.0 <= u < 1.0
    digest = hashlib.sha256(f"{scope}/{unit}".encode()).digest()
    assert u == int.from_bytes(digest[:8], "big") / 2.0**64


@given(st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=40, unique=True),
       st.text(max_size=12))
def test_plan_order_is_the_full_digest_order_it_replaced(devices: list[str], rollout: str,
                                                         ) -> None:
    # The plan once sorted by the whole 32-byte digest; the first 8 bytes order alike.
    by_fraction = sorted(devices, key=lambda d: (unit_hash(rollout, d), d))
    by_digest = sorted(devices,
                       key=lambda d: (hashlib.sha256(f"{rollout}/{d}".encode()).digest(), d))
    assert by_fraction == by_digest


def test_rollout_plans_did_not_change() -> None:
    small = [Target(f"dev-{i:03d}", ("x86", "arm", "jetson")[i % 3]) for i in range(60)]
    steps = plan_steps("r-7f3a", small, (5.0, 25.0, 100.0))
    assert steps[0] == ("dev-009", "dev-044", "dev-058")
    assert steps[1] == ("dev-004", "dev-010", "dev-015", "dev-017", "dev-021", "dev-022",
                        "dev-030", "dev-031", "dev-036", "dev-038", "dev-053", "dev-056")
    large = [Target(f"dev-{i:04d}", ("x86", "arm", "jetson")[i % 3]) for i in range(1000)]
    plan = plan_steps("r-7f3a", large, (5.0, 25.0, 100.0))
    assert hashlib.sha256(json.dumps(plan).encode()).hexdigest() == (
        "7ddcde4b6809fcf6bac17c631c7ff790a747a422504f1c6a63d484cca1c6a1a5")


def test_experiment_arms_did_not_change() -> None:
    arms = [device_arm("exp-1", f"dev-{i:03d}", SPLIT) for i in range(30)]
    assert "".join(arms) == "ccacacabcbabaaabcabaacacabbbab"
    sticky = [arm_for_key("exp-2", f"client:{i}", (("a", 0.9), ("b", 0.1))) for i in range(30)]
    assert [i for i, arm in enumerate(sticky) if arm == "b"] == [13, 14, 20]
    many = "".join(device_arm("exp-1", f"dev-{i:04d}", SPLIT) for i in range(1000))
    assert hashlib.sha256(many.encode()).hexdigest() == (
        "d34a3f11d41cd87af3b9f98bce56def6b9abff10a1a8808ed4432fec3fdd4898")

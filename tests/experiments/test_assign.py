"""Arm assignment: sticky, proportional to the split, and refusing splits that make no sense."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.assign import arm_for_key, check_split, device_arm, request_arm
from experiments.errors import InvalidExperimentData

SPLIT = (("a", 50.0), ("b", 50.0))


def test_device_arm_is_sticky_and_splits_in_proportion() -> None:
    arms = [device_arm("exp", f"dev-{i}", (("a", 20), ("b", 80))) for i in range(4000)]
    assert arms == [device_arm("exp", f"dev-{i}", (("a", 20), ("b", 80))) for i in range(4000)]
    assert abs(arms.count("a") / 4000 - 0.2) < 0.03


def test_experiments_split_independently() -> None:
    one = [device_arm("one", f"dev-{i}", SPLIT) for i in range(2000)]
    two = [device_arm("two", f"dev-{i}", SPLIT) for i in range(2000)]
    same = sum(x == y for x, y in zip(one, two, strict=True)) / 2000
    assert 0.45 < same < 0.55


def test_request_arm_random_without_key_and_sticky_with_one() -> None:
    rng = np.random.default_rng(0)
    drawn = [request_arm("exp", SPLIT, rng) for _ in range(2000)]
    assert 0.45 < drawn.count("a") / 2000 < 0.55
    keyed = {request_arm("exp", SPLIT, rng, client_key="user-7") for _ in range(50)}
    assert keyed == {arm_for_key("exp", "client:user-7", SPLIT)}


def test_zero_share_arm_is_never_chosen() -> None:
    assert {device_arm("exp", str(i), (("a", 0), ("b", 1))) for i in range(500)} == {"b"}


@given(st.lists(st.tuples(st.text(min_size=1, max_size=4),
                          st.floats(allow_nan=True, allow_infinity=True)), max_size=20))
def test_check_split_accepts_only_sensible_splits(split: list[tuple[str, float]]) -> None:
    try:
        checked = check_split(split)
    except InvalidExperimentData:
        return
    assert abs(sum(w for _, w in checked) - 1.0) < 1e-9
    assert all(w >= 0 for _, w in checked)
    assert arm_for_key("exp", "k", split) in {name for name, _ in checked}


def test_bad_split_says_what_to_do() -> None:
    with pytest.raises(InvalidExperimentData, match="--split 50,50"):
        check_split((("a", -1.0), ("b", 1.0)))
    with pytest.raises(InvalidExperimentData, match="must differ"):
        check_split((("a", 1.0), ("a", 1.0)))

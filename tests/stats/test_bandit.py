"""Thompson sampling and the arm summaries it runs on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stats.bandit import (
    ArmStats,
    posterior_means,
    probability_best,
    sample_means,
    thompson_choose,
)


@given(st.lists(st.floats(-10, 10), max_size=30), st.lists(st.floats(-10, 10), max_size=30))
def test_summaries_add_like_the_data(xs: list[float], ys: list[float]) -> None:
    def summary(values: list[float]) -> ArmStats:
        s = ArmStats()
        for v in values:
            s = s.add(v)
        return s
    merged = summary(xs) + summary(ys)
    both = summary(xs + ys)
    assert merged.n == both.n
    assert merged.total == pytest.approx(both.total, abs=1e-9)
    assert merged.total_sq == pytest.approx(both.total_sq, abs=1e-9)


@pytest.mark.parametrize("family", ["beta", "normal"])
def test_thompson_prefers_the_better_arm(family: str) -> None:
    rng = np.random.default_rng(0)
    arms = {"good": ArmStats(200, 140.0, 140.0), "bad": ArmStats(200, 60.0, 60.0)}
    picks = [thompson_choose(arms, rng, family) for _ in range(500)]  # type: ignore[arg-type]
    assert picks.count("good") > 490
    fresh = {"x": ArmStats(), "y": ArmStats()}
    picks = [thompson_choose(fresh, rng, family) for _ in range(1000)]  # type: ignore[arg-type]
    assert 400 < picks.count("x") < 600


def test_rewards_on_another_scale() -> None:
    rng = np.random.default_rng(1)
    arms = {"fast": ArmStats(100, -500.0, 2500.0), "slow": ArmStats(100, -2000.0, 40000.0)}
    best = probability_best(arms, rng, "normal", low=-50.0, high=0.0)
    assert best["fast"] > 0.99
    draws = sample_means(arms, rng, "beta", low=-50.0, high=0.0, draws=100)
    assert all(((d >= -50.0) & (d <= 0.0)).all() for d in draws.values())


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        ArmStats(-1)
    with pytest.raises(ValueError, match="finite"):
        ArmStats(1, float("nan"), 0.0)
    with pytest.raises(ValueError, match="unknown posterior family"):
        sample_means({"a": ArmStats()}, np.random.default_rng(0), "gamma")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one arm"):
        thompson_choose({}, np.random.default_rng(0))


@pytest.mark.parametrize("family", ["beta", "normal"])
def test_optimistic_draws_pass_over_the_best_known_arm_less_often(family: str) -> None:
    # The worse arm wins an optimistic draw only if its draw beats both the better arm's
    # draw and its mean: a subset of the plain draws it wins.
    arms = {"known": ArmStats(2000, 140.0, 140.0), "less": ArmStats(200, 10.0, 10.0)}
    means = posterior_means(arms, family)  # type: ignore[arg-type]
    assert means["known"] > means["less"]

    def wins(optimistic: bool) -> int:
        rng = np.random.default_rng(3)
        return sum(thompson_choose(arms, rng, family,  # type: ignore[arg-type]
                                   optimistic=optimistic) == "less" for _ in range(3000))

    plain, optimistic = wins(False), wins(True)
    assert 0 < optimistic < plain


def test_posterior_means_use_the_prior() -> None:
    fresh = {"a": ArmStats()}
    assert posterior_means(fresh, "beta", low=-1.0, high=3.0)["a"] == pytest.approx(1.0)
    seen = {"a": ArmStats(3, 1.0, 1.0)}
    assert posterior_means(seen, "beta")["a"] == pytest.approx(1.5 / 4.0)
    assert posterior_means(seen, "beta", beta_prior=1.0)["a"] == pytest.approx(2.0 / 5.0)
    assert posterior_means(seen, "normal")["a"] == pytest.approx(1.5 / 4.0)

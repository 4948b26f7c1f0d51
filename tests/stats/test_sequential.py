"""The A/B decision rule: valid however often it is read, and able to find a real winner."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stats.bandit import ArmStats
from stats.sequential import confidence_sequence, decide, half_width, mixture_rate

ALPHA = 0.05


def _peek_every_minute(rng: np.random.Generator, rates: tuple[float, float], runs: int,
                       looks: int, per_look: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative successes of two Bernoulli arms at each look: shape (runs, looks) each."""
    a = rng.binomial(per_look, rates[0], (runs, looks)).cumsum(axis=1)
    b = rng.binomial(per_look, rates[1], (runs, looks)).cumsum(axis=1)
    return a, b


def _ever_declared(a: np.ndarray, b: np.ndarray, per_look: int) -> np.ndarray:
    """For each run, whether the rule declared a winner at any look.

    The rule of :func:`decide` (each arm at alpha/2, a winner when the intervals separate),
    vectorised over runs and looks; ``test_vectorised_rule_matches_decide`` checks the two
    agree.
    """
    n = per_look * np.arange(1, a.shape[1] + 1)
    half = half_width(n, ALPHA / 2)
    mean_a, mean_b = a / n, b / n
    lo_a, hi_a = np.maximum(0, mean_a - half), np.minimum(1, mean_a + half)
    lo_b, hi_b = np.maximum(0, mean_b - half), np.minimum(1, mean_b + half)
    declared: np.ndarray = ((lo_a > hi_b) | (lo_b > hi_a)).any(axis=1)
    return declared


def test_vectorised_rule_matches_decide() -> None:
    rng = np.random.default_rng(3)
    a, b = _peek_every_minute(rng, (0.3, 0.5), 40, 30, 10)
    for run in range(40):
        declared = any(decide({
            "a": ArmStats(10 * (look + 1), float(a[run, look]), float(a[run, look])),
            "b": ArmStats(10 * (look + 1), float(b[run, look]), float(b[run, look]))},
            ALPHA).stop for look in range(30))
        assert declared == _ever_declared(a[run:run + 1], b[run:run + 1], 10)[0]


def test_false_winner_rate_at_most_alpha_with_a_look_every_minute() -> None:
    # 24 hours of looks, one a minute, 5 requests per arm between looks (7,200 per arm):
    # under no difference the rule may name a winner in at most 5% of experiments.
    rng = np.random.default_rng(0)
    runs, looks, per_look = 2000, 1440, 5
    for rate in (0.1, 0.5):
        a, b = _peek_every_minute(rng, (rate, rate), runs, looks, per_look)
        declared = _ever_declared(a, b, per_look)
        assert declared.mean() <= ALPHA, (rate, declared.mean())


def test_a_fixed_sample_z_test_read_every_minute_is_not_valid() -> None:
    # The same looks with a plain 95% z-test: the simulation can see an invalid rule.
    rng = np.random.default_rng(1)
    runs, looks, per_look = 300, 1440, 5
    a, b = _peek_every_minute(rng, (0.5, 0.5), runs, looks, per_look)
    n = per_look * np.arange(1, looks + 1)
    pooled = (a + b) / (2 * n)
    se = np.sqrt(2 * pooled * (1 - pooled) / n)
    z = np.abs(a - b) / n / np.where(se > 0, se, np.inf)
    assert (z > 1.96).any(axis=1).mean() > 3 * ALPHA


def test_finds_a_real_difference() -> None:
    rng = np.random.default_rng(2)
    a, b = _peek_every_minute(rng, (0.10, 0.15), 20, 400, 25)
    stopped = [next((look for look in range(400) if decide(
        {"a": ArmStats(25 * (look + 1), float(a[r, look]), float(a[r, look])),
         "b": ArmStats(25 * (look + 1), float(b[r, look]), float(b[r, look]))},
        ALPHA).winner == "b"), None) for r in range(20)]
    assert all(s is not None for s in stopped)


def test_lower_is_better_picks_the_smaller_mean() -> None:
    arms = {"fast": ArmStats(4000, 800.0, 800.0), "slow": ArmStats(4000, 2000.0, 2000.0)}
    assert decide(arms, ALPHA, higher_is_better=False).winner == "fast"
    assert decide(arms, ALPHA).winner == "slow"


def test_no_observations_give_the_whole_range() -> None:
    assert confidence_sequence(ArmStats(), 0.05, -1.0, 3.0) == (-1.0, 3.0)


@given(st.integers(1, 100_000), st.floats(0.0, 1.0), st.sampled_from([0.01, 0.05, 0.2]))
def test_interval_holds_the_mean_and_shrinks(n: int, share: float, alpha: float) -> None:
    total = share * n
    lo, hi = confidence_sequence(ArmStats(n, total, total), alpha)
    assert 0.0 <= lo <= total / n <= hi <= 1.0
    lo4, hi4 = confidence_sequence(ArmStats(4 * n, 4 * total, 4 * total), alpha)
    assert hi4 - lo4 <= hi - lo + 1e-12


def test_mixture_rate_solves_its_equation() -> None:
    x = mixture_rate(1, 0.025)
    assert x == pytest.approx(2 * math.log(40) + math.log1p(x))
    with pytest.raises(ValueError, match="planned_n"):
        mixture_rate(0, 0.05)


def test_decide_needs_two_arms() -> None:
    with pytest.raises(ValueError, match="two arms"):
        decide({"a": ArmStats()})

"""Always-valid decisions for A/B tests that the operator may look at as often as they like.

A fixed-sample test (a z-test at 95%) is valid only if it is read once, at a sample size
chosen in advance; read every minute, it declares a winner between two identical arms far
more often than 5% (``tests/stats/test_sequential.py`` measures it). This module gives
*confidence sequences* instead: intervals that hold the true mean at every sample size at
once with probability at least ``1 - alpha``, so stopping the first time they separate is a
valid decision however often, and whenever, they are read.

The sequence is Robbins' normal mixture for sub-Gaussian observations: rewards bounded in
``[low, high]`` are sub-Gaussian with ``sigma = (high - low) / 2`` (Hoeffding's lemma), and

    M_n = (1 + a n)^(-1/2) * exp(a S_n^2 / (2 sigma^2 (1 + a n))),   a = tau^2 sigma^2,

where ``S_n`` is the sum of ``reward - mean``, is a non-negative supermartingale under the
true mean; by Ville's inequality it exceeds ``1/alpha`` at *any* time with probability at
most ``alpha``. Solving ``M_n < 1/alpha`` for the mean gives the interval. It is exact for
any bounded reward (Bernoulli included), not an asymptotic approximation, and conservative
for rewards of small variance. ``a`` only sets at which sample size the interval is
tightest (``planned_n``); validity holds for every choice.

The A/B rule (:func:`decide`): each of K arms gets a sequence at ``alpha / K`` (a union
bound, so all K hold together with probability ``1 - alpha``); an arm is declared best when
its lower bound exceeds every other arm's upper bound. Under no difference a winner is
declared with probability at most ``alpha`` over the whole experiment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stats.bandit import ArmStats

__all__ = ["ArmInterval", "Decision", "confidence_sequence", "decide", "half_width",
           "mixture_rate"]


@lru_cache(maxsize=64)
def mixture_rate(planned_n: int, alpha: float) -> float:
    """The mixture's ``a = tau^2 sigma^2`` that makes the interval tightest at ``planned_n``.

    Minimising the half-width over ``a`` at a fixed ``n`` gives ``x = a n`` as the root of
    ``x = 2 log(1/alpha) + log(1 + x)``, found by fixed-point iteration (it converges in a few
    steps because the right side grows only logarithmically).
    """
    if planned_n < 1:
        raise ValueError(f"planned_n must be at least 1, not {planned_n}")
    _check_alpha(alpha)
    x = 2.0 * math.log(1.0 / alpha)
    for _ in range(50):
        x = 2.0 * math.log(1.0 / alpha) + math.log1p(x)
    return x / planned_n


def confidence_sequence(stats: ArmStats, alpha: float, low: float = 0.0, high: float = 1.0,
                        planned_n: int = 1000) -> tuple[float, float]:
    """An interval that holds the arm's mean reward at every sample size with prob. 1-alpha.

    ``stats`` are the arm's sufficient statistics of rewards in ``[low, high]``; ``(low,
    high)`` itself with no observations.
    """
    if stats.n == 0:
        _check(alpha, low, high)
        return low, high
    half = float(half_width(np.asarray(stats.n), alpha, low, high, planned_n))
    mean = stats.mean
    return max(low, mean - half), min(high, mean + half)


def half_width(n: np.ndarray, alpha: float, low: float = 0.0, high: float = 1.0,
               planned_n: int = 1000) -> np.ndarray:
    """The interval's half-width around the mean after ``n`` (>= 1) observations, elementwise.

    Vectorised so that simulations of many experiments and looks stay fast.
    """
    _check(alpha, low, high)
    sigma2 = ((high - low) / 2.0) ** 2
    a = mixture_rate(planned_n, alpha)
    count = np.asarray(n, dtype=np.float64)
    # |S_n| < sqrt(2 sigma^2 (1 + a n) / a * log(sqrt(1 + a n) / alpha)), divided by n.
    width: np.ndarray = np.sqrt(2.0 * sigma2 * (1.0 + a * count) / a
                                * (math.log(1.0 / alpha) + 0.5 * np.log1p(a * count))) / count
    return width


@dataclass(frozen=True)
class ArmInterval:
    """One arm as the status shows it: observations, mean and its always-valid interval."""

    arm: str
    n: int
    mean: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Decision:
    """The rule's verdict now: ``winner`` is None until one arm's interval clears the rest."""

    arms: tuple[ArmInterval, ...]
    winner: str | None
    alpha: float

    @property
    def stop(self) -> bool:
        """Whether the experiment may stop with a winner (the stopping rule)."""
        return self.winner is not None


def decide(arms: Mapping[str, ArmStats], alpha: float = 0.05, *, low: float = 0.0,
           high: float = 1.0, planned_n: int = 1000, higher_is_better: bool = True) -> Decision:
    """Per-arm always-valid intervals at ``alpha / K`` and the winner, if one is clear.

    With ``higher_is_better`` False (latency, errors) the arm whose *upper* bound is below
    every other arm's lower bound wins.
    """
    if len(arms) < 2:
        raise ValueError(f"a decision needs at least two arms, not {len(arms)}")
    each = alpha / len(arms)
    rows = tuple(ArmInterval(name, s.n, s.mean,
                             *confidence_sequence(s, each, low, high, planned_n))
                 for name, s in sorted(arms.items()))
    winner = None
    for row in rows:
        others = [r for r in rows if r is not row]
        if higher_is_better and all(row.lower > r.upper for r in others):
            winner = row.arm
        if not higher_is_better and all(row.upper < r.lower for r in others):
            winner = row.arm
    return Decision(rows, winner, alpha)


def _check(alpha: float, low: float, high: float) -> None:
    _check_alpha(alpha)
    if not high > low:
        raise ValueError(f"reward bounds need low < high, not [{low}, {high}]")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")

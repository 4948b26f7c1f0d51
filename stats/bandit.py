"""Per-arm sufficient statistics and Thompson sampling over K arms.

An arm's rewards are summarised by ``(n, total, total_sq)``: the count, the sum and the sum
of squares. The summary adds (two devices' counts, or two intervals', are their sum), which
is what lets a fleet merge what its devices learnt (``experiments/posterior.py``), and it is
enough for both posteriors used here:

- ``beta``: Beta-Bernoulli, for rewards in ``[low, high]`` rescaled to ``[0, 1]``; a reward
  ``r`` adds ``r`` to the successes and ``1 - r`` to the failures (the fractional update of
  Agrawal and Goyal's bounded-reward Thompson sampling), so 0/1 rewards are the textbook case.
  The prior is Jeffreys' Beta(1/2, 1/2), not the uniform Beta(1, 1): with click-like rates
  of a few percent, the uniform prior's one pseudo-success is worth some twenty real
  observations and makes every little-tried arm look better than it is, which costs
  exploration the data do not call for (docs/experiments.md, "Multi-armed bandits").
  Thompson sampling keeps its optimal regret order with either prior (Kaufmann et al. 2012
  for the uniform, Korda et al. 2013 for Jeffreys').
- ``normal``: a Normal posterior on the mean, for bounded rewards whose variance is far from
  the Bernoulli one (a latency-derived score): one pseudo-observation at the range's middle
  with the range's largest variance, then the sample mean and variance.

Thompson sampling draws one plausible mean per arm from its posterior and serves the arm with
the best draw: arms that are clearly worse are drawn rarely, uncertain ones still get tried.
Draws below an arm's posterior mean count as the mean (optimistic sampling): with arms whose
rates are close, plain sampling keeps passing over the best-known arm whenever its own draw
comes out low, a cost the data do not call for (docs/experiments.md, "Multi-armed bandits").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["BETA_PRIOR", "ArmStats", "Family", "posterior_means", "probability_best",
           "sample_means", "thompson_choose"]

Family = Literal["beta", "normal"]

#: Jeffreys' prior for the Beta posterior: half a success and half a failure.
BETA_PRIOR = 0.5


@dataclass(frozen=True)
class ArmStats:
    """Sufficient statistics of one arm's rewards; ``a + b`` merges two summaries."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"an arm's count must be a non-negative integer, not {self.n!r}")
        if not (math.isfinite(self.total) and math.isfinite(self.total_sq)
                and self.total_sq >= 0.0):
            raise ValueError(f"an arm's sums must be finite (sum of squares >= 0), not "
                             f"{self.total!r}, {self.total_sq!r}")

    @property
    def mean(self) -> float:
        """The mean reward, 0.0 before any observation."""
        return self.total / self.n if self.n else 0.0

    def add(self, reward: float) -> ArmStats:
        """These statistics with one more reward."""
        return ArmStats(self.n + 1, self.total + reward, self.total_sq + reward * reward)

    def __add__(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.n + other.n, self.total + other.total,
                        self.total_sq + other.total_sq)


def sample_means(arms: Mapping[str, ArmStats], rng: np.random.Generator, family: Family,
                 *, low: float = 0.0, high: float = 1.0, draws: int = 1,
                 beta_prior: float = BETA_PRIOR) -> dict[str, np.ndarray]:
    """``draws`` samples of each arm's mean from its posterior, on the reward's own scale.

    ``beta_prior``: the Beta prior's pseudo-successes and pseudo-failures (1.0 is the
    uniform prior; the benchmark compares it)."""
    out: dict[str, np.ndarray] = {}
    for name, s in arms.items():
        if family == "beta":
            a, b = _beta(s, low, high, beta_prior)
            out[name] = low + (high - low) * rng.beta(a, b, draws)
        else:
            mean, sd = _normal(s, low, high, family)
            out[name] = rng.normal(mean, sd, draws)
    return out


def posterior_means(arms: Mapping[str, ArmStats], family: Family, *, low: float = 0.0,
                    high: float = 1.0, beta_prior: float = BETA_PRIOR) -> dict[str, float]:
    """Each arm's posterior mean, on the reward's own scale."""
    out: dict[str, float] = {}
    for name, s in arms.items():
        if family == "beta":
            a, b = _beta(s, low, high, beta_prior)
            out[name] = low + (high - low) * a / (a + b)
        else:
            out[name] = _normal(s, low, high, family)[0]
    return out


def _beta(s: ArmStats, low: float, high: float, prior: float) -> tuple[float, float]:
    """The Beta posterior's parameters for rewards rescaled from ``[low, high]``."""
    if not high > low:
        raise ValueError(f"reward bounds need low < high, not [{low}, {high}]")
    # Clamped: rewards outside the bounds must not make a Beta parameter negative.
    successes = min(max((s.total - s.n * low) / (high - low), 0.0), float(s.n))
    return prior + successes, prior + s.n - successes


def _normal(s: ArmStats, low: float, high: float, family: str) -> tuple[float, float]:
    """The Normal posterior's mean and standard deviation."""
    if family != "normal":
        raise ValueError(f"unknown posterior family {family!r}; use 'beta' or 'normal'")
    if not high > low:
        raise ValueError(f"reward bounds need low < high, not [{low}, {high}]")
    mid, prior_var = (low + high) / 2.0, ((high - low) / 2.0) ** 2
    squares = max(s.total_sq - s.total * s.total / s.n, 0.0) if s.n else 0.0
    count = s.n + 1
    variance = (squares + prior_var) / count
    return (s.total + mid) / count, math.sqrt(variance / count)


def thompson_choose(arms: Mapping[str, ArmStats], rng: np.random.Generator,
                    family: Family = "beta", low: float = 0.0, high: float = 1.0, *,
                    beta_prior: float = BETA_PRIOR, optimistic: bool = True) -> str:
    """The arm to serve next: the one whose posterior draw is highest (ties: at random).

    ``optimistic`` (the default) raises a draw below its arm's posterior mean to the mean
    (optimistic Bayesian sampling, May et al. 2012): a draw may still favour an uncertain
    arm, but no arm is passed over because of an unluckily low draw of its own.
    """
    if not arms:
        raise ValueError("Thompson sampling needs at least one arm")
    draws = {name: float(d[0]) for name, d in sample_means(
        arms, rng, family, low=low, high=high, beta_prior=beta_prior).items()}
    if optimistic:
        means = posterior_means(arms, family, low=low, high=high, beta_prior=beta_prior)
        draws = {name: max(d, means[name]) for name, d in draws.items()}
    best = max(draws.values())
    # Ties are common once draws are raised to equal means (arms not tried yet): a fixed
    # order would hand every tie to the same arm.
    tied = sorted(name for name, d in draws.items() if d == best)
    return tied[0] if len(tied) == 1 else tied[int(rng.integers(len(tied)))]


def probability_best(arms: Mapping[str, ArmStats], rng: np.random.Generator,
                     family: Family = "beta", *, low: float = 0.0, high: float = 1.0,
                     draws: int = 4000) -> dict[str, float]:
    """Each arm's posterior probability of having the highest mean (Monte Carlo)."""
    if not arms:
        return {}
    names = sorted(arms)
    samples = sample_means(arms, rng, family, low=low, high=high, draws=draws)
    best = np.argmax(np.stack([samples[n] for n in names]), axis=0)
    return {name: float(np.mean(best == i)) for i, name in enumerate(names)}

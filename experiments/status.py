"""What ``fleet experiment status`` shows for one experiment, computed from its arm sums.

Per arm: observations, mean reward, the always-valid interval (``stats.sequential``), and
the posterior probability of being best (``stats.bandit``, informative only: the decision
is the interval rule's). The verdict is ``running`` until an arm's interval clears the
others, then ``winner``; the operator may read it at any moment without spending the
error rate, which stays at most ``alpha`` over the experiment's whole life.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from stats.bandit import ArmStats, Family, probability_best
from stats.sequential import decide

__all__ = ["StatusOptions", "experiment_status"]


@dataclass(frozen=True)
class StatusOptions:
    """How rewards are read: their range, direction, the error level, the posterior."""

    low: float = 0.0
    high: float = 1.0
    higher_is_better: bool = True
    alpha: float = 0.05
    family: Family = "beta"


def experiment_status(name: str, arms: Mapping[str, ArmStats],
                      options: StatusOptions = StatusOptions(), seed: int = 0) -> dict[str, Any]:
    """The status as JSON-ready data (the CLI prints it as a table or, with --json, as is).

    ``seed`` fixes the Monte Carlo draws so that two reads of the same sums agree.
    """
    decision = decide(arms, options.alpha, low=options.low, high=options.high,
                      higher_is_better=options.higher_is_better)
    ranked, low, high = arms, options.low, options.high
    if not options.higher_is_better:
        # probability_best ranks high means first: rank the negated rewards instead.
        ranked = {a: ArmStats(s.n, -s.total, s.total_sq) for a, s in arms.items()}
        low, high = -options.high, -options.low
    best = probability_best(ranked, np.random.default_rng(seed), options.family,
                            low=low, high=high)
    return {
        "experiment": name,
        "verdict": "winner" if decision.stop else "running",
        "winner": decision.winner,
        "alpha": options.alpha,
        "rule": "always-valid confidence sequences (normal mixture, bounded rewards), "
                "each arm at alpha/K; a winner when its interval clears every other arm's",
        "arms": [{"arm": r.arm, "n": r.n, "mean": r.mean, "lower": r.lower, "upper": r.upper,
                  "probability_best": best[r.arm]} for r in decision.arms],
    }

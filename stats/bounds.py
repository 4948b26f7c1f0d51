"""Confidence bounds on a rate observed a few times.

A rollout gate that compared raw rates would halt on 1 failed install out of 3 devices
(33%) and pass 0 of 2. The Wilson score interval says what the data can support: with 1
failure in 3 the failure rate is at most 0.75 (one-sided, 95%), with 0 in 2 at most 0.57,
and with 1 in 100 at most 0.044: the bound closes in on the true rate as devices report.
Gates compare a bound with their threshold, so a decision made with little data is a
cautious one in the direction the operator chose.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["wilson_interval", "wilson_lower", "wilson_upper"]


def wilson_interval(events: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval for the rate ``events / trials``.

    ``(0.0, 1.0)`` with no trials: nothing is known. Raises ValueError for counts that do
    not make a rate or a confidence outside (0, 1).
    """
    _check(events, trials, confidence)
    return _wilson(events, trials, NormalDist().inv_cdf(0.5 + confidence / 2))


def wilson_upper(events: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided upper bound: the rate is at most this with ``confidence``."""
    _check(events, trials, confidence)
    return _wilson(events, trials, NormalDist().inv_cdf(confidence))[1]


def wilson_lower(events: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided lower bound: the rate is at least this with ``confidence``."""
    _check(events, trials, confidence)
    return _wilson(events, trials, NormalDist().inv_cdf(confidence))[0]


def _wilson(events: int, trials: int, z: float) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = events / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    # Clamp rounding only: mathematically the interval lies within [0, 1] and holds p.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def _check(events: int, trials: int, confidence: float) -> None:
    if not (isinstance(events, int) and isinstance(trials, int) and 0 <= events <= trials):
        raise ValueError(f"need 0 <= events <= trials as integers, not {events}/{trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")

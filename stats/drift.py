"""How far live data has moved from a baseline, from two histograms on the same bins.

- :func:`psi`, the population stability index: ``sum((a - e) * ln(a / e))`` over bucket
  shares. Symmetric, 0 for identical shares; the usual reading is < 0.1 stable,
  0.1-0.25 a moderate shift, > 0.25 a major one (:data:`PSI_MODERATE`, :data:`PSI_MAJOR`).
- :func:`ks_distance`, the Kolmogorov-Smirnov statistic on binned data: the largest gap
  between the two cumulative shares, in [0, 1]. Insensitive to empty buckets, where PSI
  needs a floor.
"""

from __future__ import annotations

import numpy as np

from .histogram import Histogram, HistogramError

__all__ = ["PSI_MAJOR", "PSI_MODERATE", "ks_distance", "psi"]

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
#: Share given to an empty bucket so that PSI stays finite; 1e-4 is the customary floor.
_FLOOR = 1e-4


def psi(expected: Histogram, actual: Histogram) -> float:
    """Population stability index of ``actual`` against ``expected`` (NaNs not counted).

    0.0 when either side has no values: no evidence of a shift is not a shift.
    """
    e, a = _shares(expected, actual)
    if e is None or a is None:
        return 0.0
    e, a = np.maximum(e, _FLOOR), np.maximum(a, _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_distance(expected: Histogram, actual: Histogram) -> float:
    """Largest gap between the cumulative bucket shares, in [0, 1]; 0.0 with no data."""
    e, a = _shares(expected, actual)
    if e is None or a is None:
        return 0.0
    return float(np.max(np.abs(np.cumsum(e) - np.cumsum(a))))


def _shares(expected: Histogram, actual: Histogram) -> tuple[np.ndarray | None,
                                                              np.ndarray | None]:
    if not np.array_equal(expected.edges, actual.edges):
        raise HistogramError("drift needs both histograms on the same edges (the baseline's)")
    e = expected.fractions() if expected.counts.sum() else None
    a = actual.fractions() if actual.counts.sum() else None
    return e, a

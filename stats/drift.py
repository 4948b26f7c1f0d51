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

__all__ = ["PSI_MAJOR", "PSI_MODERATE", "ks_counts", "ks_distance", "psi", "psi_counts"]

PSI_MODERATE = 0.1
PSI_MAJOR = 0.25
#: Share given to an empty bucket so that PSI stays finite; 1e-4 is the customary floor.
_FLOOR = 1e-4


def psi(expected: Histogram, actual: Histogram) -> float:
    """Population stability index of ``actual`` against ``expected`` (NaNs not counted).

    0.0 when either side has no values: no evidence of a shift is not a shift.
    """
    _same_edges(expected, actual)
    return psi_counts(expected.counts, actual.counts)


def ks_distance(expected: Histogram, actual: Histogram) -> float:
    """Largest gap between the cumulative bucket shares, in [0, 1]; 0.0 with no data."""
    _same_edges(expected, actual)
    return ks_counts(expected.counts, actual.counts)


def psi_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    """:func:`psi` of two count arrays over the same bins (0.0 when either is empty).
    Raises HistogramError when their lengths differ."""
    e, a = _shares(expected, actual)
    if e is None or a is None:
        return 0.0
    e, a = np.maximum(e, _FLOOR), np.maximum(a, _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    """:func:`ks_distance` of two count arrays over the same bins (0.0 when either is
    empty). Raises HistogramError when their lengths differ."""
    e, a = _shares(expected, actual)
    if e is None or a is None:
        return 0.0
    return float(np.max(np.abs(np.cumsum(e) - np.cumsum(a))))


def _same_edges(expected: Histogram, actual: Histogram) -> None:
    if not np.array_equal(expected.edges, actual.edges):
        raise HistogramError("drift needs both histograms on the same edges (the baseline's)")


def _shares(expected: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray | None,
                                                                np.ndarray | None]:
    if len(expected) != len(actual):
        raise HistogramError(f"drift needs counts over the same bins, got {len(expected)} "
                             f"and {len(actual)}")
    e_total, a_total = float(np.sum(expected)), float(np.sum(actual))
    e = np.asarray(expected, dtype=np.float64) / e_total if e_total else None
    a = np.asarray(actual, dtype=np.float64) / a_total if a_total else None
    return e, a

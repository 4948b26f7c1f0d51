"""Fixed-bin histograms: constant memory, mergeable, with a bounded JSON form.

A :class:`Histogram` counts values into the bins between ``edges`` plus an underflow and an
overflow bucket, and counts NaNs apart (a model fed NaNs is a data-quality problem worth
seeing, not a value to bin). Two histograms on the same edges merge by adding counts, so a
device can keep one per model version and window, and the server can add up a fleet.

The edges come from a baseline (the compressor's calibration data, :func:`quantile_edges`)
so live data is compared with the baseline bucket by bucket (:mod:`stats.drift`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_BINS", "Histogram", "HistogramError", "RangeHistogram", "quantile_edges",
           "range_counts"]

#: At most this many bins between the edges: bounds what a device reports and stores.
MAX_BINS = 256


class HistogramError(ValueError):
    """Edges or counts that do not make a histogram (the message says which and why)."""


@dataclass
class Histogram:
    """Counts over ``edges``: ``counts[0]`` below ``edges[0]``, ``counts[i]`` in
    ``[edges[i-1], edges[i])``, ``counts[-1]`` at or above ``edges[-1]``; NaNs in ``nan``."""

    edges: np.ndarray
    counts: np.ndarray
    nan: int = 0

    @classmethod
    def empty(cls, edges: Sequence[float] | np.ndarray) -> Histogram:
        """A histogram with no values yet; raises HistogramError for unusable edges."""
        checked = _check_edges(edges)
        return cls(checked, np.zeros(len(checked) + 1, dtype=np.int64))

    @property
    def total(self) -> int:
        """How many values were counted, NaNs included."""
        return int(self.counts.sum()) + self.nan

    def add(self, values: np.ndarray) -> None:
        """Count every element of ``values`` (any shape, any real dtype)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        nans = np.isnan(flat)
        count = int(nans.sum())
        if count:
            self.nan += count
            flat = flat[~nans]
        buckets = np.searchsorted(self.edges, flat, side="right")
        self.counts += np.bincount(buckets, minlength=len(self.counts))

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts; both must have the same edges."""
        if not np.array_equal(self.edges, other.edges):
            raise HistogramError("cannot merge histograms with different edges; compare "
                                 "data binned on the same baseline")
        self.counts += other.counts
        self.nan += other.nan

    def fractions(self) -> np.ndarray:
        """Each bucket's share of the non-NaN values (zeros if there are none)."""
        counted = self.counts.sum()
        if counted == 0:
            return np.zeros(len(self.counts))
        shares: np.ndarray = self.counts / counted
        return shares

    def copy(self) -> Histogram:
        """An independent histogram with the same edges and counts."""
        return Histogram(self.edges.copy(), self.counts.copy(), self.nan)

    def to_json(self) -> dict[str, Any]:
        """``{"edges": [...], "counts": [...], "nan": n}``, read back by :meth:`from_json`."""
        return {"edges": [float(e) for e in self.edges],
                "counts": [int(c) for c in self.counts], "nan": self.nan}

    @classmethod
    def from_json(cls, obj: object) -> Histogram:
        """Parse and validate a histogram sent by someone else (a device, a bundle).

        Raises HistogramError naming what is wrong: not an object, too many bins, edges not
        finite and increasing, counts of the wrong length or not non-negative integers.
        """
        if not isinstance(obj, Mapping):
            raise HistogramError("a histogram must be an object with edges, counts and nan")
        edges = _check_edges(obj.get("edges"))
        counts = obj.get("counts")
        if (not isinstance(counts, list) or len(counts) != len(edges) + 1
                or not all(_count(c) for c in counts)):
            raise HistogramError(f"histogram counts must be {len(edges) + 1} non-negative "
                                 "integers (one per bin plus under- and overflow)")
        nan = obj.get("nan", 0)
        if not _count(nan):
            raise HistogramError("histogram nan must be a non-negative integer")
        return cls(edges, np.array(counts, dtype=np.int64), int(nan))


def range_counts(values: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins over ``[low, high]``, values outside in
    the end bins and NaNs not counted: the layout of the compressor's drift baseline.

    Equal bins are found by arithmetic rather than a search, so this costs a few passes
    over the values (cheap enough for a sampled request). Raises HistogramError for an
    empty range or a bin count outside 1 to :data:`MAX_BINS`.
    """
    if not 1 <= bins <= MAX_BINS:
        raise HistogramError(f"bins must be 1 to {MAX_BINS}, not {bins}")
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise HistogramError(f"a histogram range must be finite with high > low, not "
                             f"[{low}, {high}]")
    scaled = (np.asarray(values, dtype=np.float64).ravel() - low) * (bins / (high - low))
    np.clip(scaled, 0, bins - 1, out=scaled)
    if np.isnan(scaled.sum()):
        scaled = scaled[~np.isnan(scaled)]
    counts: np.ndarray = np.bincount(scaled.astype(np.intp), minlength=bins)
    return counts


@dataclass
class RangeHistogram:
    """A streaming :func:`range_counts` histogram: constant memory whatever it counts."""

    low: float
    high: float
    counts: np.ndarray

    @classmethod
    def empty(cls, low: float, high: float, bins: int) -> RangeHistogram:
        """No values yet; raises HistogramError for an unusable range or bin count."""
        range_counts(np.zeros(0), low, high, bins)  # checks the arguments
        return cls(float(low), float(high), np.zeros(bins, dtype=np.int64))

    def add(self, values: np.ndarray) -> None:
        """Count every element of ``values``."""
        self.counts += range_counts(values, self.low, self.high, len(self.counts))

    def take(self) -> np.ndarray:
        """The counts so far, and start again from zero (a per-interval reading)."""
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        return counts


def quantile_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """Edges that split ``values`` into about ``bins`` equally full bins.

    Quantile bins put resolution where the data is, which keeps PSI meaningful for skewed
    inputs (pixel intensities, confidences near 1). Repeated quantiles collapse, so a
    feature with few distinct values gets fewer bins; constant data gets one bin around it.
    """
    if not 1 <= bins <= MAX_BINS:
        raise HistogramError(f"bins must be 1 to {MAX_BINS}, not {bins}")
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise HistogramError("no finite values to take bin edges from")
    edges = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return edges


def _check_edges(edges: object) -> np.ndarray:
    if not isinstance(edges, (list, tuple, np.ndarray)) or not 2 <= len(edges) <= MAX_BINS + 1:
        raise HistogramError(f"histogram edges must be a list of 2 to {MAX_BINS + 1} numbers")
    if not all(isinstance(e, (int, float, np.floating, np.integer)) and not isinstance(e, bool)
               and math.isfinite(float(e)) for e in edges):
        raise HistogramError("histogram edges must be finite numbers")
    array = np.array(edges, dtype=np.float64)
    if not np.all(np.diff(array) > 0):
        raise HistogramError("histogram edges must be strictly increasing")
    return array


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

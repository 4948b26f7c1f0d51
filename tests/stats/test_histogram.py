"""stats.histogram: streaming counts, merging and the JSON form devices send."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stats.histogram import (
    MAX_BINS,
    Histogram,
    HistogramError,
    RangeHistogram,
    quantile_edges,
    range_counts,
)

_values = hnp.arrays(np.float64, st.integers(0, 200),
                     elements=st.floats(allow_nan=True, allow_infinity=True))
_edges = st.lists(st.floats(-100, 100), min_size=2, max_size=12, unique=True).map(sorted)


def test_buckets_and_nan() -> None:
    h = Histogram.empty([0.0, 1.0, 2.0])
    h.add(np.array([-5.0, 0.0, 0.5, 1.0, 1.99, 2.0, 7.0, np.nan, np.inf, -np.inf]))
    # under | [0,1) | [1,2) | over; inf counts as over, -inf as under
    assert h.counts.tolist() == [2, 2, 2, 3]
    assert h.nan == 1
    assert h.total == 10


@given(_edges, _values, _values)
def test_adding_in_parts_equals_adding_at_once(edges: list[float], a: np.ndarray,
                                               b: np.ndarray) -> None:
    whole, first, second = (Histogram.empty(edges) for _ in range(3))
    whole.add(np.concatenate([a, b]))
    first.add(a)
    second.add(b)
    first.merge(second)
    assert first.counts.tolist() == whole.counts.tolist()
    assert first.nan == whole.nan
    assert whole.total == len(a) + len(b)


@given(_edges, _values)
def test_json_round_trip(edges: list[float], values: np.ndarray) -> None:
    h = Histogram.empty(edges)
    h.add(values)
    back = Histogram.from_json(h.to_json())
    assert back.edges.tolist() == h.edges.tolist()
    assert back.counts.tolist() == h.counts.tolist()
    assert back.nan == h.nan


@pytest.mark.parametrize(("obj", "message"), [
    ([], "must be an object"),
    ({"edges": [1.0], "counts": [0, 0]}, "2 to"),
    ({"edges": list(range(MAX_BINS + 2)), "counts": [0] * (MAX_BINS + 3)}, "2 to"),
    ({"edges": [0.0, float("nan")], "counts": [0, 0, 0]}, "finite"),
    ({"edges": [1.0, 0.0], "counts": [0, 0, 0]}, "strictly increasing"),
    ({"edges": [0.0, True], "counts": [0, 0, 0]}, "finite numbers"),
    ({"edges": [0.0, 1.0], "counts": [0, 0]}, "3 non-negative"),
    ({"edges": [0.0, 1.0], "counts": [0, -1, 0]}, "non-negative"),
    ({"edges": [0.0, 1.0], "counts": [0, 1.5, 0]}, "non-negative"),
    ({"edges": [0.0, 1.0], "counts": [0, 0, 0], "nan": -1}, "nan"),
])
def test_from_json_refuses(obj: object, message: str) -> None:
    with pytest.raises(HistogramError, match=message):
        Histogram.from_json(obj)


def test_merge_needs_the_same_edges() -> None:
    with pytest.raises(HistogramError, match="different edges"):
        Histogram.empty([0, 1]).merge(Histogram.empty([0, 2]))


def test_quantile_edges_split_evenly_and_handle_constant_data() -> None:
    values = np.random.default_rng(0).exponential(size=10_000)
    h = Histogram.empty(quantile_edges(values, 10))
    h.add(values)
    inner = h.counts[1:-1]
    assert len(inner) == 10
    assert inner.min() >= 900  # about 1,000 each
    assert inner.max() <= 1100
    assert quantile_edges(np.full(50, 3.0), 8).tolist() == [2.5, 3.5]
    with pytest.raises(HistogramError, match="no finite values"):
        quantile_edges(np.array([np.nan]))
    with pytest.raises(HistogramError, match="bins must be"):
        quantile_edges(values, 0)


_finite = hnp.arrays(np.float64, st.integers(0, 200),
                     elements=st.floats(-1e6, 1e6) | st.just(float("nan")))


@given(_finite, st.floats(-100, 100), st.floats(0.01, 100), st.integers(1, 64))
def test_range_counts_count_every_number_once(values: np.ndarray, low: float, width: float,
                                             bins: int) -> None:
    counts = range_counts(values, low, low + width, bins)
    assert len(counts) == bins
    assert counts.sum() == np.count_nonzero(~np.isnan(values))
    # Inside the range the bins agree with numpy's (whose last bin includes the top edge).
    inside = values[(values >= low) & (values <= low + width)]
    expected = np.histogram(inside, bins=bins, range=(low, low + width))[0]
    assert np.abs(range_counts(inside, low, low + width, bins) - expected).sum() <= 2 * bins


@given(_finite, _finite)
def test_range_histogram_streams(a: np.ndarray, b: np.ndarray) -> None:
    h = RangeHistogram.empty(-10.0, 10.0, 8)
    h.add(a)
    h.add(b)
    whole = range_counts(np.concatenate([a, b]), -10.0, 10.0, 8)
    assert h.take().tolist() == whole.tolist()
    assert h.counts.sum() == 0


def test_range_counts_put_outliers_in_the_end_bins() -> None:
    counts = range_counts(np.array([-5.0, 0.0, 0.49, 0.5, 1.0, 9.0, np.inf, np.nan]), 0.0, 1.0, 2)
    assert counts.tolist() == [3, 4]
    with pytest.raises(HistogramError, match="high > low"):
        range_counts(np.zeros(3), 1.0, 1.0, 4)

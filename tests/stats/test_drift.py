"""stats.drift: PSI and binned KS between a baseline and live data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stats.drift import PSI_MAJOR, PSI_MODERATE, ks_counts, ks_distance, psi, psi_counts
from stats.histogram import Histogram, HistogramError, quantile_edges

_counts = st.lists(st.integers(0, 1000), min_size=5, max_size=5)


def _hist(counts: list[int]) -> Histogram:
    h = Histogram.empty([0.0, 1.0, 2.0, 3.0])
    h.counts[:] = counts
    return h


@given(_counts, _counts)
def test_properties(a: list[int], b: list[int]) -> None:
    ha, hb = _hist(a), _hist(b)
    assert psi(ha, ha) == pytest.approx(0.0, abs=1e-12)
    assert psi(ha, hb) >= 0.0
    assert psi(ha, hb) == pytest.approx(psi(hb, ha))
    assert 0.0 <= ks_distance(ha, hb) <= 1.0 + 1e-12
    assert ks_distance(ha, hb) == pytest.approx(ks_distance(hb, ha))


def test_no_data_is_no_drift() -> None:
    assert psi(_hist([0] * 5), _hist([1, 2, 3, 4, 5])) == 0.0
    assert ks_distance(_hist([1, 2, 3, 4, 5]), _hist([0] * 5)) == 0.0


def test_readings_on_real_shifts() -> None:
    rng = np.random.default_rng(1)
    baseline_values = rng.normal(size=20_000)
    edges = quantile_edges(baseline_values, 10)
    baseline = Histogram.empty(edges)
    baseline.add(baseline_values)

    def live(values: np.ndarray) -> Histogram:
        h = Histogram.empty(edges)
        h.add(values)
        return h

    same = live(rng.normal(size=5_000))
    small = live(rng.normal(0.4, 1.0, size=5_000))
    inverted = live(-3.0 * rng.normal(size=5_000) + 2.0)
    assert psi(baseline, same) < PSI_MODERATE
    assert PSI_MODERATE < psi(baseline, small) < PSI_MAJOR
    assert psi(baseline, inverted) > PSI_MAJOR
    assert ks_distance(baseline, same) < 0.05 < ks_distance(baseline, small)


def test_edges_must_match() -> None:
    with pytest.raises(HistogramError, match="same edges"):
        psi(Histogram.empty([0, 1]), Histogram.empty([0, 2]))


@given(_counts, _counts)
def test_counts_forms_match_the_histogram_forms(a: list[int], b: list[int]) -> None:
    assert psi_counts(np.array(a), np.array(b)) == psi(_hist(a), _hist(b))
    assert ks_counts(np.array(a), np.array(b)) == ks_distance(_hist(a), _hist(b))


def test_counts_must_have_one_length() -> None:
    with pytest.raises(HistogramError, match="same bins"):
        psi_counts(np.ones(3), np.ones(4))

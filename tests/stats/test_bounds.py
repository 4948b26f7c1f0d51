"""stats.bounds: Wilson bounds on rates from few observations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stats.bounds import wilson_interval, wilson_lower, wilson_upper


@st.composite
def _counts(draw: st.DrawFn) -> tuple[int, int]:
    trials = draw(st.integers(0, 10_000))
    return draw(st.integers(0, trials)), trials


@given(_counts(), st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_bounds_hold_the_rate(counts: tuple[int, int], confidence: float) -> None:
    events, trials = counts
    low, high = wilson_interval(events, trials, confidence)
    assert 0.0 <= low <= high <= 1.0
    if trials:
        assert low <= events / trials <= high
        assert wilson_lower(events, trials, confidence) <= events / trials
        assert wilson_upper(events, trials, confidence) >= events / trials


@given(_counts())
def test_more_events_never_lower_the_upper_bound(counts: tuple[int, int]) -> None:
    events, trials = counts
    if events < trials:
        assert wilson_upper(events + 1, trials) >= wilson_upper(events, trials)


def test_known_values() -> None:
    # One failure in three devices is weak evidence, one in a hundred is not.
    assert wilson_upper(1, 3) == pytest.approx(0.7465, abs=1e-4)
    assert wilson_upper(0, 2) == pytest.approx(0.5750, abs=1e-4)
    assert wilson_upper(1, 100) == pytest.approx(0.0436, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # The textbook two-sided 95% interval for 1/3.
    low, high = wilson_interval(1, 3)
    assert low == pytest.approx(0.0615, abs=1e-4)
    assert high == pytest.approx(0.7923, abs=1e-4)


@pytest.mark.parametrize(("events", "trials", "confidence"),
                         [(-1, 3, 0.95), (4, 3, 0.95), (1, 3, 1.0), (1, 3, 0.0)])
def test_refuses(events: int, trials: int, confidence: float) -> None:
    with pytest.raises(ValueError, match=r"events <= trials|confidence"):
        wilson_interval(events, trials, confidence)

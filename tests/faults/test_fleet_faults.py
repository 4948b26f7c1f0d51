"""The suite's own telemetry check: gaps between stored samples are losses unless counted."""

from __future__ import annotations

import pytest

from tests.faults.fleet_faults import Sample, unaccounted_slots


def _samples(*spec: tuple[float, int]) -> list[Sample]:
    """Samples at the given times with the given ``dropped``, every 2 s; the first one of a
    process has no interval."""
    return [Sample(at, dropped, 2.0 if i else 0.0) for i, (at, dropped) in enumerate(spec)]


@pytest.mark.parametrize(("spec", "restarts", "unaccounted"), [
    (((0, 0), (2, 0), (4, 0)), (), 0),  # on schedule
    (((0, 0), (2, 0), (8, 0)), (), 2),  # two slots missing, not counted
    (((0, 0), (2, 0), (8, 2)), (), 0),  # ... counted by the next sample
    (((0, 0), (8, 1), (10, 1)), (), 1),  # 3 missed, 2 counted (one announced later)
    (((0, 0), (8, 0)), (5.0,), 0),  # an agent start in the gap: nobody ran to sample
    (((0, 0), (2, 0), (3.9, 0)), (), 0),  # sampled a little early: no slot missed
])
def test_unaccounted_slots(spec: tuple[tuple[float, int], ...], restarts: tuple[float, ...],
                           unaccounted: int) -> None:
    assert unaccounted_slots(_samples(*spec), 0, 100, restarts) == unaccounted

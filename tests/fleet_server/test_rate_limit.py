"""fleet_server.rate_limit: token buckets driven by an explicit clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rate_limit import TokenBuckets


def test_burst_then_rate() -> None:
    buckets = TokenBuckets(rate=10.0, burst=30.0)
    assert all(buckets.take("gw-1", 10, now=0.0) for _ in range(3))
    assert not buckets.take("gw-1", 10, now=0.0)  # the burst is spent
    assert buckets.take("gw-2", 10, now=0.0)  # every key has its own bucket
    assert not buckets.take("gw-1", 10, now=0.5)  # 5 tokens back, not 10
    assert buckets.take("gw-1", 10, now=1.0)
    assert buckets.take("gw-1", 30, now=100.0)  # refills up to the burst, no further
    assert not buckets.take("gw-1", 1, now=100.0)


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 50)), max_size=60))
def test_never_more_than_burst_plus_rate_times_time(steps: list[tuple[float, float]]) -> None:
    buckets = TokenBuckets(rate=5.0, burst=20.0)
    now, taken = 0.0, 0.0
    for wait, amount in steps:
        now += wait
        if buckets.take("k", amount, now):
            taken += amount
    assert taken <= 20.0 + 5.0 * now + 1e-9

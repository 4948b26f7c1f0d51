"""fleet_server.rate_limit: token buckets and the ingest's message limits, driven by an
explicit clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rate_limit import Allowance, MessageLimits, TokenBuckets


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


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 30)), max_size=80))
def test_pruning_forgets_only_full_buckets(steps: list[tuple[str, float]]) -> None:
    # A pruned bucket and one never pruned give the same answers: what is forgotten is
    # only what a new bucket holds anyway.
    pruned, kept = TokenBuckets(rate=2.0, burst=10.0), TokenBuckets(rate=2.0, burst=10.0)
    now = 0.0
    for key, wait in steps:
        now += wait
        pruned.prune(now)
        assert pruned.take(key, 3, now) == kept.take(key, 3, now)
    pruned.prune(now + 5.0)  # every bucket is full 5 s after its last take
    assert len(pruned) == 0


@given(st.lists(st.tuples(st.sampled_from(["gw-1", "gw-2"]),
                          st.sampled_from(["telemetry", "messages", "other"]),
                          st.floats(0, 3)), max_size=200))
def test_message_limits_admit_within_the_allowance_and_count_every_refusal(
        steps: list[tuple[str, str, float]]) -> None:
    limits = MessageLimits({"telemetry": Allowance(1.0, 5.0),
                            "messages": Allowance(2.0, 3.0)}, window_s=60.0)
    now = 0.0
    admitted: dict[tuple[str, str], int] = {}
    refused: dict[tuple[str, str], int] = {}
    reported: dict[tuple[str, str], int] = {}
    for device, kind, wait in steps:
        now += wait
        tally = admitted if limits.admit(device, kind, now) else refused
        tally[device, kind] = tally.get((device, kind), 0) + 1
        for window in limits.closed(now):
            assert now - window.since >= 60.0
            for k, n in window.counts.items():
                reported[window.device, k] = reported.get((window.device, k), 0) + n
    for window in limits.closed(now, every=True):
        for k, n in window.counts.items():
            reported[window.device, k] = reported.get((window.device, k), 0) + n
    assert reported == refused  # each refusal counted once, in one window
    for (_, kind), n in admitted.items():
        if kind == "telemetry":
            assert n <= 5.0 + 1.0 * now + 1e-9
        elif kind == "messages":
            assert n <= 3.0 + 2.0 * now + 1e-9
    assert not any(kind == "other" for _, kind in refused)  # no allowance: never refused


def test_a_flood_is_one_window_a_minute_and_quiet_devices_are_forgotten() -> None:
    limits = MessageLimits({"telemetry": Allowance(1.0, 2.0)}, window_s=60.0)
    assert [limits.admit("gw-1", "telemetry", 0.0) for _ in range(5)] == [
        True, True, False, False, False]
    assert limits.admit("gw-1", "telemetry", 1.0)  # one token back after 1 s
    assert not limits.admit("gw-1", "telemetry", 1.0)
    assert limits.closed(59.0) == []  # the window is still open
    [window] = limits.closed(60.0)
    assert (window.device, window.counts, window.since) == ("gw-1", {"telemetry": 4}, 0.0)
    assert limits.closed(200.0) == []
    assert limits.tracked() == 1
    assert limits.admit("gw-2", "telemetry", 200.0)  # prunes gw-1, full again by now
    assert limits.tracked() == 1


def test_an_allowance_needs_a_rate_and_a_burst() -> None:
    with pytest.raises(ValueError, match="rate above 0"):
        Allowance(0.0, 10.0)

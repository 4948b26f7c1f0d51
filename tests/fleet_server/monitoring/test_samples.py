"""Reading telemetry samples defensively: the contract's fields, bounds, bad input."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.monitoring.samples import (
    LATENCY_EDGES_MS,
    MAX_MODELS,
    MAX_SCORE,
    MIN_OUTPUT_SAMPLED,
    MIN_SAMPLED,
    Observation,
    observations,
    rebin,
)
from fleet_server.monitoring.series import quantile


def sample(**model: Any) -> dict[str, Any]:
    return {"latency_buckets_ms": list(LATENCY_EDGES_MS),
            "models": {"digits": {"version": 3, "requests": 10, "errors": 1,
                                  "latency_hist": [0, 0, 0, 0, 10] + [0] * 9, **model}}}


def test_contract_sample_is_read() -> None:
    monitor = {"version": 3, "sampled": 300,
               "inputs": {"x": {"counts": [1, 2], "psi": 0.3, "ks": 0.2}},
               "drift": {"psi": 0.3, "ks": 0.2, "worst": "input:x"}}
    assert observations(sample(monitor=monitor)) == [
        Observation("digits", 3, 10, 1, (0, 0, 0, 0, 10) + (0,) * 9, 0.3, 0.2, "input:x")]


def test_statistics_of_another_version_are_filed_under_it() -> None:
    monitor = {"version": 2, "drift": {"psi": 0.5, "ks": 0.1}}
    served, stats = observations(sample(monitor=monitor))
    assert (served.version, served.requests, served.drift_psi) == (3, 10, None)
    assert (stats.version, stats.requests, stats.drift_psi, stats.drift_ks) == (2, 0, 0.5, 0.1)


def test_bad_fields_are_left_out_not_fatal() -> None:
    bad = sample(requests=-5, errors="many", latency_hist=[1, 2], version=True,
                 monitor={"drift": {"psi": float("nan"), "ks": 1e9, "worst": "x\n" * 100}})
    (obs,) = observations(bad)
    assert obs == Observation("digits", 0, 0, 0, (), None, MAX_SCORE, None)
    assert observations({"models": ["not", "a", "dict"]}) == []
    assert observations({"models": {"../etc": {"requests": 1}}}) == []
    many = {"models": {f"m{i}": {"requests": 1} for i in range(100)}}
    assert len(observations(many)) == MAX_MODELS


def test_other_bucket_edges_are_rebinned_upwards() -> None:
    edges = [0.2, 3.0, 2000.0]
    metrics = {"latency_buckets_ms": edges,
               "models": {"m": {"version": 1, "requests": 6, "latency_hist": [1, 2, 3, 4]}}}
    (obs,) = observations(metrics)
    # 0.2 -> the 0.25 bucket, 3.0 -> 5, 2000 and overflow -> overflow.
    assert obs.latency_hist == rebin([1, 2, 3, 4], edges)
    assert obs.latency_hist[2] == 1
    assert obs.latency_hist[6] == 2
    assert obs.latency_hist[-1] == 7
    assert observations({**metrics, "latency_buckets_ms": [3.0, 1.0, 2.0]})[0].latency_hist == ()


def test_quantile_interpolates_within_a_bucket() -> None:
    counts = [0] * 14
    counts[4] = 100  # (0.5, 1] ms
    assert quantile(counts, 0.5) == 0.75
    assert quantile(counts, 1.0) == 1.0
    assert quantile([0] * 14, 0.5) is None
    counts[13] = 100
    assert quantile(counts, 0.99) == 1000.0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["drift", "psi", "ks", "worst", "version"]), inner, max_size=3),
    max_leaves=12)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.sampled_from(["models", "latency_buckets_ms", "x"]), json_values)
       | st.fixed_dictionaries({"models": st.dictionaries(
           st.sampled_from(["digits", "m2"]),
           st.dictionaries(st.sampled_from(["version", "requests", "errors", "latency_hist",
                                            "monitor"]), json_values))}))
def test_any_json_gives_bounded_observations(metrics: dict[str, Any]) -> None:
    for obs in observations(metrics):
        assert 0 <= obs.requests <= 10**9
        assert 0 <= obs.errors <= 10**9
        assert obs.latency_hist == () or len(obs.latency_hist) == len(LATENCY_EDGES_MS) + 1
        for score in (obs.drift_psi, obs.drift_ks):
            assert score is None or 0 <= score <= MAX_SCORE
        json.dumps([obs.drift_psi, obs.drift_worst], allow_nan=False)


def test_output_drift_counts_only_with_enough_sampled_requests() -> None:
    def monitor(sampled: int | None) -> dict[str, Any]:
        block: dict[str, Any] = {
            "version": 3,
            "inputs": {"a": {"psi": 0.02, "ks": 0.01}, "b": {"psi": 0.04, "ks": 0.03}},
            "outputs": {"logits": {"kind": "classes", "psi": 5.0}},
            "drift": {"psi": 5.0, "ks": 0.03, "worst": "output:logits"}}
        if sampled is not None:
            block["sampled"] = sampled
        return block

    (few,) = observations(sample(monitor=monitor(16)))
    assert (few.drift_psi, few.drift_ks, few.drift_worst) == (0.04, 0.03, "input:b")
    (many,) = observations(sample(monitor=monitor(MIN_OUTPUT_SAMPLED)))
    assert (many.drift_psi, many.drift_worst) == (5.0, "output:logits")
    (unknown,) = observations(sample(monitor=monitor(None)))  # no count: as reported
    assert unknown.drift_psi == 5.0
    for too_few in (0, MIN_SAMPLED - 1):  # too little data is not "no drift"
        (idle,) = observations(sample(monitor=monitor(too_few)))
        assert (idle.drift_psi, idle.drift_ks) == (None, None)

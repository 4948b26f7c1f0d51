"""The probation judgement, driven directly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.probation import ProbationPolicy, judge

POLICY = ProbationPolicy(window_s=60, min_requests=20, max_error_rate=0.05,
                         max_latency_ratio=2.0, latency_slack_ms=1.0, min_latency_samples=200)


@pytest.mark.parametrize(("elapsed", "figures", "decision", "reason"), [
    (10, {"requests": 100, "errors": 6}, "roll_back", "error rate 6.0% over 5.0%"),
    (10, {"requests": 100, "errors": 5}, "wait", "10.0 of 60 s"),
    (10, {"requests": 19, "errors": 19}, "wait", "10.0 of 60 s"),  # too few to judge yet
    (10, {"requests": 300, "errors": 0, "p99_ms": 25.0, "baseline_p99_ms": 10.0,
          "latency_samples": 300}, "roll_back", "p99 latency 25.00 ms over the limit 20.00 ms"),
    (10, {"requests": 300, "errors": 0, "p99_ms": 1.4, "baseline_p99_ms": 0.5,
          "latency_samples": 300}, "wait", ""),  # within the absolute slack
    (10, {"requests": 300, "errors": 0, "p99_ms": 25.0, "baseline_p99_ms": 10.0,
          "latency_samples": 150}, "wait", ""),  # too few latencies
    (10, {"requests": 300, "errors": 0, "p99_ms": 25.0, "baseline_p99_ms": None,
          "latency_samples": 300}, "wait", ""),  # nothing to compare with
    # issue 9 item 19: "healthy for 60 s: 0 requests" read as a health check passed.
    (60, {"requests": 0, "errors": 0}, "commit", "not exercised: no requests in 60 s"),
    (60, {"requests": 7, "errors": 0}, "commit", "barely exercised: 7 requests"),
    (61, {"requests": 500, "errors": 3, "p99_ms": 1.5, "baseline_p99_ms": 1.0,
          "latency_samples": 500}, "commit", "3 errors, p99 1.50 ms"),
    # Ended early by a newer version: the reason says how long it was really watched.
    (10, {"requests": 0, "errors": 0, "final": True}, "commit", "no requests in 10 s"),
    (10, {"requests": 100, "errors": 6, "final": True}, "roll_back", "error rate 6.0%"),
])
def test_verdicts(elapsed: float, figures: dict[str, float], decision: str,
                  reason: str) -> None:
    arguments = {"p99_ms": None, "baseline_p99_ms": None, **figures}
    verdict = judge(POLICY, elapsed, **arguments)  # type: ignore[arg-type]
    assert verdict.decision == decision
    assert reason in verdict.reason


@given(st.floats(0, 120), st.integers(0, 1000), st.integers(0, 1000))
def test_a_breach_is_never_committed(elapsed: float, requests: int, errors: int) -> None:
    errors = min(errors, requests)
    verdict = judge(POLICY, elapsed, requests=requests, errors=errors, p99_ms=None,
                    baseline_p99_ms=None)
    breach = requests >= POLICY.min_requests and errors / requests > POLICY.max_error_rate
    assert (verdict.decision == "roll_back") == breach
    assert (verdict.decision == "commit") == (not breach and elapsed >= POLICY.window_s)

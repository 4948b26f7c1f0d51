"""One device's telemetry summed up for the gates: which samples count, which block
describes the candidate, and that malformed telemetry is skipped, never trusted."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.rollouts.evidence import summarize
from protocol.messages import Telemetry

START, EXPOSED = 1000.0, 1100.0


def _sample(seq: int, at: float, model: dict[str, Any], *, start: bool = False) -> Telemetry:
    return Telemetry(seq, at, {"interval_s": None if start else 30.0,
                               "models": {"digits": model}})


def _compared(n: int, agree: int, shift: float) -> dict[str, Any]:
    return {"version": 1, "agreement": {"metric": "top1", "n": n, "agree": agree,
                                        "mean": agree / n}, "confidence_shift": shift}


def test_steps_count_the_served_candidate_after_exposure() -> None:
    samples = [
        _sample(1, 900.0, {"version": 1, "requests": 50, "errors": 0, "p99_ms": 2.0}),
        _sample(2, 950.0, {"version": 1, "requests": 50, "errors": 0, "p99_ms": 4.0}),
        # After the start, before this device was exposed: neither baseline nor evidence.
        _sample(3, 1050.0, {"version": 1, "requests": 50, "errors": 9, "p99_ms": 9.0}),
        _sample(4, 1130.0, {"version": 2, "requests": 100, "errors": 1, "p99_ms": 6.0,
                            "previous": _compared(10, 9, -0.2),
                            "monitor": {"drift": {"psi": 0.1}}}),
        _sample(5, 1160.0, {"version": 2, "requests": 100, "errors": 0, "p99_ms": 3.0,
                            "previous": _compared(10, 10, 0.1),
                            "monitor": {"drift": {"psi": 0.3}}}),
    ]
    h = summarize(reversed(samples), model="digits", candidate=2, previous=1,
                  phase="steps", exposed_at=EXPOSED, started_at=START)
    assert (h.samples, h.requests, h.errors, h.pairs, h.agree) == (2, 200, 1, 20, 19)
    assert h.baseline_p99_ms == 3.0  # median of 2 and 4
    assert h.p99_ms == 4.5
    assert h.p99_ratio == pytest.approx(1.5)
    assert h.confidence_shift == pytest.approx(0.15)  # absolute values
    assert h.drift_psi == 0.3
    assert h.restarts == 0


def test_shadow_reads_the_shadow_block_beside_the_served_model() -> None:
    shadow = {**_compared(20, 15, 0.05), "version": 2, "requests": 20, "errors": 2,
              "p99_ms": 5.0}
    samples = [_sample(1, 1200.0, {"version": 1, "requests": 100, "errors": 0,
                                   "p99_ms": 2.5, "shadow": shadow})]
    h = summarize(samples, model="digits", candidate=2, previous=1, phase="shadow",
                  exposed_at=EXPOSED, started_at=START)
    assert (h.samples, h.requests, h.errors, h.pairs, h.agree) == (1, 20, 2, 20, 15)
    assert h.p99_ratio == pytest.approx(2.0)


def test_a_restart_counts_only_after_the_candidate_ran() -> None:
    served = {"version": 2, "requests": 10, "errors": 0}
    back_online = [_sample(1, 1200.0, served, start=True), _sample(2, 1230.0, served)]
    crashed = [*back_online, _sample(3, 1260.0, served, start=True)]
    kwargs: dict[str, Any] = {"model": "digits", "candidate": 2, "previous": 1,
                              "phase": "steps", "exposed_at": EXPOSED, "started_at": START}
    assert summarize(back_online, **kwargs).restarts == 0
    assert summarize(crashed, **kwargs).restarts == 1


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                     | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["version", "requests", "errors", "p99_ms", "previous", "shadow",
                          "agreement", "n", "agree", "monitor", "drift", "psi",
                          "confidence_shift", "digits", "models", "interval_s"]), inner,
                         max_size=6), max_leaves=30)


@given(st.lists(st.tuples(st.integers(0, 100), st.floats(900, 1300), _json), max_size=8),
       st.sampled_from(["steps", "shadow"]))
def test_malformed_telemetry_is_skipped(raw: list[tuple[int, float, Any]], phase: str) -> None:
    samples = [Telemetry(seq, at, m if isinstance(m, dict) else {"models": m})
               for seq, at, m in raw]
    h = summarize(samples, model="digits", candidate=2, previous=1, phase=phase,
                  exposed_at=EXPOSED, started_at=START)
    assert 0 <= h.errors <= h.requests
    assert 0 <= h.agree <= h.pairs
    assert h.samples <= len(samples)

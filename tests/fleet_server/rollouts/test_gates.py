"""Gate expressions and their judgement with one-sided bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.errors import RolloutError
from fleet_server.rollouts.gates import DEFAULT_GATES, Gate, judge, merge_gates, parse_gate


@pytest.mark.parametrize(("text", "expected"), [
    ("agreement>=0.98", Gate("agreement", ">=", 0.98, 200)),
    (" error_rate <= 0.01 ", Gate("error_rate", "<=", 0.01)),
    ("p99_ratio<1.5", Gate("p99_ratio", "<", 1.5)),
    ("drift=off", "drift"),
])
def test_parse_gate(text: str, expected: Gate | str) -> None:
    assert parse_gate(text) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("agreement", "METRIC OP NUMBER"),
    ("speed<=2", "unknown metric"),
    ("error_rate<=abc", "not a number"),
    ("error_rate<=2", "between 0 and 1"),
    ("p99_ratio<=nan", "finite"),
    ("agreement=0.5", "only turns a gate off"),
])
def test_parse_gate_refuses(text: str, words: str) -> None:
    with pytest.raises(RolloutError, match=words):
        parse_gate(text)


def test_merge_replaces_and_drops_defaults() -> None:
    gates = merge_gates(["agreement>=0.9", "drift=off"])
    by_metric = {g.metric: g for g in gates}
    assert by_metric["agreement"].threshold == 0.9
    assert "drift" not in by_metric
    assert len(gates) == len(DEFAULT_GATES) - 1


def test_a_gate_fails_on_what_the_bound_supports() -> None:
    gate = Gate("install_failures", "<=", 0.05)
    # 2 of 20 is 10% observed, but the true rate may well be below 5%: keep going.
    assert judge(gate, events=2, trials=20).status == "pass"
    # 1 of 3: the rate is at least 7.8% with 95% confidence, above 5%: halt.
    result = judge(gate, events=1, trials=3)
    assert result.status == "fail"
    assert result.n == 3
    assert result.value == pytest.approx(1 / 3)
    assert result.bound == pytest.approx(0.0783,
                                                                                 abs=1e-3)
    # With a 50% limit, 1 of 3 says little (the bound is 7.8%): not a failure.
    assert judge(Gate("install_failures", "<=", 0.5), events=1, trials=3).status == "pass"


def test_agreement_needs_its_samples() -> None:
    gate = Gate("agreement", ">=", 0.98, min_n=200)
    assert judge(gate, events=100, trials=100).status == "waiting"
    assert judge(gate, events=0, trials=0).status == "waiting"
    assert judge(gate, events=199, trials=200).status == "pass"
    assert judge(gate, events=160, trials=200).status == "fail"


def test_median_gate_is_a_sign_test() -> None:
    gate = Gate("p99_ratio", "<=", 1.5)
    assert judge(gate, values=[3.0]).status == "pass"          # one device says little
    assert judge(gate, values=[3.0] * 3).status == "fail"      # three of three do
    assert judge(gate, values=[3.0, 3.0, 1.0]).status == "pass"
    assert judge(gate, values=[3.0] * 8 + [1.0] * 2).status == "fail"
    assert judge(gate, values=[1.0, 1.2, 1.1]).value == pytest.approx(1.1)
    assert judge(gate, values=[]).status == "pass"


@given(st.integers(0, 500), st.integers(0, 500), st.floats(0.0, 1.0))
def test_rate_fails_only_when_the_bound_crosses(events: int, extra: int,
                                                 threshold: float) -> None:
    trials = events + extra
    upper = judge(Gate("error_rate", "<=", threshold), events=events, trials=trials)
    if upper.status == "fail":
        # The point estimate is past the threshold too: a bound never fails a good rate.
        assert upper.value is not None
        assert upper.value > threshold
    lower = judge(Gate("agreement", ">=", threshold), events=events, trials=trials)
    if lower.status == "fail":
        assert lower.value is not None
        assert lower.value < threshold

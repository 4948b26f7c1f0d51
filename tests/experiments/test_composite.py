"""Ensemble combiners, the cascade, and the choice of its threshold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from experiments.composite import (
    cascade,
    choose_threshold,
    combine,
    needs_expensive,
    probabilities,
)
from experiments.errors import InvalidExperimentData

A = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]], dtype=np.float32)
B = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
C = np.array([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)


def test_softmax_of_logits() -> None:
    p = probabilities(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]), "logits")
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]])


def test_combiners() -> None:
    np.testing.assert_allclose(combine([A, B], "mean"), (A + B) / 2)
    np.testing.assert_allclose(combine([A, B], "weighted", [3, 1]), 0.75 * A + 0.25 * B,
                               rtol=1e-6)
    assert combine([A, B, C], "vote").argmax(axis=1).tolist() == [1, 2]
    # A tie of votes (A says 0, B says 1) goes to the higher mean probability.
    assert combine([A, B], "vote").argmax(axis=1).tolist() == [0, 2]


@pytest.mark.parametrize(("members", "combiner", "weights", "match"), [
    ([A], "mean", None, "at least two"),
    ([A, B], "weighted", [1.0], "one non-negative weight"),
    ([A, B], "weighted", [-1.0, 2.0], "one non-negative weight"),
    ([A, B], "median", None, "unknown combiner"),
])
def test_bad_ensembles_are_refused(members: list[np.ndarray], combiner: str,
                                   weights: list[float] | None, match: str) -> None:
    with pytest.raises(InvalidExperimentData, match=match):
        combine(members, combiner, weights)  # type: ignore[arg-type]


def test_cascade_replaces_only_unsure_rows() -> None:
    mask = needs_expensive(A, 0.6)
    assert mask.tolist() == [False, True]
    out = cascade(A, C[mask], mask)
    np.testing.assert_array_equal(out, [A[0], C[1]])
    with pytest.raises(InvalidExperimentData, match="unsure rows"):
        cascade(A, C, mask)
    with pytest.raises(InvalidExperimentData, match="probability in"):
        needs_expensive(A, 1.5)


_probs = hnp.arrays(np.float64, st.tuples(st.integers(1, 40), st.just(3)),
                    elements=st.floats(0.01, 1.0)).map(lambda a: a / a.sum(axis=1, keepdims=True))


@settings(max_examples=200, deadline=None)
@given(_probs, st.data())
def test_chosen_threshold_meets_the_target_with_the_fewest_escalations(
        cheap: np.ndarray, data: st.DataObject) -> None:
    n = cheap.shape[0]
    expensive = data.draw(hnp.arrays(np.float64, (n, 3), elements=st.floats(0.01, 1.0)))
    labels = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 2)))
    choice = choose_threshold(cheap, expensive, labels)
    mask = needs_expensive(cheap, choice.threshold)
    answer = cascade(cheap, expensive[mask], mask)
    accuracy = float((answer.argmax(axis=1) == labels).mean())
    assert accuracy == pytest.approx(choice.accuracy)
    assert mask.mean() == pytest.approx(choice.expensive_share)
    assert accuracy >= (expensive.argmax(axis=1) == labels).mean() - 1e-12
    # No threshold that escalates fewer rows reaches the target.
    for t in sorted({0.0, *cheap.max(axis=1).tolist()}):
        m = needs_expensive(cheap, t)
        if m.sum() < mask.sum():
            acc = (cascade(cheap, expensive[m], m).argmax(axis=1) == labels).mean()
            assert acc < choice.target_accuracy


def test_a_sure_cheap_model_needs_no_expensive_one() -> None:
    labels = np.array([0, 1])
    sure = np.array([[0.9, 0.1], [0.2, 0.8]])
    choice = choose_threshold(sure, np.array([[0.4, 0.6], [0.6, 0.4]]), labels)
    assert choice.expensive_share == 0.0
    assert choice.threshold == 0.0

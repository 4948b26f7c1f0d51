"""stats.outputs: output summaries and agreement kernels, shared by compressor and agent."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stats.outputs import (
    class_counts,
    confidence,
    confidence_shift,
    cosine_similarity,
    entropy,
    probabilities,
    relative_within,
    top1_agreement,
)

_scores = st.tuples(st.integers(1, 20), st.integers(2, 12)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-20, 20, width=32)))


@given(_scores)
def test_summaries_are_in_range(scores: np.ndarray) -> None:
    classes = scores.shape[1]
    p = probabilities(scores)
    assert np.allclose(p.sum(axis=1), 1.0)
    conf = confidence(scores)
    assert np.all(conf >= 1.0 / classes - 1e-9)
    assert np.all(conf <= 1.0 + 1e-9)
    h = entropy(scores)
    assert np.all(h >= -1e-9)
    assert np.all(h <= math.log(classes) + 1e-9)
    counts = class_counts(scores, classes)
    assert counts.sum() == len(scores)
    assert len(counts) == classes


@given(_scores)
def test_probabilities_are_kept_and_softmax_is_shift_free(scores: np.ndarray) -> None:
    p = probabilities(scores)
    assert np.allclose(probabilities(p), p)  # already a distribution: unchanged
    assert np.allclose(probabilities(scores.astype(np.float64) + 3.0), p)


@given(_scores, _scores)
def test_agreement_is_symmetric_and_reflexive(a: np.ndarray, b: np.ndarray) -> None:
    assert top1_agreement(a, a).all()
    assert np.allclose(cosine_similarity(a, a)[np.linalg.norm(a, axis=1) > 0], 1.0)
    if a.shape == b.shape:
        assert (top1_agreement(a, b) == top1_agreement(b, a)).all()
        cos = cosine_similarity(a, b)
        assert np.allclose(cos, cosine_similarity(b, a))
        assert np.all(np.abs(cos) <= 1.0 + 1e-9)
        assert confidence_shift(a, b) == pytest.approx(-confidence_shift(b, a))
    assert relative_within(a, a, 0.0).all()


def test_known_values() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    assert top1_agreement(logits, np.array([0, 1]), labels=True).tolist() == [True, False]
    assert class_counts(logits, 3).tolist() == [1, 0, 1]
    uniform = np.full((1, 4), 0.25)
    assert confidence(uniform)[0] == pytest.approx(0.25)
    assert entropy(uniform)[0] == pytest.approx(math.log(4))
    # A more certain candidate on the same inputs shows a positive shift.
    assert confidence_shift(logits * 3, logits) > 0.0
    assert cosine_similarity(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))[0] == 0.0
    assert relative_within(np.array([[1.04, 0.0]]), np.array([[1.0, 0.0]]), 0.05).all()
    with pytest.raises(ValueError, match="one shape"):
        cosine_similarity(np.zeros((2, 3)), np.zeros((2, 4)))

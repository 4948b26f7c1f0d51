"""What a model's outputs say, and how far two models' outputs agree: pure kernels over arrays.

One module for every place that judges outputs, so the compressor's quality measures, the
agent's monitoring and the rollout gates (shadow and previous-version agreement) compute
the same thing the same way:

- summaries of one output, one row per sample: :func:`probabilities` (softmax unless the
  rows already are distributions), :func:`confidence` (the largest probability),
  :func:`entropy`, :func:`class_counts` (predicted class per row, counted);
- agreement of two outputs on the same inputs, per row: :func:`top1_agreement` (same
  argmax: classifiers), :func:`cosine_similarity` and :func:`relative_within` (other
  outputs), and :func:`confidence_shift` (mean confidence of one minus the other's).

Rows are ``values.reshape(len(values), -1)`` unless a function says otherwise: the last
axis holds the class scores for classifiers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AGREE_COSINE", "MAX_CLASSES", "class_counts", "confidence", "confidence_shift",
           "cosine_similarity", "entropy", "probabilities", "relative_within", "rows",
           "top1_agreement", "unit_rows"]

#: Class counts are kept (in baselines and telemetry) for classifiers of up to this many
#: classes; a larger one is described by its confidence alone.
MAX_CLASSES = 64
#: Two non-classifier outputs "agree" on a sample at this cosine similarity or above.
AGREE_COSINE = 0.99
# Rows that sum to 1 within this (and have no negative entry) are taken as probabilities.
_SUM_TOLERANCE = 1e-3


def rows(values: np.ndarray) -> np.ndarray:
    """``values`` as one flat row per sample (the first axis), float64."""
    array = np.asarray(values)
    return array.reshape(len(array), -1).astype(np.float64, copy=False)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Class probabilities per row: the rows themselves when they already are distributions
    (non-negative, summing to 1), else their softmax (logits)."""
    flat = rows(scores)
    if flat.size and flat.min() >= 0.0 and np.all(np.abs(flat.sum(axis=1) - 1.0)
                                                  <= _SUM_TOLERANCE):
        return flat
    shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
    result: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return result


def confidence(scores: np.ndarray) -> np.ndarray:
    """The largest class probability of each row, in (0, 1]."""
    result: np.ndarray = probabilities(scores).max(axis=1)
    return result


def entropy(scores: np.ndarray) -> np.ndarray:
    """The entropy (nats) of each row's class probabilities: 0 for a certain answer,
    ``ln(classes)`` for a uniform one."""
    p = probabilities(scores)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    result: np.ndarray = -np.sum(p * logs, axis=1)
    return result


def class_counts(scores: np.ndarray, classes: int) -> np.ndarray:
    """How many rows predict each of ``classes`` classes (the argmax of the last axis);
    a predicted class at or beyond ``classes`` is counted in the last."""
    predicted = np.minimum(np.argmax(rows(scores), axis=1), classes - 1)
    counts: np.ndarray = np.bincount(predicted, minlength=classes).astype(np.int64)
    return counts


def top1_agreement(a: np.ndarray, b: np.ndarray, *, labels: bool = False) -> np.ndarray:
    """Per row, whether ``a`` and ``b`` predict the same class (argmax of each row);
    with ``labels`` ``b`` holds the class ids instead, one per row."""
    left = np.argmax(rows(a), axis=1)
    right = np.asarray(b).reshape(len(b)) if labels else np.argmax(rows(b), axis=1)
    result: np.ndarray = left == right
    return result


def unit_rows(values: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero)."""
    flat = rows(values)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit: np.ndarray = np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0)
    return unit


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the cosine similarity of ``a`` and ``b`` (0 where either row is zero).
    Raises ValueError when they do not hold the same number of values per row."""
    left, right = rows(a), rows(b)
    if left.shape != right.shape:
        raise ValueError(f"cosine needs outputs of one shape, got {list(np.shape(a))} and "
                         f"{list(np.shape(b))}")
    result: np.ndarray = np.sum(unit_rows(left) * unit_rows(right), axis=1)
    return result


def relative_within(a: np.ndarray, b: np.ndarray, tolerance: float) -> np.ndarray:
    """Per element, whether ``a`` is within ``tolerance`` of ``b`` relative to
    ``max(|b|, mean |b|)`` (so values near zero are judged on the output's scale).
    Raises ValueError for outputs of different shapes."""
    got, goal = rows(a), rows(b)
    if got.shape != goal.shape:
        raise ValueError(f"relative error needs outputs of one shape, got {list(np.shape(a))} "
                         f"and {list(np.shape(b))}")
    scale = max(float(np.mean(np.abs(goal))) if goal.size else 0.0, 1e-12)
    result: np.ndarray = np.abs(got - goal) <= tolerance * np.maximum(np.abs(goal), scale)
    return result


def confidence_shift(candidate: np.ndarray, served: np.ndarray) -> float:
    """Mean confidence of ``candidate`` minus that of ``served`` on the same inputs: a
    model that got less sure (negative) or overconfident (positive). 0.0 with no rows."""
    if len(candidate) == 0 or len(served) == 0:
        return 0.0
    return float(np.mean(confidence(candidate)) - np.mean(confidence(served)))

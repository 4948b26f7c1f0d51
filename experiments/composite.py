"""Ensembles and cascades over classifiers' scores, and a cascade's threshold from data.

Everything works on class scores of shape ``[batch, classes]``: probabilities, or logits
turned into probabilities by :func:`probabilities` first.

- **Ensemble** (:func:`combine`): ``mean`` of the members' probabilities, ``weighted`` mean,
  or majority ``vote`` (each member votes for its top class; ties go to the class with the
  higher mean probability, so the result is a probability-like score whose argmax is the
  vote).
- **Cascade** (:func:`needs_expensive`, :func:`cascade`): the cheap model answers when its
  top probability is above the threshold; otherwise the expensive model's answer replaces
  it (threshold 0: never escalate; 1: always). :func:`choose_threshold` picks, on an
  evaluation set, the threshold that sends the fewest requests to the expensive model while
  the cascade's accuracy stays at or above a target (by default the expensive model's own
  accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from experiments.errors import InvalidExperimentData

__all__ = ["Combiner", "ThresholdChoice", "cascade", "choose_threshold", "combine",
           "needs_expensive", "probabilities"]

Combiner = Literal["mean", "weighted", "vote"]


def probabilities(scores: np.ndarray, kind: Literal["logits", "probabilities"]) -> np.ndarray:
    """``[batch, classes]`` scores as probabilities (a stable softmax for logits)."""
    scores = _as_batch(scores)
    if kind == "probabilities":
        return scores
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return out


def combine(members: Sequence[np.ndarray], combiner: Combiner,
            weights: Sequence[float] | None = None) -> np.ndarray:
    """One ``[batch, classes]`` answer from several members' probabilities."""
    if len(members) < 2:
        raise InvalidExperimentData(f"an ensemble needs at least two members, not "
                                    f"{len(members)}")
    stack = np.stack([_as_batch(m) for m in members])
    if combiner == "mean":
        out: np.ndarray = stack.mean(axis=0)
        return out
    if combiner == "weighted":
        if weights is None or len(weights) != len(members) or any(
                not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise InvalidExperimentData(f"a weighted ensemble needs one non-negative weight "
                                        f"per member ({len(members)}) with a positive sum, "
                                        f"not {weights}")
        w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        weighted: np.ndarray = np.tensordot(w, stack, axes=1).astype(stack.dtype)
        return weighted
    if combiner == "vote":
        classes = stack.shape[2]
        votes = np.eye(classes, dtype=np.float64)[stack.argmax(axis=2)].sum(axis=0)
        # Mean probability breaks ties and never outweighs one vote (it is below 1).
        score = votes + stack.mean(axis=0) * 0.5
        voted: np.ndarray = (score / score.sum(axis=1, keepdims=True)).astype(stack.dtype)
        return voted
    raise InvalidExperimentData(f"unknown combiner {combiner!r}; use mean, weighted or vote")


def needs_expensive(cheap: np.ndarray, threshold: float) -> np.ndarray:
    """Which rows the cheap model is unsure of: top probability at or below ``threshold``."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidExperimentData(f"a cascade threshold is a probability in [0, 1], not "
                                    f"{threshold}")
    mask: np.ndarray = _as_batch(cheap).max(axis=1) <= threshold
    return mask


def cascade(cheap: np.ndarray, expensive_rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The cascade's answer: the cheap rows, with the rows in ``mask`` replaced by the
    expensive model's answers (``expensive_rows`` holds only those rows, in order)."""
    cheap = _as_batch(cheap)
    if expensive_rows.shape[0] != int(mask.sum()) or expensive_rows.shape[1:] != cheap.shape[1:]:
        raise InvalidExperimentData(f"the expensive model answered {expensive_rows.shape} for "
                                    f"{int(mask.sum())} unsure rows of {cheap.shape}")
    out = cheap.copy()
    out[mask] = expensive_rows
    return out


@dataclass(frozen=True)
class ThresholdChoice:
    """A cascade threshold and what it gave on the evaluation set."""

    threshold: float
    accuracy: float
    expensive_share: float
    target_accuracy: float


def choose_threshold(cheap: np.ndarray, expensive: np.ndarray, labels: np.ndarray,
                     target_accuracy: float | None = None) -> ThresholdChoice:
    """The threshold with the smallest expensive-model share whose cascade accuracy is at
    least ``target_accuracy`` (default: the expensive model's accuracy) on this data.

    ``cheap`` and ``expensive`` are both models' probabilities on every evaluation row.
    Candidates are the cheap model's own confidences (where the cascade's answers change)
    plus 0 (never escalate); 1 escalates every row, which meets any target the expensive
    model meets alone.
    """
    cheap, expensive = _as_batch(cheap), _as_batch(expensive)
    labels = np.asarray(labels).reshape(-1)
    if not cheap.shape == expensive.shape or cheap.shape[0] != labels.shape[0] or not len(labels):
        raise InvalidExperimentData(f"need both models' scores and a label for every row: "
                                    f"{cheap.shape}, {expensive.shape}, {labels.shape}")
    cheap_right = cheap.argmax(axis=1) == labels
    expensive_right = expensive.argmax(axis=1) == labels
    target = float(expensive_right.mean()) if target_accuracy is None else target_accuracy
    confidence = cheap.max(axis=1)
    # Rows sorted by the cheap model's confidence: threshold k escalates the k least sure.
    order = np.argsort(confidence, kind="stable")
    gain = (expensive_right[order].astype(np.int64) - cheap_right[order].astype(np.int64))
    correct = int(cheap_right.sum()) + np.concatenate([[0], np.cumsum(gain)])
    n = len(labels)
    for k in range(n + 1):
        # Escalating k rows is a threshold only where confidences differ (ties go together).
        if 0 < k < n and confidence[order[k - 1]] == confidence[order[k]]:
            continue
        if correct[k] / n >= target:
            threshold = 0.0 if k == 0 else float(confidence[order[k - 1]])
            return ThresholdChoice(threshold, float(correct[k] / n), k / n, target)
    return ThresholdChoice(1.0, float(correct[n] / n), 1.0, target)


def _as_batch(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise InvalidExperimentData(f"class scores must be [batch, classes >= 2], not "
                                    f"{scores.shape}")
    return scores

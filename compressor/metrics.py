"""Quality measures that fit a model's outputs. Pure: arrays in, points out.

Every measure scores outputs against a target in points (0-100, higher is better). Without
labels the target is the fp32 reference's outputs, which score 100 against themselves; with
labels it is the labels, and both the reference and the candidate are scored. A candidate's
*drop* on an output is the reference's score minus its own, and its drop overall is the
largest over the scored outputs: every output must stay within the budget.

=============  ===========================================================================
``top1``        classifiers: the argmax over the last axis is the same (labels: class ids)
``sequence``    per position: the argmax over the last axis at each position (``[T, C]``
                outputs; labels ``[T]``, negative labels ignored)
``ctc``         text lines: greedy CTC decoding (repeats merged, blank ``PARAM``, default
                0) reads the same line (labels: the line as class ids, padded with -1)
``embedding``   the nearest neighbour among the evaluation samples is the same one (or one
                within ``PARAM``, default 0.005, of its cosine similarity); labels: class ids,
                scored as 1-nearest-neighbour accuracy. Mean cosine is reported beside it
``cosine``      mean cosine similarity with the target, in points
``iou``         masks and detection maps: intersection over union of the thresholded map
                (threshold ``PARAM``; default 0.5 for probabilities, 0 for logits), or of
                the per-pixel argmax over the channel axis for multi-class maps
``relative``    regression: the share of values within ``PARAM`` (default 0.05) relative
                error, relative to ``max(|target|, mean |target|)``
``exact``       integer outputs: the share of equal elements
``none``        not scored (state outputs are not, by default)
``python``      ``python:FILE.py:FUNCTION``: ``FUNCTION(outputs, target) -> points``
=============  ===========================================================================

:func:`infer_metric` picks one from the output's name, dtype and per-sample shape.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stats.outputs import cosine_similarity, relative_within, top1_agreement, unit_rows

from .errors import CompressorError, first_line

__all__ = ["KINDS", "Metric", "MetricError", "OutputQuality", "Quality", "infer_metric",
           "judge", "parse_metric"]

KINDS = ("top1", "sequence", "ctc", "embedding", "cosine", "iou", "relative", "exact", "none",
         "python")
# The nearest-neighbour measure compares all pairs; more samples than this are not needed.
_MAX_NEIGHBOUR_SAMPLES = 2000
_EMBEDDING_HINTS = ("emb", "pool", "hidden", "feature", "vector", "sentence", "encod")
_MAP_HINTS = ("mask", "seg", "map", "heat", "det")
_REGRESSION_HINTS = ("box", "coord", "offset", "depth", "regress", "landmark")

UserFunction = Callable[[np.ndarray, np.ndarray], float]


class MetricError(CompressorError):
    """A quality measure does not fit an output (or a user metric failed)."""


@dataclass(frozen=True)
class Metric:
    """One quality measure with its parameter (see the module docstring)."""

    kind: str
    param: float | None = None
    function: UserFunction | None = field(default=None, compare=False)
    source: str = ""  # what the user wrote, for a python metric

    def __str__(self) -> str:
        if self.kind == "python":
            return self.source
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    def score(self, outputs: np.ndarray, target: np.ndarray,
              labelled: bool) -> tuple[float, dict[str, float]]:
        """(points, extra figures) of ``outputs`` against ``target``."""
        if len(outputs) != len(target):
            raise MetricError(f"{len(outputs)} outputs for {len(target)} "
                              f"{'labels' if labelled else 'reference rows'}")
        scorer = _SCORERS[self.kind]
        return scorer(self, outputs, target, labelled)


@dataclass(frozen=True)
class OutputQuality:
    """How one output of a candidate scored."""

    metric: str
    score: float  # points against the target
    reference_score: float  # the fp32 reference's points against the same target
    details: dict[str, float] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        """Points lost against the reference."""
        return self.reference_score - self.score


@dataclass(frozen=True)
class Quality:
    """A candidate's quality on every scored output; ``drop`` is the worst."""

    outputs: dict[str, OutputQuality]
    labelled: bool

    @property
    def drop(self) -> float:
        """The largest drop over the scored outputs (0 when none is scored)."""
        return max((q.drop for q in self.outputs.values()), default=0.0)


def parse_metric(text: str) -> tuple[str, Metric]:
    """``[OUTPUT=]KIND[:PARAM]`` (the ``--metric`` option) as (output or "*", metric)."""
    output, sep, spec = text.partition("=")
    if not sep:
        output, spec = "*", text
    kind, _, param = spec.partition(":")
    if kind not in KINDS:
        raise MetricError(f"--metric {text!r}: unknown measure {kind!r}; use one of "
                          f"{', '.join(KINDS)}.")
    if kind == "python":
        return output, _python_metric(param, spec)
    if not param:
        return output, Metric(kind)
    try:
        return output, Metric(kind, float(param))
    except ValueError:
        raise MetricError(f"--metric {text!r}: the parameter after ':' must be a number."
                          ) from None


def _python_metric(reference: str, source: str) -> Metric:
    file, sep, name = reference.rpartition(":")
    if not sep or not file.endswith(".py") or not name:
        raise MetricError(f"--metric python:{reference}: expected python:FILE.py:FUNCTION.")
    path = Path(file)
    spec = importlib.util.spec_from_file_location(f"edgefleet_metric_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise MetricError(f"--metric python:{reference}: no Python file {file}.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may raise anything
        raise MetricError(f"--metric python:{reference}: {file} failed to import: "
                          f"{first_line(exc)}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise MetricError(f"--metric python:{reference}: {file} has no function {name}.")
    return Metric("python", function=function, source=source)


def infer_metric(name: str, per_sample: tuple[int, ...], dtype: np.dtype) -> Metric:
    """The measure that fits an output, from its name, dtype and per-sample shape.

    Integer outputs: ``exact``; one value per sample: ``relative``; names that say so:
    ``embedding`` (emb, pool, hidden, feature...), ``iou`` (mask, seg, map, heat, det) or
    ``relative`` (box, coord, offset, depth...); otherwise by shape: ``[C]`` (or ``[1, C]``)
    ``top1``, ``[T, C]`` ``sequence``, ``[C, H, W]`` ``iou``.
    """
    lowered = name.lower()
    if dtype.kind in "iub":
        kind = "exact"
    elif int(np.prod(per_sample, dtype=np.int64)) == 1:
        kind = "relative"
    elif any(hint in lowered for hint in _EMBEDDING_HINTS):
        kind = "embedding"
    elif len(per_sample) >= 2 and any(hint in lowered for hint in _MAP_HINTS):
        kind = "iou"
    elif any(hint in lowered for hint in _REGRESSION_HINTS):
        kind = "relative"
    elif len(_squeezed(per_sample)) == 1:
        kind = "top1"
    else:
        kind = {2: "sequence", 3: "iou"}.get(len(per_sample), "relative")
    return Metric(kind)


def judge(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
          metrics: Mapping[str, Metric], labels: Mapping[str, np.ndarray]) -> Quality:
    """Score every output that has a measure (``metrics``, by output name; "none" skipped).

    ``labels`` are by output name; an output without labels is scored against the reference.
    """
    scored = {}
    for name, metric in metrics.items():
        if metric.kind == "none":
            continue
        target = labels.get(name)
        labelled = target is not None
        goal = reference[name] if target is None else target
        try:
            score, details = metric.score(outputs[name], goal, labelled)
            ref_score = 100.0
            if labelled:
                ref_score = metric.score(reference[name], goal, True)[0]
                # Beside the labelled score, how closely the reference is followed.
                agreement, _ = metric.score(outputs[name], reference[name], False)
                details = {**details, "agreement": round(agreement, 4)}
        except MetricError as exc:
            raise MetricError(f"output {name}, measure {metric}: {exc}") from exc
        scored[name] = OutputQuality(str(metric), score, ref_score, details)
    return Quality(scored, labelled=bool(labels))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-sample shape without leading unit axes (a call's batch of one)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def _rows(values: np.ndarray) -> np.ndarray:
    """Per-sample values with leading unit axes dropped: ``[N, *squeezed]``."""
    return values.reshape(len(values), *_squeezed(values.shape[1:]))


def _top1(metric: Metric, outputs: np.ndarray, target: np.ndarray,
          labelled: bool) -> tuple[float, dict[str, float]]:
    logits = _rows(outputs)
    if logits.ndim != 2:
        raise MetricError(f"top1 needs one score vector per sample, got per-sample shape "
                          f"{list(logits.shape[1:])}; use sequence, iou or relative")
    goal = target if labelled else _rows(target)
    return float(np.mean(top1_agreement(logits, goal, labels=labelled)) * 100.0), {}


def _sequence(metric: Metric, outputs: np.ndarray, target: np.ndarray,
              labelled: bool) -> tuple[float, dict[str, float]]:
    predicted = np.argmax(outputs, axis=-1).reshape(len(outputs), -1)
    goal = (target.reshape(len(target), -1) if labelled
            else np.argmax(target, axis=-1).reshape(len(target), -1))
    if goal.shape != predicted.shape:
        raise MetricError(f"sequence labels have {goal.shape[1]} positions per sample, the "
                          f"output {predicted.shape[1]}; for CTC line labels use ctc")
    valid = goal >= 0
    same = (predicted == goal) | ~valid
    points = float(np.sum((predicted == goal) & valid) / max(1, int(valid.sum())) * 100.0)
    return points, {"sequences_equal": float(np.mean(same.all(axis=1)) * 100.0)}


def _ctc(metric: Metric, outputs: np.ndarray, target: np.ndarray,
         labelled: bool) -> tuple[float, dict[str, float]]:
    blank = int(metric.param or 0)
    lines = _ctc_decode(np.argmax(outputs, axis=-1).reshape(len(outputs), -1), blank)
    goal = ([tuple(int(c) for c in row if c >= 0) for row in target.reshape(len(target), -1)]
            if labelled else
            _ctc_decode(np.argmax(target, axis=-1).reshape(len(target), -1), blank))
    same = [a == b for a, b in zip(lines, goal, strict=True)]
    return float(np.mean(same) * 100.0), {}


def _ctc_decode(best: np.ndarray, blank: int) -> list[tuple[int, ...]]:
    """Greedy CTC: merge repeated classes, then drop blanks."""
    lines = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        lines.append(tuple(int(c) for c in row[keep] if c != blank))
    return lines


def _cosine(metric: Metric, outputs: np.ndarray, target: np.ndarray,
            labelled: bool) -> tuple[float, dict[str, float]]:
    if outputs.size != target.size:
        raise MetricError(f"cosine needs targets shaped like the output, got "
                          f"{list(target.shape)} for {list(outputs.shape)}")
    cosine = cosine_similarity(outputs, target.reshape(outputs.shape))
    return float(np.mean(cosine) * 100.0), {}


def _embedding(metric: Metric, outputs: np.ndarray, target: np.ndarray,
               labelled: bool) -> tuple[float, dict[str, float]]:
    count = min(len(outputs), _MAX_NEIGHBOUR_SAMPLES)
    if count < 2:
        raise MetricError("nearest-neighbour agreement needs at least 2 evaluation samples")
    unit = unit_rows(outputs[:count])
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argmax(similarity, axis=1)
    if labelled:
        goal = target.reshape(len(target))[:count]
        return float(np.mean(goal[nearest] == goal) * 100.0), {}
    reference = unit_rows(target[:count])
    ref_similarity = reference @ reference.T
    np.fill_diagonal(ref_similarity, -np.inf)
    best = ref_similarity.max(axis=1)
    tolerance = 0.005 if metric.param is None else metric.param
    got = ref_similarity[np.arange(count), nearest]
    agree = got >= best - tolerance
    cosine = float(np.mean(cosine_similarity(outputs, target)))
    return float(np.mean(agree) * 100.0), {"cosine_mean": round(cosine, 6)}


def _masks(values: np.ndarray, threshold: float | None) -> np.ndarray:
    """``[N, C, H, W]`` scores as a class per pixel; anything else thresholded to 0/1."""
    rows = _rows(values)
    if rows.ndim >= 4:
        classes: np.ndarray = np.argmax(rows, axis=1)
        return classes
    if threshold is None:
        low, high = float(rows.min()), float(rows.max())
        threshold = 0.5 if low >= -0.05 and high <= 1.05 else 0.0
    return (rows > threshold).astype(np.int64)


def _iou(metric: Metric, outputs: np.ndarray, target: np.ndarray,
         labelled: bool) -> tuple[float, dict[str, float]]:
    predicted = _masks(outputs, metric.param)
    goal = (_rows(target).astype(np.int64) if labelled and target.dtype.kind in "iub"
            else _masks(target, metric.param))
    if goal.shape != predicted.shape and goal.size == predicted.size:
        goal = goal.reshape(predicted.shape)  # labels [N] for outputs [N, 1, 1], say
    if goal.shape != predicted.shape:
        raise MetricError(f"iou needs masks of one shape, got {list(goal.shape[1:])} for "
                          f"{list(predicted.shape[1:])} per sample")
    per_sample = []
    for a, b in zip(predicted, goal, strict=True):
        # Foreground classes only (0 is background); both empty is full agreement.
        classes = np.setdiff1d(np.union1d(np.unique(a), np.unique(b)), [0])
        if len(classes) == 0:
            per_sample.append(1.0)
            continue
        per_sample.append(float(np.mean([np.sum((a == c) & (b == c)) / np.sum((a == c) | (b == c))
                                         for c in classes])))
    return float(np.mean(per_sample) * 100.0), {}


def _relative(metric: Metric, outputs: np.ndarray, target: np.ndarray,
              labelled: bool) -> tuple[float, dict[str, float]]:
    tolerance = 0.05 if metric.param is None else metric.param
    if outputs.size != target.size or len(outputs) != len(target):
        raise MetricError(f"relative needs targets shaped like the output, got "
                          f"{list(target.shape)} for {list(outputs.shape)}")
    within = relative_within(outputs, target, tolerance)
    diff = np.abs(outputs.astype(np.float64).ravel() - target.astype(np.float64).ravel())
    return float(np.mean(within) * 100.0), {
        "max_abs_diff": float(np.max(diff)) if diff.size else 0.0}


def _exact(metric: Metric, outputs: np.ndarray, target: np.ndarray,
           labelled: bool) -> tuple[float, dict[str, float]]:
    if outputs.size != target.size:
        raise MetricError(f"exact needs targets shaped like the output, got "
                          f"{list(target.shape)} for {list(outputs.shape)}")
    return float(np.mean(outputs.reshape(-1) == target.reshape(-1)) * 100.0), {}


def _user(metric: Metric, outputs: np.ndarray, target: np.ndarray,
          labelled: bool) -> tuple[float, dict[str, float]]:
    assert metric.function is not None
    try:
        return float(metric.function(outputs, target)), {}
    except Exception as exc:  # the user's code may raise anything
        raise MetricError(f"{metric.source} raised {type(exc).__name__}: "
                          f"{first_line(exc)}") from exc


_SCORERS: dict[str, Callable[[Metric, np.ndarray, np.ndarray, bool],
                             tuple[float, dict[str, float]]]] = {
    "top1": _top1, "sequence": _sequence, "ctc": _ctc, "embedding": _embedding,
    "cosine": _cosine, "iou": _iou, "relative": _relative, "exact": _exact, "python": _user}

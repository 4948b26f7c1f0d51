"""The compressor's report on a composite: each member, the ensemble and the cascade.

Given member models that share one signature, an evaluation set with labels and the output
holding class scores, :func:`composite_report` measures on this machine:

- every member's accuracy and single-request latency;
- the ensemble (mean of probabilities, every member run): accuracy and latency;
- the cascade (first member cheap, last member expensive): the threshold chosen on the
  evaluation set by ``experiments.composite.choose_threshold`` (the fewest requests sent
  to the expensive model at an accuracy at least the expensive model's), the share sent,
  the accuracy, and the latency of serving each evaluation row one request at a time.

Latency is timed request by request over the same rows for every variant, interleaved, so
the cascade's mean includes its real mix of cheap-only and cheap-then-expensive requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from experiments.composite import choose_threshold, combine, needs_expensive, probabilities

from .runner import ModelRunner

__all__ = ["CompositeReport", "VariantFigures", "composite_report"]


@dataclass(frozen=True)
class VariantFigures:
    """Accuracy (percent) and per-request latency (ms) of one way of serving."""

    accuracy: float
    mean_ms: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class CompositeReport:
    """Members, the ensemble and the cascade, measured on the same rows."""

    members: dict[str, VariantFigures]
    ensemble: VariantFigures
    cascade: VariantFigures
    threshold: float
    expensive_share: float
    target_accuracy: float

    def to_json(self) -> dict[str, Any]:
        """The report's JSON form (``report.json``'s ``composite`` section)."""
        return asdict(self)


def composite_report(members: Mapping[str, ModelRunner], inputs: Mapping[str, np.ndarray],
                     labels: np.ndarray, output: str, *,
                     scores: Literal["logits", "probabilities"] = "logits",
                     timed_rows: int | None = None,
                     target_accuracy: float | None = None) -> CompositeReport:
    """Measure ``members`` (in order: cheap first, expensive last) on labelled ``inputs``.

    ``timed_rows`` limits the rows timed one by one (default: all of them);
    ``target_accuracy`` (percent) is the cascade's target (default: the expensive model's).
    """
    names = list(members)
    if len(names) < 2:
        raise ValueError(f"a composite needs at least two members, not {len(names)}")
    probs = {n: probabilities(_run_all(members[n], inputs)[output], scores) for n in names}
    labels = np.asarray(labels).reshape(-1)
    cheap, costly = names[0], names[-1]
    choice = choose_threshold(probs[cheap], probs[costly], labels,
                              None if target_accuracy is None else target_accuracy / 100.0)
    rows = len(labels) if timed_rows is None else min(timed_rows, len(labels))

    def ensemble(feeds: Mapping[str, np.ndarray]) -> None:
        combine([probabilities(members[n].run(feeds)[output], scores) for n in names], "mean")

    def cascade(feeds: Mapping[str, np.ndarray]) -> None:
        first = probabilities(members[cheap].run(feeds)[output], scores)
        if needs_expensive(first, choice.threshold).any():
            members[costly].run(feeds)

    calls = {**{n: members[n].run for n in names}, "ensemble": ensemble, "cascade": cascade}
    times = _time_rows(calls, inputs, rows)
    ensemble_accuracy = _accuracy(combine([probs[n] for n in names], "mean"), labels)
    return CompositeReport(
        members={n: _figures(_accuracy(probs[n], labels), times[n]) for n in names},
        ensemble=_figures(ensemble_accuracy, times["ensemble"]),
        cascade=_figures(choice.accuracy * 100.0, times["cascade"]),
        threshold=choice.threshold, expensive_share=choice.expensive_share,
        target_accuracy=choice.target_accuracy * 100.0)


def _run_all(runner: ModelRunner, inputs: Mapping[str, np.ndarray],
             batch: int = 64) -> dict[str, np.ndarray]:
    count = len(next(iter(inputs.values())))
    parts = [runner.run({k: v[i:i + batch] for k, v in inputs.items()})
             for i in range(0, count, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _time_rows(calls: Mapping[str, Any], inputs: Mapping[str, np.ndarray],
               rows: int) -> dict[str, list[float]]:
    """Each call timed on each row, one request at a time, the variants interleaved per row
    so that a burst of load elsewhere hits them alike."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(rows):
        feeds = {k: v[i:i + 1] for k, v in inputs.items()}
        for name, call in calls.items():
            started = time.perf_counter()
            call(feeds)
            out[name].append(time.perf_counter() - started)
    return out


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean() * 100.0)


def _figures(accuracy: float, seconds: list[float]) -> VariantFigures:
    ms = np.asarray(seconds) * 1000.0
    return VariantFigures(accuracy, float(ms.mean()), float(np.percentile(ms, 50)),
                          float(np.percentile(ms, 99)))

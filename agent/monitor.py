"""Sampled input and output statistics of one served model version, against its baseline.

:func:`monitor_plan` reads the bundle's ``baseline`` (written by the compressor:
docs/compressor.md) into a :class:`MonitorPlan`: per input its range and bins with the
baseline's counts pooled over features, per output its kind (``classes`` or ``values``)
with the baseline's class counts or value histogram. Whatever the baseline lacks or gets
wrong is left unmonitored rather than refused: a bundle's statistics never stop a model
from serving.

:class:`ModelMonitor` folds sampled requests into per-interval counts on the plan's bins
(constant memory: a few arrays of at most :data:`MAX_BINS` counts per tensor) and turns
them into the telemetry sample's ``monitor`` entry (docs/telemetry.md) with PSI and KS
against the baseline (:mod:`stats.drift`). Folding happens off the request path, on the
side runner's thread (:mod:`agent.side_runner`); the arithmetic is :mod:`stats`'.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stats.drift import ks_counts, psi_counts
from stats.histogram import range_counts
from stats.outputs import MAX_CLASSES, class_counts, confidence, entropy, rows

from .sessions import TensorInfo
from .side_runner import Request, batch_size

__all__ = ["FOLD_BATCH", "MAX_BINS", "MAX_TENSORS", "InputPlan", "ModelMonitor",
           "MonitorPlan", "OutputPlan", "monitor_plan"]

log = logging.getLogger(__name__)

#: At most this many bins (or classes) per reported histogram (the telemetry contract).
MAX_BINS = MAX_CLASSES
#: At most this many inputs and this many outputs are monitored per model.
MAX_TENSORS = 16
#: Sampled requests handed to the monitor together (fewer for large tensors:
#: :func:`~agent.side_runner.batch_size`).
FOLD_BATCH = 32


@dataclass(frozen=True)
class InputPlan:
    """One input's bins: ``bins`` equal bins over ``[low, high]`` (outside: end bins)."""

    name: str
    low: float
    high: float
    bins: int
    baseline: np.ndarray  # the baseline's counts pooled over features


@dataclass(frozen=True)
class OutputPlan:
    """One output: ``classes`` (predicted-class counts, confidence, entropy) or ``values``
    (a histogram over ``[low, high]``); ``baseline`` None when the bundle has none."""

    name: str
    kind: str
    bins: int  # classes, or value bins (0: values not binned, no baseline range)
    low: float = 0.0
    high: float = 1.0
    baseline: np.ndarray | None = None


@dataclass(frozen=True)
class MonitorPlan:
    """What to count for one model, from its bundle's baseline and its signature."""

    inputs: tuple[InputPlan, ...]
    outputs: tuple[OutputPlan, ...]


def monitor_plan(baseline: Mapping[str, Any], inputs: Sequence[TensorInfo],
                 outputs: Sequence[TensorInfo]) -> MonitorPlan:
    """The plan for a model with ``inputs`` and ``outputs`` from its bundle ``baseline``.

    Inputs are monitored when the baseline describes them (range, bins, per-feature
    histograms); outputs always, by the baseline's kind when it has one, else as
    ``classes`` for a float output of one score vector per sample (2 to
    :data:`MAX_BINS` classes) and ``values`` (no histogram, no baseline) otherwise.
    """
    described = _list(baseline.get("inputs"))
    by_input = {d["input"]: d for d in described
                if isinstance(d, Mapping) and isinstance(d.get("input"), str)}
    planned_inputs = []
    for info in inputs[:MAX_TENSORS]:
        entry = by_input.get(info.name)
        plan = _input_plan(info.name, entry) if entry is not None else None
        if plan is not None:
            planned_inputs.append(plan)
    declared = _list(baseline.get("outputs"))
    by_output = {d["output"]: d for d in declared
                 if isinstance(d, Mapping) and isinstance(d.get("output"), str)}
    planned_outputs = []
    for position, info in enumerate(outputs[:MAX_TENSORS]):
        entry = by_output.get(info.name)
        if entry is None and position < len(declared) and isinstance(declared[position],
                                                                     Mapping):
            entry = declared[position]  # a converted artifact may rename outputs; order kept
        planned_outputs.append(_output_plan(info, entry))
    return MonitorPlan(tuple(planned_inputs), tuple(planned_outputs))


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _input_plan(name: str, entry: Mapping[str, Any]) -> InputPlan | None:
    bounds = _range(entry)
    histograms = entry.get("histograms")
    bins = entry.get("bins")
    if bounds is None or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        log.info("input %s: baseline without a usable range and bins (at most %d); not "
                 "monitored", name, MAX_BINS)
        return None
    pooled = _pooled(histograms, bins)
    if pooled is None:
        log.info("input %s: baseline histograms do not have %d counts each; not monitored",
                 name, bins)
        return None
    return InputPlan(name, bounds[0], bounds[1], bins, pooled)


def _output_plan(info: TensorInfo, entry: Mapping[str, Any] | None) -> OutputPlan:
    if entry is not None and entry.get("kind") == "classes":
        classes = entry.get("classes")
        counts = _counts(entry.get("counts"), classes if isinstance(classes, int) else -1)
        if isinstance(classes, int) and classes >= 2:
            # More classes than a report holds: confidence and entropy only.
            return OutputPlan(info.name, "classes", classes if classes <= MAX_BINS else 0,
                              baseline=counts)
    if entry is not None and entry.get("kind") == "values":
        bounds, bins = _range(entry), entry.get("bins")
        if bounds is not None and isinstance(bins, int) and 1 <= bins <= MAX_BINS:
            return OutputPlan(info.name, "values", bins, bounds[0], bounds[1],
                              _counts(entry.get("counts"), bins))
    per_sample = [d for d in info.shape[1:] if d != 1]
    if (info.dtype.startswith("float") and len(per_sample) == 1 and per_sample[0] is not None
            and 2 <= per_sample[0] <= MAX_BINS):
        return OutputPlan(info.name, "classes", per_sample[0])
    return OutputPlan(info.name, "values", 0)


def _range(entry: Mapping[str, Any]) -> tuple[float, float] | None:
    bounds = entry.get("range")
    if (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and all(math.isfinite(b) for b in bounds) and bounds[1] > bounds[0]):
        return float(bounds[0]), float(bounds[1])
    return None


def _counts(value: object, length: int) -> np.ndarray | None:
    if (isinstance(value, list) and len(value) == length
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
        return np.array(value, dtype=np.int64)
    return None


def _pooled(histograms: object, bins: int) -> np.ndarray | None:
    if not isinstance(histograms, list) or not histograms:
        return None
    total = np.zeros(bins, dtype=np.int64)
    for histogram in histograms:
        counts = _counts(histogram, bins)
        if counts is None:
            return None
        total += counts
    return total


class ModelMonitor:
    """Per-interval statistics of one served model version (thread-safe).

    :meth:`handle` counts one sampled request (called off the request path; a
    :class:`~agent.side_runner.SideTask`); :meth:`report` returns the interval's
    ``monitor`` entry and starts the next interval.
    """

    def __init__(self, plan: MonitorPlan, version: int | None,
                 request_bytes: int = 0) -> None:
        self.plan = plan
        self.version = version
        #: Requests handed over together (:class:`~agent.side_runner.SideTask`), fewer
        #: when each request's tensors (``request_bytes``) are large.
        self.batch = batch_size(request_bytes, FOLD_BATCH)
        self._lock = threading.Lock()
        self._sampled = 0
        self._dropped = 0
        #: The ``drift`` entry of the last report (None before one with a baseline).
        self.last_drift: dict[str, Any] | None = None
        self._inputs = [np.zeros(p.bins, dtype=np.int64) for p in plan.inputs]
        self._outputs = [np.zeros(p.bins, dtype=np.int64) for p in plan.outputs]
        self._confidence = [0.0] * len(plan.outputs)
        self._entropy = [0.0] * len(plan.outputs)
        self._rows = [0] * len(plan.outputs)

    def dropped(self, count: int) -> None:
        """Sampled requests not folded: the side runner was busy."""
        with self._lock:
            self._dropped += count

    def handle(self, requests: Sequence[Request]) -> None:
        """Count sampled requests' inputs and outputs (a missing or odd tensor is skipped),
        all at once: numpy's cost per call, which dominates for small tensors, is paid once
        per batch (docs/benchmarks.md, monitoring)."""
        if requests:
            self._fold(requests)

    def _fold(self, batch: Sequence[Request]) -> None:
        input_counts = []
        for given in self.plan.inputs:
            values = [v.ravel() for v in (feeds.get(given.name) for feeds, _ in batch)
                      if v is not None and v.dtype.kind in "biuf"]
            input_counts.append(range_counts(np.concatenate(values), given.low, given.high,
                                             given.bins) if values else None)
        output_figures = [self._output_figures(out, [o[out.name] for _, o in batch
                                                     if out.name in o])
                          for out in self.plan.outputs]
        with self._lock:
            self._sampled += len(batch)
            for index, counts in enumerate(input_counts):
                if counts is not None:
                    self._inputs[index] += counts
            for index, figures in enumerate(output_figures):
                if figures is None:
                    continue
                counts, conf_sum, entropy_sum, count = figures
                if counts is not None:
                    self._outputs[index] += counts
                self._confidence[index] += conf_sum
                self._entropy[index] += entropy_sum
                self._rows[index] += count

    @staticmethod
    def _output_figures(plan: OutputPlan, values: list[np.ndarray],
                        ) -> tuple[np.ndarray | None, float, float, int] | None:
        usable = [v for v in values if v.dtype.kind in "biuf" and v.size]
        if not usable:
            return None
        if plan.kind == "classes":
            blocks = [rows(v) if v.ndim >= 2 else rows(v[None]) for v in usable]
            # Rows of another width than the first (a model answering oddly) are skipped.
            scores = np.concatenate([b for b in blocks if b.shape[1] == blocks[0].shape[1]])
            counts = class_counts(scores, plan.bins) if plan.bins else None
            return (counts, float(confidence(scores).sum()), float(entropy(scores).sum()),
                    len(scores))
        if not plan.bins:
            return None
        flat = np.concatenate([v.ravel() for v in usable])
        return range_counts(flat, plan.low, plan.high, plan.bins), 0.0, 0.0, 0

    def report(self) -> dict[str, Any]:
        """The interval's ``monitor`` entry (docs/telemetry.md); counts restart from zero."""
        with self._lock:
            sampled, self._sampled = self._sampled, 0
            dropped, self._dropped = self._dropped, 0
            inputs, self._inputs = self._inputs, [np.zeros_like(c) for c in self._inputs]
            outputs, self._outputs = self._outputs, [np.zeros_like(c) for c in self._outputs]
            conf, self._confidence = self._confidence, [0.0] * len(self._confidence)
            ent, self._entropy = self._entropy, [0.0] * len(self._entropy)
            counted, self._rows = self._rows, [0] * len(self._rows)
        drift: list[tuple[float, float, str]] = []
        input_entries = {}
        for given, counts in zip(self.plan.inputs, inputs, strict=True):
            psi, ks = psi_counts(given.baseline, counts), ks_counts(given.baseline, counts)
            input_entries[given.name] = {"counts": counts.tolist(), "psi": round(psi, 6),
                                         "ks": round(ks, 6)}
            drift.append((psi, ks, f"input:{given.name}"))
        output_entries = {}
        for index, out in enumerate(self.plan.outputs):
            counts = outputs[index]
            out_psi = (psi_counts(out.baseline, counts)
                       if out.baseline is not None and len(out.baseline) == len(counts)
                       else None)
            classes = out.kind == "classes" and counted[index] > 0
            output_entries[out.name] = {
                "kind": out.kind, "counts": counts.tolist(),
                "confidence_mean": round(conf[index] / counted[index], 6) if classes else None,
                "entropy_mean": round(ent[index] / counted[index], 6) if classes else None,
                "psi": None if out_psi is None else round(out_psi, 6)}
            if out_psi is not None:
                drift.append((out_psi, 0.0, f"output:{out.name}"))
        entry: dict[str, Any] = {"version": self.version, "sampled": sampled,
                                 "dropped": dropped, "inputs": input_entries,
                                 "outputs": output_entries}
        if drift:
            worst = max(drift, key=lambda d: d[0])
            entry["drift"] = {"psi": round(worst[0], 6),
                              "ks": round(max(d[1] for d in drift), 6), "worst": worst[2]}
            self.last_drift = entry["drift"]
        return entry

"""Candidate artifacts: built by passes, loaded, judged against the reference, or rejected.

A :class:`Pool` holds every candidate of one run with its loaded runner and measured quality.
:func:`build_candidate` runs one pass (upgrading the model's opset first when the pass asks
for a newer one), loads and judges the result and, while it loses more quality than the
budget allows, tries the pass's more conservative fallbacks. Whatever goes wrong while
building, loading or running one candidate makes it a :class:`Failure` with its reason; the
run goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import Binding, Dataset
from .errors import CompressorError
from .evaluate import Outputs, matched, run_dataset
from .metrics import Metric, Quality, judge
from .passes import ModelPass, PassContext, PassError, UpgradeOpset
from .passes.base import graph_facts
from .runner import ModelLoadError, ModelRunError, ModelRunner, open_runner

__all__ = ["Candidate", "Failure", "Judge", "Pool", "build_candidate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One artifact that was built, loaded and ran."""

    name: str
    dtype: str
    path: Path
    notes: tuple[str, ...]
    format: str = "onnx"
    # int8-full TFLite: each input's/output's dtype, scale and zero point (a runtime quantizes
    # float inputs and dequantizes outputs with them).
    io_quantization: dict[str, list[dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Failure:
    """A candidate that could not be built, loaded or run, and why."""

    name: str
    stage: str  # "build", "load" or "run"
    reason: str

    def to_json(self) -> dict[str, str]:
        """The report's form."""
        return {"name": self.name, "stage": self.stage, "reason": self.reason}


def stage_of(exc: CompressorError) -> str:
    """Which step of making a candidate an error belongs to."""
    if isinstance(exc, ModelLoadError):
        return "load"
    if isinstance(exc, ModelRunError):
        return "run"
    return "build"


@dataclass(frozen=True)
class Judge:
    """Runs a model over the evaluation data and scores it against the reference."""

    binding: Binding
    data: Dataset
    reference: Outputs
    metrics: Mapping[str, Metric]
    labels: Mapping[str, np.ndarray]
    threads: int = 1

    def __call__(self, runner: ModelRunner) -> Quality:
        """The quality of ``runner``'s outputs; raises ModelRunError when it fails or its
        outputs are not shaped like the reference's."""
        outputs = matched(run_dataset(runner, self.binding, self.data), self.reference)
        for name, want in self.reference.items():
            if outputs[name].shape != want.shape:
                # onnx2tf moves 3-D+ outputs to channels-last; a runtime would hand callers a
                # tensor in another layout than the model's, so the candidate is not offered.
                raise ModelRunError(f"output {name} has shape {list(outputs[name].shape[1:])} "
                                    f"per sample where the model's has {list(want.shape[1:])}"
                                    " (layout changed by the converter)")
        return judge(outputs, self.reference, self.metrics, self.labels)

    def load(self, path: Path) -> tuple[ModelRunner, Quality]:
        """Load ``path`` and judge it."""
        runner = open_runner(path, self.threads)
        return runner, self(runner)


@dataclass
class Pool:
    """The candidates built so far, their loaded runners and measured quality."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    runners: dict[str, ModelRunner] = field(default_factory=dict)
    quality: dict[str, Quality] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    # Which candidates (and failures) were built for CPUs with/without fast int8.
    by_reduce_range: dict[bool, list[str]] = field(default_factory=dict)
    tflite: list[str] = field(default_factory=list)  # for the profiles that want TFLite
    notes: list[str] = field(default_factory=list)  # for report.json and the CLI

    def add(self, candidate: Candidate, runner: ModelRunner, quality: Quality,
            reduce_ranges: list[bool]) -> None:
        """Record a candidate that built, loaded and ran."""
        self.candidates[candidate.name] = candidate
        self.runners[candidate.name] = runner
        self.quality[candidate.name] = quality
        self._file(candidate.name, candidate.format, reduce_ranges)

    def fail(self, failure: Failure, reduce_ranges: list[bool], fmt: str = "onnx") -> None:
        """Record a candidate that did not make it; it is rejected with its reason."""
        log.warning("%s not offered: %s failed: %s", failure.name, failure.stage,
                    failure.reason)
        self.failures[failure.name] = failure
        self._file(failure.name, fmt, reduce_ranges)

    def _file(self, name: str, fmt: str, reduce_ranges: list[bool]) -> None:
        for rr in reduce_ranges:
            self.by_reduce_range.setdefault(rr, []).append(name)
        if fmt == "tflite":
            self.tflite.append(name)

    def names_for(self, reduce_range: bool, tflite: bool) -> list[str]:
        """Candidates and failures built for a profile: ONNX ones for its reduce_range, and
        the TFLite ones when it wants TFLite."""
        return self.by_reduce_range.get(reduce_range, []) + (self.tflite if tflite else [])


def build_candidate(model_pass: ModelPass, source: Path, ctx: PassContext, judge_: Judge, *,
                    max_drop: float, name: str) -> tuple[Candidate, ModelRunner, Quality]:
    """Build ``model_pass`` on ``source``, load and judge it; fall back while over budget.

    Raises :class:`CompressorError` (PassError, ModelLoadError, ModelRunError) when the
    candidate cannot be made; the caller records it as a :class:`Failure`.
    """
    notes: tuple[str, ...] = ()
    if graph_facts(source).opset < model_pass.min_opset:
        upgraded = UpgradeOpset(model_pass.min_opset)(source, ctx)
        source, notes = upgraded.model, upgraded.notes
    result = model_pass(source, ctx)
    runner, quality = judge_.load(result.model)
    for fallback in model_pass.fallbacks(source):
        if quality.drop <= max_drop:
            break
        log.info("%s drop %.2f over budget; trying %s", name, quality.drop, fallback)
        try:
            retry = fallback(source, ctx)
            retry_runner, retry_quality = judge_.load(retry.model)
        except (PassError, ModelLoadError, ModelRunError) as exc:
            log.info("fallback of %s failed: %s", name, exc)
            continue
        result, runner, quality = retry, retry_runner, retry_quality
    candidate = Candidate(name, model_pass.dtype, result.model, (*notes, *result.notes))
    return candidate, runner, quality


def renamed(candidate: Candidate, name: str, notes: tuple[str, ...]) -> Candidate:
    """``candidate`` under another name, with ``notes`` before its own."""
    return replace(candidate, name=name, notes=(*notes, *candidate.notes))

"""One compression run's inputs, checked before any work: model, data, measures, profiles.

:func:`plan_job` reads the model's signature and the data files, binds the data to the
model's inputs (any number, any dtype, dynamic axes, state carried between calls), and
decides each output's quality measure; every problem is a one-line error here, before a
pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from firmware_profiles import Profile

from .dataset import Binding, Dataset, DatasetError, StatePair, bind, load_dataset
from .metrics import Metric, MetricError, infer_metric
from .runner import MODEL_SUFFIXES, ModelLoadError, Signature, read_signature

__all__ = ["CompressOptions", "Job", "Progress", "plan_job", "resolve_labels",
           "resolve_metrics"]

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CompressOptions:
    """Tunables of one compression run; defaults suit models up to hundreds of MB here."""

    max_accuracy_drop: float = 1.0  # quality points (compressor.metrics), worst output
    calibration_samples: int = 128  # model calls
    self_test_samples: int = 4
    latency_rounds: int = 5
    latency_iterations: int = 20  # per round, for models fast enough for the budget
    latency_budget_s: float = 4.0  # timed calls per candidate, about
    threads: int = 1
    # Share of hidden units/channels structured pruning removes; None builds no pruned
    # candidates (pruning without retraining costs accuracy, so it is opt-in).
    prune_channels: float | None = None
    # Quality measure per output name ("*": every scored output); the rest are inferred.
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    # Recurrent state: outputs that feed inputs of the next call; empty: inferred from names.
    state: tuple[StatePair, ...] = ()
    # report.json bounds: golden cases' tensor bytes (more go to self_test.npz), and the
    # drift baseline's features per input.
    self_test_budget_bytes: int = 512 * 2**10
    max_case_bytes: int = 8 * 2**20
    baseline_features: int = 256


@dataclass(frozen=True)
class Job:
    """Everything one run works from, checked."""

    model: Path
    source_format: str  # "onnx" or "tflite"
    profiles: list[Profile]
    signature: Signature
    binding: Binding
    calibration: Dataset
    evaluation: Dataset
    options: CompressOptions
    progress: Progress


def plan_job(model: Path, profiles: Sequence[Profile], calibration: Path | None,
             evaluation: Path | None, *, options: CompressOptions,
             progress: Progress | None) -> Job:
    """Read and check the model and data; raises DatasetError or ModelLoadError."""
    source_format = MODEL_SUFFIXES.get(model.suffix.lower())
    if source_format is None:
        raise ModelLoadError(f"{model}: the compressor takes an ONNX (.onnx) or TFLite "
                             "(.tflite) model; export the model to one of them first.")
    signature = read_signature(model)
    eval_data = load_dataset(evaluation, "eval") if evaluation else None
    if evaluation and eval_data is None:
        raise DatasetError(f"{evaluation}: no evaluation inputs (eval_x/<input>, eval_x or x); "
                           "see docs/compressor.md, 'Data files'.")
    calib_data = eval_data.head(options.calibration_samples) if eval_data else None
    if calibration is not None:
        calib_data = load_dataset(calibration, "calib")
        if calib_data is None:
            raise DatasetError(f"{calibration}: no calibration inputs (calib_x/<input>, "
                               "calib_x or x); see docs/compressor.md, 'Data files'.")
        calib_data = calib_data.head(options.calibration_samples)
    if calib_data is None:
        raise DatasetError("no data: pass --calibration DATA.npz and/or --eval DATA.npz "
                           "so candidates can be calibrated and checked for accuracy.")
    eval_data = eval_data or calib_data
    binding = bind(signature, eval_data, options.state)
    # The calibration data must bind the same way (same inputs, same state).
    bind(signature, calib_data, binding.state, infer_state=False)
    return Job(model, source_format, list(profiles), signature, binding, calib_data,
               eval_data, options, progress or (lambda step, total, what: None))


def resolve_metrics(signature: Signature, binding: Binding, reference: Mapping[str, np.ndarray],
                    chosen: Mapping[str, Metric]) -> dict[str, Metric]:
    """Each output's measure: as chosen by name, else ``*``, else inferred from its reference
    outputs. State outputs are not scored unless chosen by name."""
    names = [o.name for o in signature.outputs]
    unknown = sorted(set(chosen) - {*names, "*"})
    if unknown:
        raise MetricError(f"--metric names {', '.join(unknown)}, which the model does not "
                          f"output; its outputs: {', '.join(names)}.")
    state_outputs = {p.output for p in binding.state}
    metrics = {}
    for name in names:
        if name in chosen:
            metrics[name] = chosen[name]
        elif name in state_outputs:
            metrics[name] = Metric("none")
        elif "*" in chosen:
            metrics[name] = chosen["*"]
        else:
            values = reference[name]
            per_sample = list(values.shape[1:])
            if binding.sequences and per_sample:
                # One row per call: the call's own batch axis of one is not a feature axis.
                axis = signature.output_batch_axis(signature.outputs[names.index(name)])
                if axis < len(per_sample) and per_sample[axis] == 1:
                    del per_sample[axis]
            metrics[name] = infer_metric(name, tuple(per_sample), values.dtype)
    return metrics


def resolve_labels(data: Dataset, binding: Binding,
                   metrics: Mapping[str, Metric]) -> dict[str, np.ndarray]:
    """Labels by output name (the legacy ``eval_y`` goes to the first scored output), one row
    per sample, or per call for sequences (``[sequences, steps, ...]`` flattened)."""
    scored = [name for name, m in metrics.items() if m.kind != "none"]
    labels = {}
    for name, values in data.labels.items():
        target = name or (scored[0] if scored else "")
        if target not in metrics:
            raise DatasetError(f"{data.source}: labels eval_y/{name} name no model output; "
                               f"its outputs: {', '.join(metrics)}.")
        labels[target] = (values.reshape(-1, *values.shape[2:]) if binding.sequences
                          else values)
    return labels

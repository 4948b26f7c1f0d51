"""What ``edge-compress`` writes beside its artifacts: ``report.json``.

The report is the compressor's evidence (every candidate measured, every choice and
rejection with its reason, exact tool versions) and the bundle's source of truth: ``fleet
bundle build --artifacts DIR`` reads its ``variants``, ``profiles``, ``inputs``/``outputs``,
``self_test`` and ``baseline`` (docs/bundle-format.md, section 6), and the whole report
becomes the manifest's ``compression_report``, so both are sized by a budget
(:func:`cases_within_budget`, ``max_features``). Building the pieces is pure; only
:func:`tool_versions` looks at the environment.
"""

from __future__ import annotations

import base64
import importlib.metadata
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stats.histogram import range_counts
from stats.outputs import MAX_CLASSES, class_counts, confidence, entropy, rows

__all__ = ["CONFIDENCE_BINS", "cases_within_budget", "input_baseline", "output_baseline",
           "self_test_cases", "tensor_json", "tool_versions"]

#: Equal bins over [0, 1] of a classifier's confidence histogram.
CONFIDENCE_BINS = 10

_TOOLS = ("edgefleet", "onnx", "onnxruntime", "numpy", "ai-edge-litert", "tensorflow", "onnx2tf")


def tool_versions() -> dict[str, str]:
    """Exact versions of the tools that made the artifacts, and the machine they ran on."""
    versions = {"python": platform.python_version(), "machine": platform.machine()}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def tensor_json(array: np.ndarray) -> dict[str, Any]:
    """A tensor in the bundle manifest's form: dtype, shape, base64 of little-endian bytes."""
    data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<")))
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def self_test_cases(calls: Sequence[Mapping[str, np.ndarray]],
                    expected: Sequence[Mapping[str, np.ndarray]],
                    atol: float) -> list[dict[str, Any]]:
    """Golden cases, one model call each, that an installed artifact must reproduce within
    ``atol``: every input of the call, and every output the reference gave."""
    return [{"inputs": {name: tensor_json(value) for name, value in feeds.items()},
             "expected_outputs": {name: tensor_json(value) for name, value in outs.items()},
             "atol": atol, "rtol": 0.0} for feeds, outs in zip(calls, expected, strict=True)]


def cases_within_budget(calls: Sequence[Mapping[str, np.ndarray]],
                        expected: Sequence[Mapping[str, np.ndarray]], budget_bytes: int,
                        max_case_bytes: int) -> int:
    """How many leading golden cases report.json carries: as many as fit ``budget_bytes`` of
    tensor data, and always the first unless it alone exceeds ``max_case_bytes``."""
    total = 0
    for count, (feeds, outs) in enumerate(zip(calls, expected, strict=True)):
        size = sum(v.nbytes for v in feeds.values()) + sum(v.nbytes for v in outs.values())
        total += size
        if total > budget_bytes and not (count == 0 and size <= max_case_bytes):
            return count
    return len(calls)


def input_baseline(inputs: Mapping[str, np.ndarray], bins: int = 16,
                   max_features: int = 256) -> dict[str, Any]:
    """Statistics and histograms of representative inputs, for drift detection.

    ``inputs`` are by input name, one row per sample. Per input, each feature (an element of
    one sample; for inputs with more than ``max_features`` elements, one of ``max_features``
    contiguous groups of elements) gets mean, std and a histogram over the input's shared
    range, so a device can compare its live inputs bin by bin (e.g. with PSI) without the
    data itself. The first input's statistics are also the top-level keys (the single-input
    form); ``inputs`` lists every input's.
    """
    described = [_describe_input(name, values, bins, max_features)
                 for name, values in inputs.items()]
    return {**described[0], "inputs": described} if described else {}


def _describe_input(name: str, samples: np.ndarray, bins: int,
                    max_features: int) -> dict[str, Any]:
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    low, high = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0
    elements = flat.shape[1]
    groups = np.array_split(np.arange(elements), min(elements, max_features))
    values = [flat[:, group].ravel() for group in groups]
    return {"input": name, "samples": len(samples), "features": len(groups),
            "elements_per_feature": int(np.ceil(elements / max(1, len(groups)))),
            "range": [low, high], "bins": bins,
            "mean": [round(float(v.mean()), 6) for v in values],
            "std": [round(float(v.std()), 6) for v in values],
            "histograms": [range_counts(v, low, high, bins).tolist() for v in values]}


def output_baseline(outputs: Mapping[str, np.ndarray], metrics: Mapping[str, str],
                    bins: int = 16) -> list[dict[str, Any]]:
    """What the reference model answers on representative inputs, for output drift.

    ``outputs`` are by output name, one row per sample; ``metrics`` the quality measure
    kind of each (outputs measured ``none``, such as state, are left out). A classifier
    (``top1``) is described by its predicted-class counts (when it has at most
    :data:`~stats.outputs.MAX_CLASSES` classes), a confidence histogram over [0, 1] and
    the mean confidence and entropy; any other output by one histogram of all its values
    over their range, like an input's.
    """
    described = []
    for name, values in outputs.items():
        kind = metrics.get(name, "none")
        if kind == "none" or len(values) == 0:
            continue
        if kind == "top1":
            scores = rows(values)
            conf = confidence(scores)
            entry: dict[str, Any] = {
                "output": name, "kind": "classes", "samples": len(values),
                "classes": scores.shape[1],
                "confidence": {"range": [0.0, 1.0], "bins": CONFIDENCE_BINS,
                               "counts": range_counts(conf, 0.0, 1.0, CONFIDENCE_BINS).tolist()},
                "confidence_mean": round(float(conf.mean()), 6),
                "entropy_mean": round(float(entropy(scores).mean()), 6)}
            if scores.shape[1] <= MAX_CLASSES:
                entry["counts"] = class_counts(scores, scores.shape[1]).tolist()
        else:
            flat = values.astype(np.float64).ravel()
            flat = flat[np.isfinite(flat)]
            low, high = (float(flat.min()), float(flat.max())) if flat.size else (0.0, 1.0)
            high = high if high > low else low + 1.0
            entry = {"output": name, "kind": "values", "samples": len(values),
                     "range": [low, high], "bins": bins,
                     "counts": range_counts(flat, low, high, bins).tolist()}
        described.append(entry)
    return described

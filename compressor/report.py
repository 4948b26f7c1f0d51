"""What ``edge-compress`` writes beside its artifacts: ``report.json``.

The report is the compressor's evidence (every candidate measured, every choice and
rejection with its reason, exact tool versions) and the bundle's source of truth: ``fleet
bundle build --artifacts DIR`` reads its ``variants``, ``profiles``, ``inputs``/``outputs``,
``self_test`` and ``baseline`` (docs/bundle-format.md, section 6). Building the pieces is pure;
only :func:`tool_versions` looks at the environment.
"""

from __future__ import annotations

import base64
import importlib.metadata
import platform
from typing import Any

import numpy as np

__all__ = ["input_baseline", "self_test_cases", "tensor_json", "tool_versions"]

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


def self_test_cases(input_name: str, output_name: str, inputs: np.ndarray,
                    expected: np.ndarray, atol: float) -> list[dict[str, Any]]:
    """Golden cases, one sample each, that an installed artifact must reproduce within atol."""
    return [{"inputs": {input_name: tensor_json(inputs[i:i + 1])},
             "expected_outputs": {output_name: tensor_json(expected[i:i + 1])},
             "atol": atol, "rtol": 0.0} for i in range(len(inputs))]


def input_baseline(input_name: str, samples: np.ndarray, bins: int = 16) -> dict[str, Any]:
    """Per-feature statistics and histograms of representative inputs, for drift detection.

    Every feature (each element of one input sample) gets a histogram over the same range so
    a device can compare its live inputs bin by bin (e.g. with PSI) without the data itself.
    """
    flat = samples.reshape(len(samples), -1).astype(np.float64)
    low, high = float(flat.min()), float(flat.max())
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, bins + 1)
    counts = [np.histogram(flat[:, j], bins=edges)[0].tolist() for j in range(flat.shape[1])]
    return {"input": input_name, "samples": len(samples), "features": flat.shape[1],
            "range": [low, high], "bins": bins,
            "mean": np.round(flat.mean(axis=0), 6).tolist(),
            "std": np.round(flat.std(axis=0), 6).tolist(), "histograms": counts}

"""Measure a model file: accuracy on labelled data, agreement with a reference, latency.

The arithmetic (accuracy, agreement, percentiles) is pure and takes arrays; running a model
goes through a :class:`ModelRunner`, a thin adapter over onnxruntime or LiteRT, so the same
measurements apply to every artifact format the compressor emits.

Data files are ``.npz`` archives. Evaluation data is read from ``eval_x`` (and, when labels
exist, ``eval_y``), falling back to ``x``/``y``; calibration data from ``calib_x`` or ``x``.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bundle.quantization import Affine
from firmware_profiles.runtimes import import_litert

from .errors import CompressorError

__all__ = [
    "AgreementStats",
    "DatasetError",
    "EvalData",
    "LatencyStats",
    "ModelLoadError",
    "ModelRunner",
    "accuracy",
    "agreement",
    "load_eval_data",
    "measure_latency",
    "measure_latency_interleaved",
    "open_runner",
    "predict",
    "quantize",
    "read_npz",
    "summarize_latency",
]


class DatasetError(CompressorError):
    """A calibration or evaluation data file is missing, unreadable or of the wrong shape."""


class ModelLoadError(CompressorError):
    """A model file cannot be loaded by its runtime."""


@dataclass(frozen=True)
class EvalData:
    """Inputs and (optional) integer class labels for evaluation."""

    x: np.ndarray
    y: np.ndarray | None


@dataclass(frozen=True)
class LatencyStats:
    """Latency of single-sample inference, in milliseconds."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int


@dataclass(frozen=True)
class AgreementStats:
    """How closely a candidate's outputs follow a reference's on the same inputs."""

    top1: float  # fraction of samples with the same argmax
    cosine_mean: float  # mean cosine similarity of the output vectors
    max_abs_diff: float


class ModelRunner(Protocol):
    """One loaded model that maps a batch of inputs to a batch of outputs (first output)."""

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        """The model's declared input shape (symbolic dimensions as str or None)."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on ``batch`` and return its first output."""
        ...


def load_eval_data(path: Path) -> EvalData:
    """Read evaluation inputs and labels from an ``.npz`` file."""
    arrays = read_npz(path)
    x = arrays.get("eval_x", arrays.get("x"))
    if x is None:
        raise DatasetError(f"{path}: no 'eval_x' (or 'x') array; found {sorted(arrays)}. "
                           "Save the inputs under 'eval_x' and the labels under 'eval_y'.")
    y = arrays.get("eval_y", arrays.get("y"))
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DatasetError(f"{path}: labels have shape {y.shape} but inputs have {len(x)} "
                           "samples; labels must be a 1-D array with one class index per input.")
    return EvalData(x=x, y=y)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array in an ``.npz`` file, with one-line errors for missing or bad files."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: no such file; pass an existing .npz data file.") from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable .npz archive ({exc}); "
                           "write it with numpy.savez.") from exc


def open_runner(path: Path, threads: int = 1) -> ModelRunner:
    """Load ``path`` (``.onnx`` or ``.tflite``) on the CPU with ``threads`` intra-op threads."""
    loaders: dict[str, Callable[[Path, int], ModelRunner]] = {
        ".onnx": _OnnxRunner, ".tflite": _TfliteRunner}
    loader = loaders.get(path.suffix.lower())
    if loader is None:
        raise ModelLoadError(f"{path}: unknown model format '{path.suffix}'; "
                             f"expected one of {sorted(loaders)}.")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file.")
    return loader(path, threads)


class _OnnxRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare pybind11 errors for bad models
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {exc}") from exc
        model_input = self._session.get_inputs()[0]
        self._input_name: str = model_input.name
        self._input_shape = tuple(model_input.shape)

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        return self._input_shape

    def run(self, batch: np.ndarray) -> np.ndarray:
        outputs = self._session.run(None, {self._input_name: batch})
        return np.asarray(outputs[0])


class _TfliteRunner:
    def __init__(self, path: Path, threads: int) -> None:
        litert = import_litert()
        if litert is None:
            raise ModelLoadError(f"{path}: no LiteRT runtime is installed; "
                                 "install 'ai-edge-litert' to run .tflite models.")
        try:
            self._interpreter: Any = litert.interpreter.Interpreter(
                model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: LiteRT cannot load it: {exc}") from exc
        detail = self._interpreter.get_input_details()[0]
        output = self._interpreter.get_output_details()[0]
        self._input_index: int = detail["index"]
        self._input_shape = tuple(int(d) for d in detail["shape"])
        self._output_index: int = output["index"]
        self._batch = self._input_shape[0]
        # Full-integer models (int8-full) take and return integers: float inputs are
        # quantized with the input tensor's (scale, zero_point) and integer outputs
        # dequantized with the output's, as a device's runtime must do (docs/compressor.md).
        self._quantize = Affine.of(detail)
        self._dequantize = Affine.of(output)

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        return self._input_shape

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = _to_layout(batch, self._input_shape)
        if self._quantize is not None and batch.dtype.kind == "f":
            batch = self._quantize.quantize(batch)
        if batch.shape[0] != self._batch:
            # TFLite tensors have a fixed batch; resizing re-plans the interpreter's memory,
            # so it is done only when the batch size really changes.
            self._interpreter.resize_tensor_input(self._input_index, list(batch.shape))
            self._interpreter.allocate_tensors()
            self._batch = batch.shape[0]
        self._interpreter.set_tensor(self._input_index, batch)
        self._interpreter.invoke()
        result = self._interpreter.get_tensor(self._output_index)
        if self._dequantize is not None:
            return self._dequantize.dequantize(result)
        return np.array(result)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """Float values as an integer tensor with TFLite's affine quantization (scale, zero point).

    The rule a runtime must apply to feed float data to an int8-full model:
    ``q = clip(round_half_to_even(x / scale) + zero_point, dtype range)``.
    """
    affine = Affine.of({"dtype": np.dtype(dtype), "quantization": (scale, zero_point)})
    if affine is None:
        raise ValueError(f"cannot quantize to {dtype} with scale {scale}")
    return affine.quantize(np.asarray(x, dtype=np.float32))


def _to_layout(batch: np.ndarray, declared: tuple[int, ...]) -> np.ndarray:
    """Transpose NCHW data to NHWC when the model declares NHWC (TFLite's native layout)."""
    if batch.ndim == 4 and batch.shape[1:] != declared[1:]:
        nhwc = batch.transpose(0, 2, 3, 1)
        if nhwc.shape[1:] == declared[1:]:
            return np.ascontiguousarray(nhwc)
    return batch


def predict(runner: ModelRunner, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run ``x`` through ``runner`` in batches and return the concatenated outputs."""
    chunks = [runner.run(x[start:start + batch_size]) for start in range(0, len(x), batch_size)]
    return np.concatenate(chunks)


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy, in percent, of ``outputs`` (scores per class) against ``labels``."""
    if len(outputs) != len(labels):
        raise ValueError(f"{len(outputs)} outputs for {len(labels)} labels")
    return float(np.mean(np.argmax(outputs, axis=1) == labels) * 100.0)


def agreement(candidate: np.ndarray, reference: np.ndarray) -> AgreementStats:
    """Compare two output batches of the same shape, sample by sample."""
    if candidate.shape != reference.shape:
        raise ValueError(f"output shapes differ: {candidate.shape} vs {reference.shape}")
    a = candidate.reshape(len(candidate), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.divide(np.sum(a * b, axis=1), norms, out=np.ones(len(a)), where=norms > 0)
    return AgreementStats(
        top1=float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1))),
        cosine_mean=float(np.mean(cosine)),
        max_abs_diff=float(np.max(np.abs(a - b))) if a.size else 0.0,
    )


def summarize_latency(seconds: list[float]) -> LatencyStats:
    """Percentiles of per-call durations given in seconds."""
    if not seconds:
        raise ValueError("no latency samples")
    ms = np.asarray(seconds) * 1000.0
    return LatencyStats(p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
                        mean_ms=float(ms.mean()), iterations=len(seconds))


def measure_latency(runner: ModelRunner, sample: np.ndarray, warmup: int = 20,
                    iterations: int = 200) -> LatencyStats:
    """Time ``iterations`` single-sample calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        runner.run(sample)
    durations = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner.run(sample)
        durations.append(time.perf_counter() - start)
    return summarize_latency(durations)


def measure_latency_interleaved(runners: Mapping[str, ModelRunner], sample: np.ndarray,
                                rounds: int = 5, iterations: int = 20,
                                warmup: int = 10) -> dict[str, LatencyStats]:
    """Time several models in alternating rounds so machine noise hits them all alike.

    Comparing candidates measured one after another lets a burst of load elsewhere decide
    the winner; interleaving rounds and taking percentiles over all of them does not.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(sample)
    durations: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            for _ in range(iterations):
                start = time.perf_counter()
                runner.run(sample)
                durations[name].append(time.perf_counter() - start)
    return {name: summarize_latency(values) for name, values in durations.items()}

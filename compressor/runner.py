"""Model files behind one small interface: their signature, and one call at a time.

A :class:`ModelRunner` is a thin adapter over onnxruntime or LiteRT that takes every input
by name and returns every output by name, so the same measurements apply to every artifact
format the compressor emits. Foreign errors are translated here: loading raises
:class:`ModelLoadError`, running :class:`ModelRunError`, each naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bundle.quantization import Affine
from firmware_profiles.runtimes import import_litert

from .errors import CompressorError, first_line

__all__ = ["MODEL_SUFFIXES", "ModelLoadError", "ModelRunError", "ModelRunner", "Signature",
           "TensorInfo", "open_runner", "quantize", "read_signature"]

#: The model file formats the compressor reads, by file suffix.
MODEL_SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}


class ModelLoadError(CompressorError):
    """A model file cannot be read or loaded by its runtime."""


class ModelRunError(CompressorError):
    """A loaded model failed while running on the given inputs."""


Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """One declared input or output: name, numpy dtype name, shape (symbolic dims as str,
    unknown as None)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_json(self) -> dict[str, Any]:
        """The report's (and the bundle manifest's) form of a tensor spec."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def fixed_batch(self) -> int | None:
        """The leading dimension when it is a fixed size, else None (dynamic or no axes)."""
        first = self.shape[0] if self.shape else None
        return first if isinstance(first, int) and first > 0 else None


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in the model's order."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def input(self, name: str) -> TensorInfo:
        """The input called ``name`` (KeyError when there is none)."""
        return {i.name: i for i in self.inputs}[name]

    def output_batch_axis(self, output: TensorInfo) -> int:
        """The axis of ``output`` that follows the inputs' batch axis.

        The output dimension carrying the first input's symbolic batch name (exporters name
        dynamic axes consistently: a time-major sequence model's output is ``[T, batch, C]``),
        else axis 0.
        """
        first = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else None
        if isinstance(first, str):
            for axis, dim in enumerate(output.shape):
                if dim == first:
                    return axis
        return 0

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        """``{"inputs": [...], "outputs": [...]}`` as report.json carries them."""
        return {"inputs": [i.to_json() for i in self.inputs],
                "outputs": [o.to_json() for o in self.outputs]}


class ModelRunner(Protocol):
    """One loaded model that maps named inputs to named outputs."""

    @property
    def signature(self) -> Signature:
        """The model's declared inputs and outputs."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one call; raises :class:`ModelRunError` when the runtime fails."""
        ...


def read_signature(path: Path) -> Signature:
    """The declared inputs and outputs of an ``.onnx`` or ``.tflite`` file, without running it.

    ONNX files are read with onnx (no external data, no session); TFLite files with a LiteRT
    interpreter.
    """
    fmt = MODEL_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelLoadError(f"{path}: unknown model format '{path.suffix}'; the compressor "
                             f"takes {' or '.join(MODEL_SUFFIXES)} files.")
    if fmt == "tflite":
        return _TfliteRunner(path, 1).signature
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others for bad files
        raise ModelLoadError(f"{path}: not a readable ONNX model ({exc}).") from exc
    initializers = {init.name for init in proto.graph.initializer}

    def info(value: Any) -> TensorInfo:
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return TensorInfo(value.name, dtype, dims)

    return Signature(tuple(info(i) for i in proto.graph.input if i.name not in initializers),
                     tuple(info(o) for o in proto.graph.output))


def open_runner(path: Path, threads: int = 1) -> ModelRunner:
    """Load ``path`` (``.onnx`` or ``.tflite``) on the CPU with ``threads`` intra-op threads."""
    loaders: dict[str, Callable[[Path, int], ModelRunner]] = {
        "onnx": _OnnxRunner, "tflite": _TfliteRunner}
    fmt = MODEL_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelLoadError(f"{path}: unknown model format '{path.suffix}'; "
                             f"expected one of {sorted(MODEL_SUFFIXES)}.")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file.")
    return loaders[fmt](path, threads)


class _OnnxRunner:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._path = path
        try:
            self._session = ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare pybind11 errors for bad models
            raise ModelLoadError(f"{path}: onnxruntime cannot load it: {exc}") from exc

        def info(arg: Any) -> TensorInfo:
            dims = tuple(d if isinstance(d, (int, str)) else None for d in arg.shape)
            return TensorInfo(arg.name, _ORT_TYPES.get(arg.type, arg.type), dims)

        self._signature = Signature(tuple(info(i) for i in self._session.get_inputs()),
                                    tuple(info(o) for o in self._session.get_outputs()))
        self._output_names = [o.name for o in self._signature.outputs]

    @property
    def signature(self) -> Signature:
        return self._signature

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._session.run(None, dict(feeds))
        except Exception as exc:  # onnxruntime raises bare pybind11 errors
            raise ModelRunError(f"{self._path.name}: onnxruntime failed running it: "
                                f"{first_line(exc)}") from exc
        return {name: np.asarray(value)
                for name, value in zip(self._output_names, outputs, strict=True)}


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


@dataclass
class _TfliteTensor:
    index: int
    shape: tuple[int, ...]  # as currently allocated
    affine: Affine | None  # quantized I/O of a full-integer model


class _TfliteRunner:
    def __init__(self, path: Path, threads: int) -> None:
        litert = import_litert()
        if litert is None:
            raise ModelLoadError(f"{path}: no LiteRT runtime is installed; "
                                 "install 'ai-edge-litert' to run .tflite models.")
        self._path = path
        try:
            self._interpreter: Any = litert.interpreter.Interpreter(
                model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path}: LiteRT cannot load it: {exc}") from exc
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        # Full-integer models (int8-full) take and return integers: float inputs are
        # quantized with the input tensor's (scale, zero_point) and integer outputs
        # dequantized with the output's, as a device's runtime must do (docs/compressor.md).
        self._inputs = {str(d["name"]): _TfliteTensor(d["index"], tuple(d["shape"]),
                                                      Affine.of(d)) for d in inputs}
        self._outputs = {str(d["name"]): _TfliteTensor(d["index"], tuple(d["shape"]),
                                                       Affine.of(d)) for d in outputs}
        self._signature = Signature(tuple(_tflite_info(d) for d in inputs),
                                    tuple(_tflite_info(d) for d in outputs))

    @property
    def signature(self) -> Signature:
        return self._signature

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._run(feeds)
        except (ValueError, RuntimeError) as exc:
            raise ModelRunError(f"{self._path.name}: LiteRT failed running it: "
                                f"{first_line(exc)}") from exc

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        staged = []
        for position, (name, tensor) in enumerate(self._inputs.items()):
            # Converted artifacts carry the ONNX names; a feed keyed otherwise goes by order.
            value = feeds[name] if name in feeds else list(feeds.values())[position]
            value = _to_layout(np.asarray(value), tensor.shape)
            if tensor.affine is not None and value.dtype.kind == "f":
                value = tensor.affine.quantize(value)
            staged.append((tensor, value))
        resized = False
        for tensor, value in staged:
            if value.shape != tensor.shape:
                # TFLite tensors have a fixed shape; resizing re-plans the interpreter's
                # memory, so it is done only when a shape really changes.
                self._interpreter.resize_tensor_input(tensor.index, list(value.shape))
                tensor.shape = value.shape
                resized = True
        if resized:
            self._interpreter.allocate_tensors()
        for tensor, value in staged:
            self._interpreter.set_tensor(tensor.index, value)
        self._interpreter.invoke()
        results = {}
        for name, tensor in self._outputs.items():
            value = self._interpreter.get_tensor(tensor.index)
            results[name] = (tensor.affine.dequantize(value) if tensor.affine is not None
                             else np.array(value))
        return results


def _tflite_info(detail: dict[str, Any]) -> TensorInfo:
    signature = detail.get("shape_signature", detail["shape"])
    dims = tuple(None if int(d) < 0 else int(d) for d in signature)
    dtype = np.dtype(detail["dtype"]).name
    if Affine.of(detail) is not None:
        dtype = "float32"  # served with the float signature (see _TfliteRunner)
    return TensorInfo(str(detail["name"]), dtype, dims)


def _to_layout(batch: np.ndarray, declared: tuple[int, ...]) -> np.ndarray:
    """Transpose NCHW data to NHWC when the model declares NHWC (TFLite's native layout)."""
    if batch.ndim == 4 and len(declared) == 4 and batch.shape[1:] != tuple(declared[1:]):
        nhwc = batch.transpose(0, 2, 3, 1)
        if nhwc.shape[1:] == tuple(declared[1:]):
            return np.ascontiguousarray(nhwc)
    return batch


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """Float values as an integer tensor with TFLite's affine quantization (scale, zero point).

    The rule a runtime must apply to feed float data to an int8-full model:
    ``q = clip(round_half_to_even(x / scale) + zero_point, dtype range)``.
    """
    affine = Affine.of({"dtype": np.dtype(dtype), "quantization": (scale, zero_point)})
    if affine is None:
        raise ValueError(f"cannot quantize to {dtype} with scale {scale}")
    return affine.quantize(np.asarray(x, dtype=np.float32))

"""Inference sessions behind one small interface: onnxruntime and LiteRT, with CPU fallback.

:func:`open_session` is the only way the agent opens a model. It asks for the accelerators
the device's profile names (onnxruntime execution providers, LiteRT delegates) and falls
back to the CPU when one is missing or fails to load, saying why in ``Session.fallback``
rather than failing: a gateway whose NPU driver broke must keep serving on its CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bundle.quantization import Affine
from firmware_profiles.model import Accelerator
from firmware_profiles.runtimes import LiteRT, import_litert, load_delegate

from .errors import ModelLoadError

__all__ = ["LiteRTSession", "OnnxSession", "Session", "TensorInfo", "open_session", "warm_up"]

log = logging.getLogger(__name__)

_SMALL_MODEL_BYTES = 1 << 20
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: numpy dtype name and shape (None for a dynamic dimension)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        """E.g. ``input: float32[?, 1, 8, 8]``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class Session(Protocol):
    """An opened model: run it with named numpy arrays, get its outputs in order."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    #: What runs it, e.g. ``onnxruntime:CPUExecutionProvider`` or ``litert:xnnpack``.
    backend: str
    #: Why a preferred accelerator is not in use, or None.
    fallback: str | None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``outputs`` order. Raises on bad feeds (runtime-specific errors)."""
        ...


def open_session(path: Path, fmt: str, accelerators: Sequence[Accelerator] = (),
                 threads: int = 0) -> Session:
    """Open ``path`` (format ``onnx`` or ``tflite``) preferring ``accelerators`` of its runtime.

    ``threads`` = 0 lets the runtime choose (one thread for a model under 1 MB). Raises
    ModelLoadError when no runtime here can open the file at all.
    """
    if fmt == "onnx":
        return OnnxSession(path, [a for a in accelerators if a.runtime == "onnxruntime"],
                           threads)
    if fmt == "tflite":
        return LiteRTSession(path, [a for a in accelerators if a.runtime == "litert"],
                             threads)
    raise ModelLoadError(f"{path}: unknown model format {fmt!r}; the agent runs onnx and "
                         "tflite")


def warm_up(session: Session, feeds: Mapping[str, np.ndarray] | None, runs: int) -> str | None:
    """Run ``session`` ``runs`` times so the first request does not pay for lazy set-up.

    ``feeds`` are real inputs (a bundle's golden samples); without them the model gets
    zeros with every dynamic dimension set to 1, which some models reject (a reflect Pad
    over a length of 1): then warm-up is skipped, never fatal. Returns why it was skipped,
    or None.
    """
    if feeds is None:
        feeds = {i.name: np.zeros([1 if d is None else d for d in i.shape], dtype=i.dtype)
                 for i in session.inputs}
        try:
            session.run(feeds)
        except Exception as exc:  # the model's rule, not a fault: serve it cold
            reason = (f"warm-up skipped: the model rejects zeros with dynamic dimensions of 1 "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            log.info("%s", reason)
            return reason
        runs -= 1
    for _ in range(runs):
        session.run(feeds)
    return None


class OnnxSession:
    """An onnxruntime InferenceSession (thread-safe: concurrent ``run`` calls are fine)."""

    def __init__(self, path: Path, accelerators: Sequence[Accelerator], threads: int) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(f"{path}: onnxruntime is not installed; install the agent "
                                 "extra (pip install 'edgefleet[agent]')") from exc
        options = ort.SessionOptions()
        if threads == 0 and path.stat().st_size < _SMALL_MODEL_BYTES:
            # A tiny graph runs in tens of microseconds: splitting it across threads costs
            # more in hand-offs than it saves, and the pool's spinning workers would steal
            # the core the API threads need between requests (docs/benchmarks.md).
            threads = 1
        options.intra_op_num_threads = threads
        #: Intra-op threads asked of onnxruntime (0: one per core).
        self.threads = threads
        # Fatal only: load failures, fallbacks and request errors all surface as our exceptions
        # and log lines, so onnxruntime's own stderr output would only repeat them.
        options.log_severity_level = 4
        available = set(ort.get_available_providers())
        wanted = [a.provider for a in accelerators]
        missing = [p for p in wanted if p not in available]
        providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        reasons = [f"{p} is not available in this onnxruntime build" for p in missing]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # any EP failure means: try the CPU alone
            if providers == ["CPUExecutionProvider"]:
                raise ModelLoadError(f"{path}: onnxruntime cannot load the model ({exc}); "
                                     "the artifact is corrupt or needs a newer runtime") from exc
            reasons.append(f"{', '.join(providers[:-1])} failed to load the model "
                           f"({str(exc).splitlines()[0]})")
            try:
                session = ort.InferenceSession(str(path), options,
                                               providers=["CPUExecutionProvider"])
            except Exception as cpu_exc:
                raise ModelLoadError(f"{path}: onnxruntime cannot load the model "
                                     f"({cpu_exc})") from cpu_exc
        used = session.get_providers()
        reasons += [f"onnxruntime dropped {p}" for p in providers if p not in used
                    and p != "CPUExecutionProvider" and not any(p in r for r in reasons)]
        self.fallback = "; ".join(reasons) or None
        if self.fallback:
            log.warning("%s: running on the CPU: %s", path.name, self.fallback)
        self.backend = f"onnxruntime:{used[0]}"
        self.inputs = tuple(_ort_info(i) for i in session.get_inputs())
        self.outputs = tuple(_ort_info(o) for o in session.get_outputs())
        self._session = session
        self._output_names = [o.name for o in self.outputs]
        # The public InferenceSession.run re-derives the output names and re-checks the
        # feeds in Python on every call, about 1.5 us: a tenth of a small model's whole run.
        # Its C++ session (same arguments) checks the feeds itself, so call that when this
        # onnxruntime has it (docs/benchmarks.md, agent overhead).
        self._run = getattr(session, "_sess", session).run

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model; onnxruntime itself checks names, dtypes and shapes."""
        return self._run(self._output_names, feeds, None)  # type: ignore[no-any-return]


def _ort_info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    return TensorInfo(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)


class LiteRTSession:
    """A LiteRT interpreter. Interpreters are not thread-safe, so runs are serialised."""

    def __init__(self, path: Path, accelerators: Sequence[Accelerator], threads: int) -> None:
        litert = import_litert()
        if litert is None:
            raise ModelLoadError(f"{path}: no LiteRT runtime is installed; install "
                                 "ai-edge-litert (or tflite-runtime)")
        delegates, reasons, names = [], [], []
        for acc in accelerators:
            delegate, reason = _load_delegate(litert, acc)
            if delegate is None:
                reasons.append(reason)
            else:
                delegates.append(delegate)
                names.append(acc.provider)
        try:
            interpreter = _interpreter(litert.interpreter, path, delegates, threads)
        except (ValueError, RuntimeError) as exc:
            if not delegates:
                raise ModelLoadError(f"{path}: LiteRT cannot load the model ({exc}); the "
                                     "artifact is corrupt or needs a newer runtime") from exc
            reasons.append(f"{', '.join(names)} could not apply to the model ({exc})")
            names = []
            try:
                interpreter = _interpreter(litert.interpreter, path, [], threads)
            except (ValueError, RuntimeError) as cpu_exc:
                raise ModelLoadError(f"{path}: LiteRT cannot load the model "
                                     f"({cpu_exc})") from cpu_exc
        self.fallback = "; ".join(reasons) or None
        if self.fallback:
            log.warning("%s: running on the CPU: %s", path.name, self.fallback)
        self.backend = f"litert:{'+'.join(names) or 'xnnpack'}"
        self._interpreter = interpreter
        self._input_details = interpreter.get_input_details()
        self._output_details = interpreter.get_output_details()
        # A full-integer model (int8-full, for NPUs and the Edge TPU) takes and returns
        # integers; it is served as float, quantized on the way in and dequantized on the
        # way out, so apps, the bundle's signature and the self-test see one float model.
        self._quantize = [Affine.of(d) for d in self._input_details]
        self._dequantize = [Affine.of(d) for d in self._output_details]
        self.inputs = tuple(_litert_info(d, q is not None)
                            for d, q in zip(self._input_details, self._quantize, strict=True))
        self.outputs = tuple(_litert_info(d, q is not None)
                             for d, q in zip(self._output_details, self._dequantize,
                                             strict=True))
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model, resizing dynamic dimensions to the feeds' shapes when they change."""
        unknown = set(feeds) - {i.name for i in self.inputs}
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}")
        with self._lock:
            resized = False
            for detail, info in zip(self._input_details, self.inputs, strict=True):
                value = feeds[info.name]
                if value.dtype != np.dtype(info.dtype):
                    raise ValueError(f"input {info.name} is {value.dtype}, not {info.dtype}")
                if tuple(detail["shape"]) != value.shape:
                    self._interpreter.resize_tensor_input(detail["index"], list(value.shape),
                                                          strict=True)
                    resized = True
            if resized:
                self._interpreter.allocate_tensors()
                self._input_details = self._interpreter.get_input_details()
                self._output_details = self._interpreter.get_output_details()
            for detail, info, affine in zip(self._input_details, self.inputs, self._quantize,
                                            strict=True):
                value = feeds[info.name]
                self._interpreter.set_tensor(detail["index"], value if affine is None
                                             else affine.quantize(value))
            self._interpreter.invoke()
            return [self._interpreter.get_tensor(d["index"]) if affine is None
                    else affine.dequantize(self._interpreter.get_tensor(d["index"]))
                    for d, affine in zip(self._output_details, self._dequantize, strict=True)]


def _interpreter(module: Any, path: Path, delegates: list[Any], threads: int) -> Any:
    interpreter = module.Interpreter(model_path=str(path), experimental_delegates=delegates,
                                     num_threads=threads or None)
    interpreter.allocate_tensors()
    return interpreter


def _load_delegate(litert: LiteRT, acc: Accelerator) -> tuple[Any, str]:
    """The loaded delegate, or None and why not."""
    if not acc.library:
        return None, f"{acc.provider} has no delegate library to load"
    delegate, reason = load_delegate(litert, acc.library)
    return delegate, f"{acc.provider} delegate {reason}"


def _litert_info(detail: Mapping[str, Any], served_as_float: bool) -> TensorInfo:
    signature = detail.get("shape_signature", detail["shape"])
    shape = tuple(None if int(d) < 0 else int(d) for d in signature)
    dtype = "float32" if served_as_float else np.dtype(detail["dtype"]).name
    return TensorInfo(str(detail["name"]), dtype, shape)

"""Inference sessions behind one small interface: onnxruntime and LiteRT, with CPU fallback.

:func:`open_session` is the only way the agent opens a model. It asks for the accelerators
the device's profile names (onnxruntime execution providers, LiteRT delegates) and falls
back to the CPU when one is missing or fails to load, saying why in ``Session.fallback``
rather than failing: a gateway whose NPU driver broke must keep serving on its CPU.

For onnxruntime the device is checked, not assumed (:mod:`firmware_profiles.devices`): an
accelerator is asked for only when its device is present here, with the provider options
that select it (OpenVINO's ``device_type``, CUDA's ``device_id``), and proved with one
run of zeros before the session is used; ``Session.device`` says what actually runs it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bundle.quantization import Affine
from firmware_profiles.devices import (
    CUDA_PROVIDERS,
    OPENVINO,
    device_present,
    probe_devices,
    provider_options,
    wanted_device,
)
from firmware_profiles.model import Accelerator
from firmware_profiles.runtimes import LiteRT, import_litert, load_delegate

from .errors import ModelLoadError

__all__ = ["LiteRTSession", "OnnxSession", "Session", "TensorInfo", "open_session", "warm_up",
           "zero_feeds"]

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
    #: The device the model actually runs on: ``cpu``, OpenVINO's ``NPU``/``GPU``/``CPU``,
    #: ``cuda:0``, a LiteRT delegate's name.
    device: str

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


def zero_feeds(inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    """Zeros for every input, each dynamic dimension set to 1: the smallest run there is."""
    return {i.name: np.zeros([1 if d is None else d for d in i.shape], dtype=i.dtype)
            for i in inputs}


def warm_up(session: Session, feeds: Mapping[str, np.ndarray] | None, runs: int) -> str | None:
    """Run ``session`` ``runs`` times so the first request does not pay for lazy set-up.

    ``feeds`` are real inputs (a bundle's golden samples); without them the model gets
    zeros with every dynamic dimension set to 1, which some models reject (a reflect Pad
    over a length of 1): then warm-up is skipped, never fatal. Returns why it was skipped,
    or None.
    """
    if feeds is None:
        feeds = zero_feeds(session.inputs)
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
        chosen, reasons = _usable(accelerators, tuple(ort.get_available_providers()))
        providers: list[Any] = [(a.provider, provider_options(a)) for a in chosen]
        try:
            session = ort.InferenceSession(str(path), options,
                                           providers=[*providers, "CPUExecutionProvider"])
        except Exception as exc:  # any EP failure means: try the CPU alone
            if not chosen:
                raise ModelLoadError(f"{path}: onnxruntime cannot load the model ({exc}); "
                                     "the artifact is corrupt or needs a newer runtime") from exc
            reasons.append(f"{_names(chosen)} failed to load the model "
                           f"({str(exc).splitlines()[0]})")
            session, chosen = _cpu_session(ort, path, options), []
        if chosen:
            # Prove the device with the smallest run before any request depends on it.
            failure = _first_run_fails(session)
            if failure is not None:
                cpu = _cpu_session(ort, path, options)
                if _first_run_fails(cpu) is None:
                    reasons.append(f"{_names(chosen)} failed its first run ({failure})")
                    session, chosen = cpu, []
                else:  # the model refuses zeros wherever it runs: nothing learned
                    log.info("%s: zeros cannot prove the device (%s)", path.name, failure)
        used = session.get_providers()
        reasons += [f"onnxruntime dropped {a.provider}" for a in chosen
                    if a.provider not in used]
        self.fallback = "; ".join(reasons) or None
        if self.fallback:
            log.warning("%s: %s", path.name, self.fallback)
        self.backend = f"onnxruntime:{used[0]}"
        self.device = _ort_device(used[0], session.get_provider_options())
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


def _usable(accelerators: Sequence[Accelerator], available: tuple[str, ...],
            ) -> tuple[list[Accelerator], list[str]]:
    """The accelerators whose provider this onnxruntime has and whose device is present
    here, and why each other one is not used."""
    devices = _probed_devices(tuple(sorted(available)))
    chosen, reasons = [], []
    for acc in accelerators:
        if acc.provider not in available:
            reasons.append(f"{acc.provider} is not available in this onnxruntime build")
            continue
        present, why = device_present(acc, devices)
        if not present:
            reasons.append(why)
            continue
        chosen.append(acc)
    return chosen, reasons


@functools.lru_cache(maxsize=4)
def _probed_devices(providers: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    # Probed once per process: asking OpenVINO or the CUDA driver takes up to a second.
    return probe_devices(providers)


def _names(accelerators: Sequence[Accelerator]) -> str:
    return ", ".join(f"{a.provider} ({wanted_device(a) or a.name})" for a in accelerators)


def _cpu_session(ort: Any, path: Path, options: Any) -> Any:
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"{path}: onnxruntime cannot load the model ({exc})") from exc


def _first_run_fails(session: Any) -> str | None:
    """Why the smallest run of ``session`` fails, or None if it runs."""
    try:
        session.run(None, zero_feeds([_ort_info(i) for i in session.get_inputs()]))
    except Exception as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _ort_device(provider: str, options: Mapping[str, Mapping[str, str]]) -> str:
    """The device behind onnxruntime's first provider, from the options it applied."""
    applied = options.get(provider, {})
    if provider == OPENVINO:
        return applied.get("device_type") or "CPU"  # OpenVINO's default device
    if provider in CUDA_PROVIDERS:
        return f"cuda:{applied.get('device_id', '0')}"
    if provider == "CPUExecutionProvider":
        return "cpu"
    return provider.removesuffix("ExecutionProvider").lower()


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
        self.device = "+".join(names) or "cpu"
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

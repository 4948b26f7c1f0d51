"""TFLite artifacts: ONNX -> TensorFlow SavedModel (onnx2tf) -> ``.tflite`` (TF's converter).

onnx2tf rewrites the ONNX graph as TensorFlow ops in TensorFlow's native layout (NHWC for
images) and saves a SavedModel; TensorFlow's own TFLite converter then makes each variant from
that one SavedModel:

- ``tflite-fp32``: float32 throughout (the format's latency baseline);
- ``tflite-fp16``: float16 weights, dequantized to float32 at load on CPUs (GPU/NNAPI
  delegates can compute in half precision);
- ``tflite-int8-dynamic``: dynamic-range quantization, int8 weights and float activations
  quantized on the fly by the kernels; float32 inputs and outputs;
- ``tflite-int8-static``: integer quantization calibrated on the calibration data, int8
  activations, float32 inputs and outputs (a QUANTIZE/DEQUANTIZE at each end); ops without an
  int8 kernel fall back to float;
- ``tflite-int8-full``: every tensor integer, inputs and outputs included (Edge TPU, most
  NPUs); the caller quantizes inputs with the input tensor's (scale, zero_point) and
  dequantizes outputs with the output's, recorded in :attr:`TfliteArtifact.io_quantization`
  (``compressor.evaluate.quantize`` is the rule).

Layout: the model's input keeps the ONNX layout (NCHW for images; onnx2tf's
``keep_ncw_or_nchw_or_ncdhw_input_names``) so every artifact takes the tensors the ONNX model
takes, and a Transpose to NHWC is the first op inside. Input and output tensors are renamed to
the ONNX names (TF's converter calls them ``serving_default_input:0`` / ``PartitionedCall:0``),
so callers feed and read them by the same names as the ONNX artifact.

The conversion runs in a child process (``compressor.passes.tflite_worker``): TensorFlow
takes seconds and over a gigabyte to load, prints C++ log lines straight to the process's
file descriptors (which would corrupt ``edge-compress --json``), starts thread pools that
would share the CPU with the latency measurements, and onnx2tf ends the process with
``sys.exit`` on models it cannot convert. A child keeps all of that out of the compressor.

TensorFlow and onnx2tf are optional (the ``tflite`` extra, about 2 GB);
:func:`tflite_unavailable` says cheaply whether they are installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.dataset import save_calls

from .base import PassContext, PassError, PreconditionError, graph_facts

__all__ = ["INSTALL_HINT", "TFLITE_VARIANTS", "ConvertTflite", "TfliteArtifact", "TfliteBuild",
           "TfliteUnavailableError", "run_worker", "tflite_unavailable", "to_onnx"]

log = logging.getLogger(__name__)

INSTALL_HINT = "install edgefleet[tflite] for TFLite artifacts"

#: Candidate name -> the profile dtype it serves, in build order.
TFLITE_VARIANTS: dict[str, str] = {
    "tflite-fp32": "fp32",
    "tflite-fp16": "fp16",
    "tflite-int8-dynamic": "int8",
    "tflite-int8-static": "int8",
    "tflite-int8-full": "int8-full",
}

# What the conversion imports; onnx2tf declares none of its own dependencies.
_MODULES = ("tensorflow", "tf_keras", "onnx2tf", "onnx_graphsurgeon", "sng4onnx", "psutil",
            "tf2onnx")
# The worker's exit status when TensorFlow/onnx2tf do not import.
EXIT_UNAVAILABLE = 3
# A conversion that takes longer is hung (the digits model takes seconds, a 20 MB
# transformer well under a minute).
_TIMEOUT_S = 1800


class TfliteUnavailableError(PassError):
    """TensorFlow or onnx2tf is not installed (or does not import)."""


def tflite_unavailable() -> str | None:
    """Why TFLite artifacts cannot be built here, or None when the converter is installed.

    Looks the modules up without importing them: importing TensorFlow takes seconds.
    """
    missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed; {INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class TfliteArtifact:
    """One converted variant: its file and what the conversion did."""

    name: str
    dtype: str
    path: Path
    notes: tuple[str, ...]
    # For int8-full: how each input/output maps to float, {"inputs": [...], "outputs": [...]}
    # with name, dtype, scale, zero_point per tensor; None for float-I/O variants.
    io_quantization: dict[str, list[dict[str, Any]]] | None = None


@dataclass(frozen=True)
class TfliteBuild:
    """What one conversion produced: the variants built, and why the others were not."""

    artifacts: tuple[TfliteArtifact, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> reason


@dataclass(frozen=True)
class ConvertTflite:
    """Convert an ONNX model into the TFLite ``variants`` (names from TFLITE_VARIANTS)."""

    variants: tuple[str, ...] = tuple(TFLITE_VARIANTS)
    name: str = "tflite"

    def requires(self, ctx: PassContext) -> None:
        """Raise :class:`PreconditionError` for unknown variants or missing calibration."""
        unknown = sorted(set(self.variants) - set(TFLITE_VARIANTS))
        if unknown:
            raise PreconditionError(f"unknown TFLite variant(s) {', '.join(unknown)}; "
                                    f"use {', '.join(TFLITE_VARIANTS)}")
        needs_calibration = {"tflite-int8-static", "tflite-int8-full"} & set(self.variants)
        if needs_calibration and not ctx.calibration:
            raise PreconditionError(f"{', '.join(sorted(needs_calibration))} need calibration "
                                    "data; pass --calibration DATA.npz with representative "
                                    "inputs")

    def build(self, model: Path, ctx: PassContext) -> TfliteBuild:
        """Convert ``model`` once to a SavedModel, then make each variant from it.

        The TFLite inputs and outputs get the ONNX model's names. Raises
        :class:`TfliteUnavailableError` when TensorFlow/onnx2tf are missing and
        :class:`PassError` when onnx2tf cannot convert the model (then no variant can exist);
        a single variant that fails (say, an op without an int8 kernel for int8-full) is left
        out, with its reason in :attr:`TfliteBuild.skipped`.
        """
        self.requires(ctx)
        facts = graph_facts(model)
        workdir = ctx.workdir / "tflite"
        workdir.mkdir(parents=True, exist_ok=True)
        request: dict[str, Any] = {
            "task": "to_tflite", "model": str(model), "workdir": str(workdir),
            "input_names": [name for name, _ in facts.inputs],
            "output_names": [name for name, _ in facts.outputs],
            "variants": list(self.variants), "calibration": None}
        if ctx.calibration:
            request["calibration"] = str(save_calls(ctx.calibration,
                                                    workdir / "calibration.npz"))
        result = run_worker(request, workdir)
        artifacts = tuple(TfliteArtifact(a["name"], a["dtype"], Path(a["path"]),
                                         tuple(a["notes"]), a["io_quantization"])
                          for a in result["artifacts"])
        skipped = dict(result["skipped"])
        for variant, reason in skipped.items():
            log.warning("%s: %s not built: %s", model.name, variant, reason)
        return TfliteBuild(artifacts, skipped)


def to_onnx(model: Path, workdir: Path) -> tuple[Path, tuple[str, ...]]:
    """An ONNX translation of the TFLite file ``model`` (tf2onnx, in the converter's child
    process), and notes on it; raises :class:`PassError` when it cannot be made."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_worker({"task": "to_onnx", "model": str(model), "workdir": str(workdir)},
                        workdir)
    return Path(result["path"]), tuple(result["notes"])


def run_worker(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run a conversion in a child process; its output goes to ``converter.log``."""
    model = Path(request["model"])
    (workdir / "request.json").write_text(json.dumps(request), encoding="utf-8")
    env = dict(os.environ)
    # Quiet what TensorFlow lets us quiet, and let the child import this package even when it
    # runs from a source tree rather than an installed distribution.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    log_path = workdir / "converter.log"
    try:
        with log_path.open("wb") as sink:
            done = subprocess.run(
                [sys.executable, "-m", "compressor.passes.tflite_worker",
                 str(workdir / "request.json")],
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env,
                timeout=_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PassError(f"{model}: the conversion did not finish within {_TIMEOUT_S} s"
                        ) from exc
    if done.returncode == EXIT_UNAVAILABLE:
        raise TfliteUnavailableError(f"TensorFlow/onnx2tf cannot be imported "
                                     f"({_tail(log_path, 1)}); {INSTALL_HINT}")
    result_path = workdir / "result.json"
    if done.returncode != 0 or not result_path.is_file():
        raise PassError(f"{model}: the conversion failed (exit status {done.returncode}; "
                        f"converter output ends: {_tail(log_path)})")
    result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8"))
    return result


def _tail(log_path: Path, lines: int = 3) -> str:
    """The last non-empty lines of the converter's output, for error messages."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "nothing"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-500:] or "nothing"

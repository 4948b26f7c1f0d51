"""int8 quantization passes, dynamic and static (QDQ with calibration).

Dynamic quantization stores int8 weights and quantizes activations at run time: no data
needed, and on MatMul-heavy models it is what onnxruntime users reach for first. Static QDQ
quantizes activations too, with ranges from calibration data: faster on convolutions (ORT's
dynamic ConvInteger is slow), at some accuracy risk, which is why it can leave named
sensitive nodes in float (``exclude``), the accuracy gate's fallback.

On CPUs without VNNI/dotprod, int8 products are accumulated in 16 bits and can saturate;
``reduce_range`` (7-bit weights) avoids that, at a small accuracy cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import PassContext, PassError, PassResult

__all__ = ["CALIBRATION_METHODS", "QuantizeDynamic", "QuantizeStatic"]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Static int8 pays off where the arithmetic is; quantizing normalisation or element-wise ops
# adds quantize/dequantize pairs and error for no speed (and LayerNorm's rank-1 weights have
# no channel axis to quantize per channel).
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantizeDynamic:
    """onnxruntime ``quantize_dynamic``: int8 weights, activations quantized at run time."""

    per_channel: bool = False
    name: str = "int8-dynamic"

    def run(self, model: Path, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import quantize_dynamic

        out = ctx.workdir / f"{model.stem}.{self.name}.onnx"
        try:
            quantize_dynamic(str(model), str(out), per_channel=self.per_channel,
                             reduce_range=not ctx.fast_int8)
        except Exception as exc:  # the quantizer raises assorted errors on odd graphs
            raise PassError(f"{model}: dynamic quantization failed: {exc}") from exc
        return PassResult(out, modified=True, notes=(
            f"per_channel={self.per_channel}", f"reduce_range={not ctx.fast_int8}"))


class _Reader:
    """Feeds calibration samples one at a time, as onnxruntime's calibrators expect."""

    def __init__(self, input_name: str, samples: np.ndarray) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: samples[i:i + 1]} for i in range(len(samples)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@dataclass(frozen=True)
class QuantizeStatic:
    """onnxruntime ``quantize_static`` in QDQ format, per-channel weights, calibrated."""

    method: str = "minmax"
    exclude: tuple[str, ...] = ()  # node names kept in float (accuracy fallback)
    name: str = "int8-static"

    def run(self, model: Path, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise PassError("static quantization needs calibration data; pass --calibration "
                            "DATA.npz with representative inputs")
        if self.method not in CALIBRATION_METHODS:
            raise PassError(f"unknown calibration method '{self.method}'; "
                            f"use one of {', '.join(CALIBRATION_METHODS)}")
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        out = ctx.workdir / f"{model.stem}.{self.name}-{self.method}-x{len(self.exclude)}.onnx"
        try:
            quantize_static(str(model), str(out), _Reader(ctx.input_name, ctx.calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=not ctx.fast_int8, calibrate_method=method,
                            nodes_to_exclude=list(self.exclude),
                            op_types_to_quantize=list(STATIC_OP_TYPES))
        except Exception as exc:  # calibration and quantization raise assorted errors
            raise PassError(f"{model}: static quantization failed: {exc}") from exc
        notes = [f"calibration={self.method} on {len(ctx.calibration)} samples",
                 f"reduce_range={not ctx.fast_int8}"]
        if self.exclude:
            notes.append(f"kept in float: {', '.join(self.exclude)}")
        return PassResult(out, modified=True, notes=tuple(notes))

"""int8 quantization passes, dynamic and static (QDQ with calibration).

Dynamic quantization stores int8 weights and quantizes activations at run time: no data
needed, and on MatMul-heavy models it is what onnxruntime users reach for first. Static QDQ
quantizes activations too, with ranges from calibration data: faster on convolutions (ORT's
dynamic ConvInteger is slow), at some accuracy risk, which is why it can leave named
sensitive nodes in float (``exclude``) and offers those more conservative versions of itself
as :meth:`QuantizeStatic.fallbacks`.

On CPUs without VNNI/dotprod, int8 products are accumulated in 16 bits and can saturate;
``reduce_range`` (7-bit weights) avoids that, at a small accuracy cost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .base import (
    Feeds,
    ModelPass,
    PassContext,
    PassError,
    PassResult,
    PreconditionError,
    graph_facts,
)

__all__ = ["CALIBRATION_METHODS", "QuantizeDynamic", "QuantizeStatic"]

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Static int8 pays off where the arithmetic is; quantizing normalisation or element-wise ops
# adds quantize/dequantize pairs and error for no speed (and LayerNorm's rank-1 weights have
# no channel axis to quantize per channel).
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantizeDynamic(ModelPass):
    """onnxruntime ``quantize_dynamic``: int8 weights, activations quantized at run time."""

    per_channel: bool = False
    name: str = "int8-dynamic"
    dtype = "int8"
    # The quantizer's fusions need opset 11 (it would upgrade older models itself, warning).
    min_opset = 11

    def call(self, model: Path, ctx: PassContext) -> PassResult:
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
    """Feeds calibration calls one at a time, as onnxruntime's calibrators expect."""

    def __init__(self, calls: Sequence[Feeds], names: set[str]) -> None:
        # Only the graph's inputs: a model whose inputs the preparation changed (or a feed
        # carrying extras) would otherwise fail inside the calibrator.
        self._calls: Iterator[dict[str, object]] = (
            {k: v for k, v in call.items() if k in names} for call in calls)

    def get_next(self) -> dict[str, object] | None:
        return next(self._calls, None)


@dataclass(frozen=True)
class QuantizeStatic(ModelPass):
    """onnxruntime ``quantize_static`` in QDQ format, per-channel weights, calibrated."""

    method: str = "minmax"
    exclude: tuple[str, ...] = ()  # node names kept in float (accuracy fallback)
    name: str = "int8-static"
    dtype = "int8"
    # Per-channel QuantizeLinear/DequantizeLinear (the axis attribute) is opset 13.
    min_opset = 13

    def requires(self, model: Path, ctx: PassContext) -> None:
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise PreconditionError("static quantization needs calibration data; pass "
                                    "--calibration DATA.npz with representative inputs")
        if self.method not in CALIBRATION_METHODS:
            raise PreconditionError(f"unknown calibration method '{self.method}'; "
                                    f"use one of {', '.join(CALIBRATION_METHODS)}")
        super().requires(model, ctx)

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        assert ctx.calibration is not None  # requires() checked it
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[self.method]
        out = ctx.workdir / f"{model.stem}.{self.name}-{self.method}-x{len(self.exclude)}.onnx"
        names = {name for name, _ in graph_facts(model).inputs}
        try:
            quantize_static(str(model), str(out), _Reader(ctx.calibration, names),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=not ctx.fast_int8, calibrate_method=method,
                            nodes_to_exclude=list(self.exclude),
                            op_types_to_quantize=list(STATIC_OP_TYPES))
        except Exception as exc:  # calibration and quantization raise assorted errors
            raise PassError(f"{model}: static quantization failed: {exc}") from exc
        notes = [f"calibration={self.method} on {len(ctx.calibration)} calls",
                 f"reduce_range={not ctx.fast_int8}"]
        if self.exclude:
            notes.append(f"kept in float: {', '.join(self.exclude)}")
        return PassResult(out, modified=True, notes=tuple(notes))

    def fallbacks(self, model: Path) -> tuple[ModelPass, ...]:
        """The first and last weight layer kept in float, then the first and last two.

        Those are the usual int8 casualties: the layer reading raw inputs, and the one
        producing logits whose small margins decide the top-1.
        """
        weights = graph_facts(model).weight_nodes
        return tuple(replace(self, exclude=(*weights[:keep], *weights[-keep:]))
                     for keep in (1, 2) if len(weights) > 2 * keep)

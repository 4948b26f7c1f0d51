"""fp16 conversion: half-precision weights and compute, float32 inputs and outputs.

For GPUs and NPUs (Jetson, Intel NPU) fp16 halves size and is usually faster; on CPUs it is
usually slower than fp32, which the compressor's latency measurement then shows. I/O stays
float32 so callers do not change, and ops known to lose accuracy in half precision are kept
in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import ModelPass, PassContext, PassError, PassResult

__all__ = ["FP16_SENSITIVE_OPS", "ConvertFp16"]

# Reductions and exponentials over many elements overflow or lose precision in fp16.
FP16_SENSITIVE_OPS = ("Softmax", "LayerNormalization", "ReduceMean", "ReduceSum", "Exp", "Pow",
                      "Sqrt", "Erf", "Resize", "Range")


@dataclass(frozen=True)
class ConvertFp16(ModelPass):
    """Convert weights and compute to fp16, keeping I/O types and sensitive ops in fp32."""

    block_list: tuple[str, ...] = FP16_SENSITIVE_OPS
    name: str = "fp16"
    dtype = "fp16"

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out = ctx.workdir / f"{model.stem}.{self.name}.onnx"
        try:
            converted = convert_float_to_float16(onnx.load(str(model)), keep_io_types=True,
                                                 op_block_list=list(self.block_list))
            onnx.save(converted, str(out))
        except Exception as exc:  # the converter raises assorted errors on odd graphs
            raise PassError(f"{model}: fp16 conversion failed: {exc}") from exc
        return PassResult(out, modified=True,
                          notes=(f"kept in fp32: {', '.join(self.block_list)}",))

"""Graph optimisation: onnxruntime's quantization pre-processing.

``quant_pre_process`` runs symbolic shape inference, onnxruntime's offline optimiser
(constant folding, redundant-node elimination, fusions onnxruntime would otherwise redo at
every session start) and ONNX shape inference, and marks the model as pre-processed. The
quantizers need the inferred shapes to quantize every tensor they can (and warn without
them); the saved graph still uses only standard ONNX ops, so it stays portable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import PassContext, PassError, PassResult

__all__ = ["OptimizeGraph"]


@dataclass(frozen=True)
class OptimizeGraph:
    """Shape inference and offline graph optimisation, as onnxruntime's quantizers expect."""

    name: str = "optimize"

    def run(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        out = ctx.workdir / f"{model.stem}.opt.onnx"
        try:
            quant_pre_process(str(model), str(out))
        except Exception as exc:  # onnx/onnxruntime raise assorted errors for bad models
            raise PassError(f"{model}: onnxruntime cannot load it for optimisation: {exc}") from exc
        before, after = (len(onnx.load(str(p), load_external_data=False).graph.node)
                         for p in (model, out))
        return PassResult(out, modified=after != before,
                          notes=(f"graph nodes {before} -> {after}",))

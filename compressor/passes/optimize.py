"""Graph optimisation: onnxruntime's offline optimiser plus shape inference.

Constant folding, redundant-node elimination and operator fusions that onnxruntime would
otherwise redo at every session start; the saved graph uses only standard ONNX ops (basic
level), so it stays portable to other runtimes and to quantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import PassContext, PassError, PassResult

__all__ = ["OptimizeGraph"]


@dataclass(frozen=True)
class OptimizeGraph:
    """Offline graph optimisation at onnxruntime's portable ``basic`` level."""

    name: str = "optimize"

    def run(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        import onnxruntime as ort

        out = ctx.workdir / f"{model.stem}.opt.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises bare pybind11 errors
            raise PassError(f"{model}: onnxruntime cannot load it for optimisation: {exc}") from exc
        before, after = (len(onnx.load(str(p), load_external_data=False).graph.node)
                         for p in (model, out))
        return PassResult(out, modified=after != before,
                          notes=(f"graph nodes {before} -> {after}",))

"""Magnitude pruning: zero the smallest weights of Conv, Gemm and MatMul initializers.

Unstructured zeros do not make dense kernels faster; they make the artifact compress better
on the wire and they are the first step of sparsity-aware runtimes. The report states the
sparsity reached so nobody mistakes it for a latency gain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import ModelPass, PassContext, PassError, PassResult

__all__ = ["MagnitudePrune", "prune_array"]

_WEIGHT_OPS = {"Conv": 1, "Gemm": 1, "MatMul": 1}  # op type -> index of its weight input


def prune_array(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A copy of ``weights`` with the ``sparsity`` fraction of smallest magnitudes zeroed."""
    if not 0.0 <= sparsity < 1.0:
        raise PassError(f"sparsity must be in [0, 1), got {sparsity}")
    count = int(weights.size * sparsity)
    if count == 0:
        return weights.copy()
    threshold = np.partition(np.abs(weights).ravel(), count - 1)[count - 1]
    return np.where(np.abs(weights) <= threshold, 0, weights).astype(weights.dtype)


@dataclass(frozen=True)
class MagnitudePrune(ModelPass):
    """Zero the ``sparsity`` fraction of smallest weights in every weight initializer."""

    sparsity: float = 0.5
    name: str = "prune"

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(model))
        initializers = {init.name: init for init in proto.graph.initializer}
        weight_names = {node.input[_WEIGHT_OPS[node.op_type]] for node in proto.graph.node
                        if node.op_type in _WEIGHT_OPS and len(node.input) > 1
                        and node.input[_WEIGHT_OPS[node.op_type]] in initializers}
        zeros = total = 0
        for name in sorted(weight_names):
            pruned = prune_array(numpy_helper.to_array(initializers[name]), self.sparsity)
            initializers[name].CopyFrom(numpy_helper.from_array(pruned, name))
            zeros += int(np.count_nonzero(pruned == 0))
            total += pruned.size
        if total == 0:
            raise PassError(f"{model}: no Conv/Gemm/MatMul weight initializers to prune")
        out = ctx.workdir / f"{model.stem}.{self.name}{int(self.sparsity * 100)}.onnx"
        onnx.save(proto, str(out))
        return PassResult(out, modified=True, notes=(
            f"sparsity {zeros / total:.1%} over {len(weight_names)} weight tensors",))

"""Structured pruning: remove whole hidden units / channels, so kernels really shrink.

It looks for pairs of weight layers joined by element-wise ops only, where the first layer's
output units are exactly the second layer's input units:

- ``MatMul(x, W1[in, hidden]) -> [Add(b1)] -> element-wise -> MatMul(., W2[hidden, out])``
  (a transformer's feed-forward block; the activation may be decomposed into a small DAG of
  Mul/Div/Erf/Add with scalar constants, as exported GELU is);
- ``Conv(W1[c_mid, c_in, k, k], b1) -> element-wise ... -> Conv(W2[c_out, c_mid, k, k])``.

Each hidden unit j is scored by ``||W1 column/filter j||_1 * ||W2 row/input-channel j||_1``
(how much signal can flow through it) and the lowest-scoring ``ratio`` of units are deleted
from W1, b1 and W2. No retraining happens here, so accuracy falls with the ratio; the
compressor's accuracy gate decides whether a pruned candidate is acceptable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import ModelPass, PassContext, PassResult, PreconditionError

__all__ = ["PruneChannels", "unit_scores"]

_ELEMENTWISE = {"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Mul", "Div", "Add", "Sub", "Clip",
                "LeakyRelu", "HardSigmoid", "HardSwish"}


def unit_scores(w1_per_unit: np.ndarray, w2_per_unit: np.ndarray) -> np.ndarray:
    """L1 mass flowing through each unit: rows of both arrays are indexed by unit."""
    a = np.abs(w1_per_unit.reshape(len(w1_per_unit), -1)).sum(axis=1)
    b = np.abs(w2_per_unit.reshape(len(w2_per_unit), -1)).sum(axis=1)
    return np.asarray(a * b)


@dataclass(frozen=True)
class _Pair:
    kind: str  # "matmul" or "conv"
    w1: str
    b1: str | None
    w2: str


@dataclass(frozen=True)
class PruneChannels(ModelPass):
    """Delete the ``ratio`` least important hidden units of every prunable layer pair."""

    ratio: float = 0.25
    name: str = "prune-channels"

    def requires(self, model: Path, ctx: PassContext) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise PreconditionError(f"channel pruning ratio must be in (0, 1), got "
                                    f"{self.ratio}")
        super().requires(model, ctx)

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(model))
        inits = {i.name: i for i in proto.graph.initializer}
        pairs = _find_pairs(proto.graph, inits)
        if not pairs:
            raise PreconditionError(f"{model}: no prunable layer pairs (MatMul->MatMul or "
                                    "Conv->Conv joined by element-wise ops with constant weights)")
        removed = total = 0
        for pair in pairs:
            w1, w2 = (numpy_helper.to_array(inits[n]) for n in (pair.w1, pair.w2))
            # Unit axis: MatMul W1 columns / W2 rows; Conv W1 filters / W2 input channels.
            w1_units = w1.T if pair.kind == "matmul" else w1
            w2_units = w2 if pair.kind == "matmul" else w2.transpose(1, 0, 2, 3)
            scores = unit_scores(w1_units, w2_units)
            keep = np.sort(np.argsort(scores)[int(len(scores) * self.ratio):])
            new_w1 = w1[:, keep] if pair.kind == "matmul" else w1[keep]
            new_w2 = w2[keep] if pair.kind == "matmul" else w2[:, keep]
            inits[pair.w1].CopyFrom(numpy_helper.from_array(new_w1, pair.w1))
            inits[pair.w2].CopyFrom(numpy_helper.from_array(new_w2, pair.w2))
            if pair.b1 is not None:
                b1 = numpy_helper.to_array(inits[pair.b1])
                inits[pair.b1].CopyFrom(numpy_helper.from_array(b1[keep], pair.b1))
            removed += len(scores) - len(keep)
            total += len(scores)
        # Shapes recorded for intermediate tensors are now stale; let runtimes re-infer them.
        del proto.graph.value_info[:]
        out = ctx.workdir / f"{model.stem}.{self.name}{int(self.ratio * 100)}.onnx"
        onnx.save(proto, str(out))
        return PassResult(out, modified=True, notes=(
            f"removed {removed} of {total} hidden units/channels in {len(pairs)} layer pairs",))


def _find_pairs(graph: Any, inits: dict[str, Any]) -> list[_Pair]:
    nodes = list(graph.node)  # ONNX keeps nodes in topological order
    use_count: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            use_count[name] = use_count.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    pairs = []
    for index, node in enumerate(nodes):
        kind = {"MatMul": "matmul", "Conv": "conv"}.get(node.op_type)
        if kind is None or len(node.input) < 2 or node.input[1] not in inits:
            continue
        pair = _region_pair(nodes, index, kind, inits, outputs)
        names = [pair.w1, pair.w2, *([pair.b1] if pair.b1 else [])] if pair else []
        # A weight shared with another layer cannot be sliced for this pair alone.
        if pair is not None and all(use_count.get(n, 0) == 1 for n in names):
            pairs.append(pair)
    return pairs


def _region_pair(nodes: list[Any], index: int, kind: str, inits: dict[str, Any],
                 graph_outputs: set[str]) -> _Pair | None:
    """The pair starting at ``nodes[index]``, if only element-wise ops lead to one closer."""
    from onnx import numpy_helper

    first = nodes[index]
    closer_op = "MatMul" if kind == "matmul" else "Conv"
    hidden = numpy_helper.to_array(inits[first.input[1]]).shape[1 if kind == "matmul" else 0]
    bias = first.input[2] if kind == "conv" and len(first.input) > 2 else None
    region, closer = {first.output[0]}, None
    for node in nodes[index + 1:index + 40]:  # feed-forward regions are a few nodes long
        touched = [i for i in node.input if i in region]
        if not touched:
            continue
        if (node.op_type == closer_op and node.input[0] in region and node.input[1] in inits
                and touched == [node.input[0]] and closer is None):
            closer = node
            continue
        consts = [i for i in node.input if i not in region]
        if node.op_type not in _ELEMENTWISE or closer is not None:
            return None
        for const in consts:
            size = int(np.prod(numpy_helper.to_array(inits[const]).shape)) if (
                const in inits) else -1
            if (kind == "matmul" and bias is None and node.op_type == "Add" and size == hidden
                    and first.output[0] in node.input):
                bias = const
            elif size != 1:
                return None  # another activation, or a per-unit constant we would not slice
        region.update(node.output)
    if closer is None or region & graph_outputs or not _closes(closer, kind, hidden, inits):
        return None
    return _Pair(kind, first.input[1], bias, closer.input[1])


def _closes(closer: Any, kind: str, hidden: int, inits: dict[str, Any]) -> bool:
    from onnx import numpy_helper

    w2 = numpy_helper.to_array(inits[closer.input[1]])
    grouped = any(a.name == "group" and a.i != 1 for a in closer.attribute)
    return bool(w2.shape[0 if kind == "matmul" else 1] == hidden and not grouped)

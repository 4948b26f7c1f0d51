"""The pass interface: one model file in, one model file out, with what changed.

Passes work on files because onnxruntime's quantization and optimisation tools do. As in
onnx-ir's pass infrastructure, a pass is called through :meth:`ModelPass.__call__`, which
checks the pass's precondition (:meth:`~ModelPass.requires`), runs the transformation
(:meth:`~ModelPass.call`) and, when the pass says it modified the model, checks its
postcondition (:meth:`~ModelPass.ensures`). A pipeline asks a pass what it is (its ``dtype``,
the lowest opset it works at, the more conservative versions of itself worth trying when its
result loses too much quality) instead of branching on its type.

Errors::

    PassError                 the pass failed while running (the tool underneath raised)
    ├── PreconditionError     the model or the context lacks what the pass needs; no work done
    └── PostconditionError    the pass wrote a model that breaks its promise (unreadable file,
                              changed inputs or outputs)
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError

__all__ = ["Feeds", "GraphFacts", "ModelPass", "PassContext", "PassError", "PassResult",
           "PostconditionError", "PreconditionError", "graph_facts"]

#: One model call's inputs, by input name.
Feeds = Mapping[str, np.ndarray]


class PassError(CompressorError):
    """A pass failed while running on this model."""


class PreconditionError(PassError):
    """The model or the context does not meet what the pass needs (checked before any work)."""


class PostconditionError(PassError):
    """The pass produced a model that breaks what every pass promises."""


@dataclass(frozen=True)
class PassContext:
    """What a pass may need besides the model: calibration calls and a scratch directory."""

    workdir: Path
    # Representative model calls (each a complete feed of every input), for calibration.
    calibration: Sequence[Feeds] | None = None
    fast_int8: bool = True  # the target CPU has VNNI/dotprod; False asks for reduce_range


@dataclass(frozen=True)
class PassResult:
    """The pass's output model and whether (and how) it differs from the input."""

    model: Path
    modified: bool
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class GraphFacts:
    """What passes check about an ONNX file, read once per file version."""

    opset: int  # of the default ("ai.onnx") domain
    ops: frozenset[str]
    # Graph inputs (initializers excluded) and outputs: (name, ONNX element type), in order.
    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[tuple[str, int], ...]
    weight_nodes: tuple[str, ...]  # named Conv/Gemm/MatMul nodes with a constant weight


def graph_facts(model: Path) -> GraphFacts:
    """The :class:`GraphFacts` of ``model`` (cached while the file is unchanged)."""
    try:
        stat = model.stat()
    except OSError as exc:
        raise PreconditionError(f"{model}: cannot read the model ({exc}).") from exc
    return _facts(model, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _facts(model: Path, _mtime_ns: int, _size: int) -> GraphFacts:
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others for bad files
        raise PreconditionError(f"{model}: not a readable ONNX model ({exc}).") from exc
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    opset = next((o.version for o in proto.opset_import if o.domain in {"", "ai.onnx"}), 0)
    weights = tuple(n.name for n in graph.node
                    if n.op_type in {"Conv", "Gemm", "MatMul"} and n.name
                    and len(n.input) > 1 and n.input[1] in initializers)
    return GraphFacts(
        opset=opset, ops=frozenset(n.op_type for n in graph.node),
        inputs=tuple((i.name, i.type.tensor_type.elem_type) for i in graph.input
                     if i.name not in initializers),
        outputs=tuple((o.name, o.type.tensor_type.elem_type) for o in graph.output),
        weight_nodes=weights)


class ModelPass(abc.ABC):
    """One transformation of an ONNX model file; call it as ``result = a_pass(model, ctx)``.

    Subclasses set ``name`` (short, stable, used in reports and artifact names), ``dtype``
    (the numeric type of the model they make: ``fp32``, ``fp16`` or ``int8``) and
    ``min_opset``, and implement :meth:`call`; they extend :meth:`requires` for what else
    they need.
    """

    name: str
    dtype: str = "fp32"
    #: The lowest default-domain opset the pass can work at; a pipeline upgrades older models.
    min_opset: int = 1

    def __call__(self, model: Path, ctx: PassContext) -> PassResult:
        """Check the precondition, transform, and check the postcondition if modified."""
        self.requires(model, ctx)
        result = self.call(model, ctx)
        if result.modified:
            self.ensures(model, result, ctx)
        return result

    def requires(self, model: Path, ctx: PassContext) -> None:
        """Raise :class:`PreconditionError` when the pass cannot run on ``model`` here."""
        facts = graph_facts(model)
        if facts.opset < self.min_opset:
            raise PreconditionError(
                f"{model}: {self.name} needs opset {self.min_opset} or later, the model has "
                f"opset {facts.opset}; upgrade it first (passes.UpgradeOpset).")

    @abc.abstractmethod
    def call(self, model: Path, ctx: PassContext) -> PassResult:
        """Transform ``model`` into a new file under ``ctx.workdir``."""

    def ensures(self, model: Path, result: PassResult, ctx: PassContext) -> None:
        """Raise :class:`PostconditionError` unless ``result`` is a readable ONNX model with
        the same inputs and outputs (names and element types) as ``model``."""
        before = graph_facts(model)
        try:
            after = graph_facts(result.model)
        except PreconditionError as exc:
            raise PostconditionError(f"{self.name} wrote no readable model: {exc}") from exc
        for what in ("inputs", "outputs"):
            if getattr(before, what) != getattr(after, what):
                raise PostconditionError(
                    f"{self.name} changed the model's {what}: {getattr(before, what)} -> "
                    f"{getattr(after, what)} (name, ONNX element type); callers would break.")

    def fallbacks(self, model: Path) -> tuple[ModelPass, ...]:
        """More conservative versions of this pass, in the order to try them when its result
        on ``model`` loses more quality than allowed; none by default."""
        del model
        return ()

"""Graph preparation: shape inference and offline optimisation, as the strongest quantizers do.

onnxruntime's quantizers quantize a tensor only when its shape is known, and its
``quant_pre_process`` is what they expect to have run. That helper runs symbolic shape
inference without ``auto_merge`` and stops the whole preparation at the first failure, which
real models (dynamic axes that symbolic inference cannot reconcile, ops it does not know)
hit. This pass does the same steps, each with a fallback and a note saying which step did
what:

1. shapes: symbolic shape inference with ``auto_merge`` (conflicting symbolic dims merged),
   else ONNX's own shape inference, else none (the quantizers then skip unknown tensors);
2. onnxruntime's offline optimiser (basic level: constant folding, redundant-node
   elimination; the saved graph uses only standard ONNX ops, so it stays portable), else the
   graph as it is;
3. ONNX shape inference over the optimised graph (new tensors get shapes), else as it is;
4. the pre-processing mark the quantizers look for.

Models older than opset 11 are upgraded first (the quantizers need 11, and would upgrade
silently themselves); :class:`UpgradeOpset` does that for any target a pass asks for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import first_line as _first_line

from .base import ModelPass, PassContext, PassError, PassResult, graph_facts

__all__ = ["OptimizeGraph", "UpgradeOpset"]

log = logging.getLogger(__name__)

# The opset the preparation lifts older models to: the quantizers' minimum.
_PREPARED_OPSET = 11


@dataclass(frozen=True)
class UpgradeOpset(ModelPass):
    """Convert the model to default-domain opset ``target`` (onnx's version converter)."""

    target: int = 13
    name: str = "upgrade-opset"

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx
        from onnx import version_converter

        before = graph_facts(model).opset
        if before >= self.target:
            return PassResult(model, modified=False)
        out = ctx.workdir / f"{model.stem}.opset{self.target}.onnx"
        try:
            converted = version_converter.convert_version(onnx.load(str(model)), self.target)
            onnx.save(converted, str(out))
        except Exception as exc:  # the converter raises assorted errors per op adapter
            raise PassError(f"{model}: upgrading opset {before} to {self.target} failed "
                          f"({_first_line(exc)}); export the model at opset {self.target} "
                          "or later") from exc
        return PassResult(out, modified=True, notes=(f"opset {before} -> {self.target}",))


@dataclass(frozen=True)
class OptimizeGraph(ModelPass):
    """Shape inference and offline graph optimisation, each step with its fallback."""

    name: str = "optimize"

    def call(self, model: Path, ctx: PassContext) -> PassResult:
        import onnx

        notes: list[str] = []
        source = model
        if graph_facts(model).opset < _PREPARED_OPSET:
            upgraded = UpgradeOpset(_PREPARED_OPSET)(model, ctx)
            source, notes = upgraded.model, list(upgraded.notes)
        proto = onnx.load(str(source))
        before = len(proto.graph.node)
        with _working_directory(ctx.workdir):
            proto, shapes = _infer_shapes(proto)
        notes.append(shapes)
        staged = ctx.workdir / f"{model.stem}.shapes.onnx"
        onnx.save(proto, str(staged))
        del proto
        optimised = ctx.workdir / f"{model.stem}.ort-opt.onnx"
        try:
            _ort_optimise(staged, optimised)
        except Exception as exc:  # onnxruntime raises bare pybind11 errors
            notes.append(f"onnxruntime's offline optimisation failed ({_first_line(exc)}); "
                         "the graph is used unoptimised")
            shutil.copyfile(staged, optimised)
        out = ctx.workdir / f"{model.stem}.opt.onnx"
        try:
            onnx.shape_inference.infer_shapes_path(str(optimised), str(out))
        except Exception as exc:  # onnx raises InferenceError and others
            notes.append(f"ONNX shape inference after optimisation failed "
                         f"({_first_line(exc)}); new tensors keep unknown shapes")
            shutil.copyfile(optimised, out)
        final = onnx.load(str(out))
        _mark_prepared(final)
        onnx.save(final, str(out))
        notes.insert(0, f"graph nodes {before} -> {len(final.graph.node)}")
        for note in notes[1:]:
            log.info("%s: %s", model.name, note)
        return PassResult(out, modified=True, notes=tuple(notes))


def _infer_shapes(proto: Any) -> tuple[Any, str]:
    """Shapes by the strongest method that works, and a note saying which (and why not)."""
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, 2**31 - 1, True, False, 0)
        return inferred, "shapes: symbolic shape inference (auto_merge)"
    except Exception as exc:  # the inference raises assorted errors on ops it does not know
        symbolic = _first_line(exc)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        return inferred, (f"shapes: ONNX shape inference (symbolic shape inference failed: "
                          f"{symbolic})")
    except Exception as exc:  # onnx raises InferenceError and others
        return proto, (f"shapes: none inferred (symbolic shape inference failed: {symbolic}; "
                       f"ONNX shape inference failed: {_first_line(exc)}); the quantizers "
                       "skip tensors of unknown shape")


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """Run the block in ``path``: when symbolic shape inference is incomplete, onnxruntime
    saves the partial model as ``sym_shape_infer_temp.onnx`` in the current directory, which
    must be the scratch directory, not the user's."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _ort_optimise(source: Path, out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _mark_prepared(proto: Any) -> None:
    """The metadata onnxruntime's quantizers check for (they warn without it)."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    add_pre_process_metadata(proto)

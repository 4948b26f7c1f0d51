"""One ONNX export for the model scripts: dynamo exporter, opset 17, checked, one file.

torch 2.13's ``torch.onnx.export`` uses the dynamo exporter (it needs ``onnxscript``),
exports at opset 18 and converts down to the requested 17. Ops that only exist in the
opset-18 form (``chunk`` exports as a Split with ``num_outputs``) fail the checker, which
is why the model scripts slice instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch

__all__ = ["export"]


def export(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, *,
           inputs: list[str], outputs: list[str], doc: str,
           dynamic_shapes: dict[str, Any] | None = None) -> None:
    """Export ``model`` in eval mode, weights inside the one ``.onnx`` file at ``path``."""
    model.eval()
    program = torch.onnx.export(model, example, input_names=inputs, output_names=outputs,
                                dynamic_shapes=dynamic_shapes, opset_version=17, dynamo=True)
    program.optimize()
    proto = program.model_proto
    proto.graph.doc_string = doc
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)

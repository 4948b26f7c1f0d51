"""The pass interface: one model file in, one model file out, with what changed.

Passes work on files because onnxruntime's quantization and optimisation tools do. Each pass
states its precondition (``check``), does one transformation, and says whether it modified the
model, so a pipeline can log, skip and test passes one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from compressor.errors import CompressorError

__all__ = ["ModelPass", "PassContext", "PassError", "PassResult"]


class PassError(CompressorError):
    """A pass cannot run on this model (precondition) or failed while running."""


@dataclass(frozen=True)
class PassContext:
    """What a pass may need besides the model: calibration inputs and a scratch directory."""

    workdir: Path
    input_name: str
    calibration: np.ndarray | None = None
    fast_int8: bool = True  # the target CPU has VNNI/dotprod; False asks for reduce_range


@dataclass(frozen=True)
class PassResult:
    """The pass's output model and whether (and how) it differs from the input."""

    model: Path
    modified: bool
    notes: tuple[str, ...] = field(default=())


class ModelPass(Protocol):
    """One transformation of an ONNX model file."""

    @property
    def name(self) -> str:
        """Short, stable identifier used in reports and artifact names."""
        ...

    def run(self, model: Path, ctx: PassContext) -> PassResult:
        """Transform ``model`` into a new file under ``ctx.workdir``."""
        ...

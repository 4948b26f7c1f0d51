"""Exceptions raised by the compressor package.

Every message says what was wrong and what to do about it. Each subclass lives next to the
concept it belongs to; the tree::

    CompressorError
    ├── DatasetError            compressor.dataset: a data file is missing, unreadable or
    │                           does not fit the model
    ├── ModelLoadError          compressor.runner: a runtime cannot load or run a model file
    ├── PassError               compressor.passes.base: a pass failed while running
    │   ├── PreconditionError       the pass cannot run on this model (no work done)
    │   ├── PostconditionError      the pass wrote a model that breaks its promise
    │   └── TfliteUnavailableError  compressor.passes.tflite: TensorFlow/onnx2tf missing
    ├── MetricError             compressor.metrics: a quality measure does not fit an output
    ├── UnsupportedTargetError  compressor.pipeline: a profile cannot run this model
    └── NoArtifactError         compressor.pipeline: some profile got no artifact in budget
"""

from __future__ import annotations

__all__ = ["CompressorError", "first_line"]


class CompressorError(Exception):
    """Root of every error the compressor package raises on purpose."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a foreign exception's message (its type when empty), for one-line
    reasons: tools underneath raise multi-line messages with tracebacks inside."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]

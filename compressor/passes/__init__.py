"""Compression passes, one concept per module (see ``base`` for the interface)."""

from __future__ import annotations

from .base import (
    Feeds,
    ModelPass,
    PassContext,
    PassError,
    PassResult,
    PostconditionError,
    PreconditionError,
)
from .channel_prune import PruneChannels
from .fp16 import ConvertFp16
from .optimize import OptimizeGraph, UpgradeOpset
from .prune import MagnitudePrune
from .quantize import QuantizeDynamic, QuantizeStatic
from .tflite import ConvertTflite

__all__ = ["ConvertFp16", "ConvertTflite", "Feeds", "MagnitudePrune", "ModelPass",
           "OptimizeGraph", "PassContext", "PassError", "PassResult", "PostconditionError",
           "PreconditionError", "PruneChannels", "QuantizeDynamic", "QuantizeStatic",
           "UpgradeOpset"]

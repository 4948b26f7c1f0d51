"""Compression passes, one concept per module (see ``base`` for the interface)."""

from __future__ import annotations

from .base import ModelPass, PassContext, PassError, PassResult
from .channel_prune import PruneChannels
from .fp16 import ConvertFp16
from .optimize import OptimizeGraph
from .prune import MagnitudePrune
from .quantize import QuantizeDynamic, QuantizeStatic
from .tflite import ConvertTflite

__all__ = ["ConvertFp16", "ConvertTflite", "MagnitudePrune", "ModelPass", "OptimizeGraph",
           "PassContext", "PassError", "PassResult", "PruneChannels", "QuantizeDynamic",
           "QuantizeStatic"]

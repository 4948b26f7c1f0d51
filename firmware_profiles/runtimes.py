"""Which inference runtimes this host has: the one place that imports them optionally.

LiteRT comes from ``ai-edge-litert`` (the dependency) or, on devices where only it installs,
``tflite-runtime`` (docs/architecture.md, "TFLite runtime"). The agent and the compressor
import LiteRT through :func:`import_litert` so the fallback order lives here only.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["LiteRT", "delegate_loadable", "import_litert", "is_android", "load_delegate",
           "onnxruntime_installed", "onnxruntime_providers"]

# Distribution and module, in order of preference.
_LITERT_MODULES = (("ai-edge-litert", "ai_edge_litert.interpreter"),
                   ("tflite-runtime", "tflite_runtime.interpreter"))


@dataclass(frozen=True)
class LiteRT:
    """An importable LiteRT interpreter module and the distribution that provided it."""

    distribution: str
    interpreter: ModuleType  # has Interpreter and load_delegate


def import_litert() -> LiteRT | None:
    """The preferred LiteRT runtime that imports here, or None when neither does."""
    for distribution, module_name in _LITERT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return LiteRT(distribution=distribution, interpreter=module)
    return None


def onnxruntime_installed() -> bool:
    """Whether onnxruntime is installed, without importing it (its import costs ~10 MB)."""
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):  # a broken install, or a finder that refuses it
        return False


def onnxruntime_providers() -> tuple[str, ...]:
    """onnxruntime's available execution providers, or () when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def load_delegate(litert: LiteRT, library: str) -> tuple[Any, str]:
    """The LiteRT delegate in shared library ``library``, or None and why it did not load."""
    # Opening the library first avoids LiteRT's half-built Delegate objects, which fail noisily
    # in __del__ when the library is missing (see docs/architecture.md).
    try:
        ctypes.CDLL(library)
        return litert.interpreter.load_delegate(library), ""
    except (OSError, ValueError, RuntimeError) as exc:
        return None, f"{library} failed to load ({exc})"


def delegate_loadable(litert: LiteRT, library: str) -> bool:
    """Whether the LiteRT delegate in shared library ``library`` loads on this host."""
    return load_delegate(litert, library)[0] is not None


def is_android() -> bool:
    """True on Android, where LiteRT's NNAPI delegate is built in."""
    return hasattr(sys, "getandroidapilevel")

"""edgefleet compressor: turns a trained model into device-specific, accuracy-gated artifacts."""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"

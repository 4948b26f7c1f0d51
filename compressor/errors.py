"""Exceptions raised by the compressor package.

Every message says what was wrong and what to do about it. The tree::

    CompressorError
    └── (subclasses are added next to the concept they belong to)
"""

from __future__ import annotations

__all__ = ["CompressorError"]


class CompressorError(Exception):
    """Root of every error the compressor package raises on purpose."""

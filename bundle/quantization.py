"""TFLite's affine quantization of integer tensors, for whoever feeds full-integer models.

A full-integer (int8-full) artifact takes and returns integers; the compressor's runner
(measuring accuracy) and the agent's LiteRT session (serving float requests) both convert
with each tensor's (scale, zero point), so the rule lives here, once. numpy is in every
extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Affine"]


@dataclass(frozen=True)
class Affine:
    """TFLite's affine quantization of one integer tensor: real = scale * (q - zero_point)."""

    scale: np.float32
    zero_point: np.float32
    low: np.float32  # the integer dtype's range, for saturation
    high: np.float32
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, detail: Mapping[str, Any]) -> Affine | None:
        """The mapping of an integer tensor with a scale; None for float tensors."""
        dtype = np.dtype(detail["dtype"])
        scale, zero_point = detail.get("quantization", (0.0, 0))
        if dtype.kind not in "iu" or not scale:
            return None
        info = np.iinfo(dtype)
        return cls(np.float32(scale), np.float32(zero_point), np.float32(info.min),
                   np.float32(info.max), dtype)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """q = clip(round(x / scale) + zero_point): ties to even, saturated to the dtype."""
        # In-place ufuncs and precomputed scalars: np.clip, np.iinfo and temporaries cost
        # microseconds per call, which on a 10 µs model would count as the model's latency.
        q: np.ndarray = np.divide(x, self.scale, dtype=np.float32)
        np.rint(q, out=q)
        q += self.zero_point
        np.maximum(q, self.low, out=q)
        np.minimum(q, self.high, out=q)
        return q.astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """x = (q - zero_point) * scale, in float32."""
        x = q.astype(np.float32)
        x -= self.zero_point
        x *= self.scale
        return x

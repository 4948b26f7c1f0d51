"""Tensors at the agent's edges: signature checks and the KServe v2 datatype names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bundle.manifest import Tensor

from .sessions import TensorInfo

__all__ = ["DATATYPE_OF", "DTYPE_OF", "check_feeds", "from_manifest_tensor"]

#: numpy dtype name -> Open Inference Protocol datatype, and back.
DATATYPE_OF = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
DTYPE_OF = {v: k for k, v in DATATYPE_OF.items()}


def check_feeds(expected: Sequence[TensorInfo], feeds: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with ``feeds`` for a model with inputs ``expected``, or None.

    The message names the tensor and states the whole expected signature, so a caller can
    fix the request without reading the model.
    """
    signature = "; ".join(i.describe() for i in expected)
    names = {i.name for i in expected}
    unknown = sorted(set(feeds) - names)
    if unknown:
        return f"unknown input {', '.join(unknown)}; the model expects {signature}"
    for info in expected:
        value = feeds.get(info.name)
        if value is None:
            return f"missing input {info.name}; the model expects {signature}"
        if not isinstance(value, np.ndarray):
            return f"input {info.name} is not an array; the model expects {signature}"
        if value.dtype.name != info.dtype:
            return (f"input {info.name} has dtype {value.dtype.name}, expected {info.dtype}; "
                    f"the model expects {signature}")
        if len(value.shape) != len(info.shape) or any(
                d is not None and d != v for d, v in zip(info.shape, value.shape, strict=True)):
            got = ", ".join(map(str, value.shape))
            want = ", ".join("?" if d is None else str(d) for d in info.shape)
            return (f"input {info.name} has shape [{got}], expected [{want}]; the model "
                    f"expects {signature}")
    return None


def from_manifest_tensor(t: Tensor) -> np.ndarray:
    """A manifest tensor (golden sample) as a numpy array."""
    dtype = np.dtype(t.dtype).newbyteorder("<")
    return np.frombuffer(t.data, dtype=dtype).reshape(t.shape).astype(t.dtype)

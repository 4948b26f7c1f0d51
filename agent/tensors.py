"""Tensors at the agent's edges: signature checks and the KServe v2 datatype names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bundle.manifest import Tensor

from .config import ApiLimits
from .errors import InvalidInputError, RequestTooLargeError
from .sessions import TensorInfo

__all__ = ["DATATYPE_OF", "DTYPE_OF", "Declared", "check_feeds", "declared_tensor",
           "from_manifest_tensor"]

#: numpy dtype name -> Open Inference Protocol datatype, and back.
DATATYPE_OF = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
DTYPE_OF = {v: k for k, v in DATATYPE_OF.items()}
# numpy arrays have at most 64 dimensions; no model input comes near this.
_MAX_RANK = 32
_MAX_DIM = 1 << 31


@dataclass(frozen=True)
class Declared:
    """An input tensor as a request declares it, checked before any array is made."""

    name: str
    dtype: str  # numpy dtype name
    shape: list[int]
    count: int  # number of values
    nbytes: int


def declared_tensor(where: str, name: object, datatype: object, shape: object, *,
                    expected: Sequence[TensorInfo], limits: ApiLimits, total: int,
                    ) -> Declared:
    """Check one input's declaration (HTTP's JSON or gRPC's message) against the protocol
    and this agent's limits, given the ``total`` bytes of the inputs before it.

    Raises InvalidInputError for a tensor that does not describe itself, and
    RequestTooLargeError for a batch or total size over ``limits``; the model's own shape
    and dtype are checked by the runtime.
    """
    if not isinstance(name, str) or not isinstance(datatype, str) or datatype not in DTYPE_OF:
        raise InvalidInputError(f"{where}: needs a 'name' and a 'datatype' out of "
                                f"{', '.join(DTYPE_OF)}; the model expects "
                                f"{_signature(expected)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_RANK and all(
            type(d) is int and 0 <= d < _MAX_DIM for d in shape)):
        raise InvalidInputError(f"{where}: 'shape' must be a list of non-negative "
                                f"integers (at most {_MAX_RANK}, each under {_MAX_DIM}); "
                                f"the model expects {_signature(expected)}")
    dynamic_batch = any(i.name == name and i.shape and i.shape[0] is None for i in expected)
    if shape and shape[0] > limits.max_batch and dynamic_batch:
        raise RequestTooLargeError(f"{where}: batch of {shape[0]} is over this agent's limit "
                                   f"of {limits.max_batch} (api.limits.max_batch); split the "
                                   "request")
    dtype = DTYPE_OF[datatype]
    count = math.prod(shape)
    nbytes = count * np.dtype(dtype).itemsize
    if total + nbytes > limits.max_input_bytes:
        raise RequestTooLargeError(f"{where}: the inputs take {total + nbytes} bytes or "
                                   "more, over this agent's limit of "
                                   f"{limits.max_input_bytes} (api.limits.max_input_bytes); "
                                   "send smaller batches")
    return Declared(name, dtype, shape, count, nbytes)


def _signature(expected: Sequence[TensorInfo]) -> str:
    return "; ".join(i.describe() for i in expected)


def check_feeds(expected: Sequence[TensorInfo], feeds: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with ``feeds`` for a model with inputs ``expected``, or None.

    The message names the tensor and states the whole expected signature, so a caller can
    fix the request without reading the model.
    """
    signature = _signature(expected)
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

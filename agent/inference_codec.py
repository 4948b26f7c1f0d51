"""The Open Inference Protocol v2's tensors over HTTP: a request's JSON and binary parts
split and its inputs decoded (bounded by the declared shapes before any array is made), the
outputs wanted, and the answer encoded as JSON or with binary tensor data. Pure; the HTTP API
(:mod:`agent.http_api`) routes and authenticates around it."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import numpy as np

from .config import ApiLimits
from .errors import InvalidInputError
from .http_server import HttpError, Response
from .sessions import TensorInfo
from .tensors import DATATYPE_OF, DTYPE_OF, declared_tensor

__all__ = ["BINARY_HEADER", "BINARY_HEADER_LC", "decode_inputs", "encode_response",
           "json_bytes", "json_length", "parameters_of", "split_binary", "wanted_outputs"]

BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_HEADER_LC = BINARY_HEADER.lower()
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in DTYPE_OF.values()}
_DATATYPE_BY_DTYPE = {np.dtype(name): datatype for name, datatype in DATATYPE_OF.items()}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_bytes(obj: Any) -> bytes:
    # allow_nan=False: bare NaN is not JSON; outputs spell non-finite floats as strings.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

def json_length(value: str) -> int:
    """The binary extension's JSON length header as a number (400 if it is not one)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{BINARY_HEADER} {value[:30]!r} is not a "
                        "number of bytes")
    return int(value)


def split_binary(body: bytes | bytearray, header_length: str | None,
                  ) -> tuple[dict[str, Any], memoryview]:
    """The JSON request and the binary tensor data after it (binary tensor extension)."""
    json_size = len(body) if header_length is None else json_length(header_length)
    if json_size > len(body):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{BINARY_HEADER} {json_size} is outside "
                        f"the body of {len(body)} bytes")
    try:
        request = json.loads(body[:json_size])
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request body is not JSON ({reason})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HttpError(HTTPStatus.BAD_REQUEST, "request must be a JSON object with an "
                        "'inputs' list (Open Inference Protocol v2)")
    if not isinstance(request.get("id", ""), str):
        raise InvalidInputError("'id' must be a string (Open Inference Protocol v2)")
    parameters_of(request, "the request")
    # A view, not a copy: the binary part may be most of a 64 MiB body.
    return request, memoryview(body)[json_size:]


def parameters_of(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The ``parameters`` object of ``obj`` (empty if absent); 400 if it is not an object."""
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"{where}: 'parameters' must be a JSON object, not "
                                f"{type(parameters).__name__}")
    return parameters


def decode_inputs(request: Mapping[str, Any], binary: memoryview,
                   expected: tuple[TensorInfo, ...], limits: ApiLimits,
                   ) -> dict[str, np.ndarray]:
    """Arrays from the request. Each tensor's batch and the inputs' total size are checked
    against ``limits`` from the declared shapes before any array is made (413); shape and
    dtype against the model are checked by the runtime. InvalidInputError (400) for tensors
    that do not even describe themselves."""
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    total = 0
    for number, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict):
            raise InvalidInputError(f"inputs[{number}] is not an object")
        name = tensor.get("name")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{number}]"
        declared = declared_tensor(where, name, tensor.get("datatype"), tensor.get("shape"),
                                   expected=expected, limits=limits, total=total)
        total += declared.nbytes
        size = parameters_of(tensor, where).get("binary_data_size")
        if size is not None:
            if (type(size) is not int or size != declared.nbytes
                    or offset + size > len(binary)):
                raise InvalidInputError(f"{where}: binary_data_size {size!r} does not fit "
                                        f"shape {declared.shape} of {tensor['datatype']} or "
                                        "the data sent")
            # The protocol's binary data is little-endian, as numpy's native order is on
            # every platform the agent runs on; "<" keeps a big-endian host correct.
            array = np.frombuffer(binary, dtype=_LITTLE[declared.dtype], count=declared.count,
                                  offset=offset)
            offset += size
        else:
            try:
                array = np.asarray(tensor.get("data"), dtype=declared.dtype)
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                raise InvalidInputError(f"{where}: 'data' is not {tensor['datatype']} "
                                        f"({exc})") from None
            if array.size != declared.count:
                raise InvalidInputError(f"{where}: {array.size} values for shape "
                                        f"{declared.shape}")
        feeds[declared.name] = array.reshape(declared.shape)
    return feeds


def wanted_outputs(request: Mapping[str, Any], names: list[str]) -> dict[str, bool]:
    """The outputs to send, each with whether it goes as binary data, checked before the
    model runs."""
    default_binary = bool(parameters_of(request, "the request").get("binary_data_output",
                                                                     False))
    wanted = request.get("outputs")
    if wanted is None or wanted == []:
        return dict.fromkeys(names, default_binary)
    if not isinstance(wanted, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects")
    binary_for = {}
    for number, out in enumerate(wanted):
        out_name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(out_name, str) or out_name not in names:
            raise InvalidInputError(f"requested output {out_name!r} does not exist; the "
                                    f"model outputs {', '.join(names)}")
        parameters = parameters_of(out, f"outputs[{number}]")
        binary_for[out_name] = bool(parameters.get("binary_data", default_binary))
    return binary_for


def encode_response(response_id: str, name: str, version: int | None,
                     outputs: Mapping[str, np.ndarray], binary_for: Mapping[str, bool],
                     ) -> Response:
    described, blobs = [], []
    for out_name, binary in binary_for.items():
        array = outputs[out_name]
        # Keyed by dtype object: dtype.name is computed in Python, slow on this hot path.
        entry: dict[str, Any] = {"name": out_name, "datatype": _DATATYPE_BY_DTYPE[array.dtype],
                                 "shape": list(array.shape)}
        if binary:
            blob = (array.tobytes() if _LITTLE_ENDIAN_HOST
                    else array.astype(array.dtype.newbyteorder("<")).tobytes())
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(array)
        described.append(entry)
    response: dict[str, Any] = {"model_name": name, "model_version": str(version or 1),
                                "id": response_id, "outputs": described}
    head = json_bytes(response)
    if not blobs:
        return Response(HTTPStatus.OK, head)
    return Response(HTTPStatus.OK, head + b"".join(blobs), "application/octet-stream",
                    {BINARY_HEADER: str(len(head))})


def _json_values(array: np.ndarray) -> list[Any]:
    """The array's values in row-major order for JSON; non-finite floats as strings."""
    values: list[Any] = array.ravel().tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        values = [_NON_FINITE[repr(v)] if not math.isfinite(v) else v for v in values]
    return values

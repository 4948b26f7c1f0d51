"""The local inference API: Open Inference Protocol v2 (KServe v2) over HTTP/1.1.

Speaks what existing clients (``tritonclient.http``, KServe's own) expect:

    GET  /v2/health/live, /v2/health/ready          no token needed (liveness probes)
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     JSON tensors, or the binary tensor
                                                    extension (Inference-Header-Content-Length)
    GET  /v2/edgefleet/status                       agent status (models, installs)
    POST /v2/edgefleet/install                      body: a bundle file; installs it

Every other request needs ``Authorization: Bearer <token>`` (the token file is created with
mode 0600 beside the agent's state). Bodies over the limit are refused with 413 before they
are read. A bad request gets a JSON ``{"error": ...}`` naming what was wrong and never
affects the serving model or the server. Listens on localhost TCP and/or a Unix socket.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

from protocol.defaults import AGENT_API_PORT

from . import __version__
from .errors import AgentError, InvalidInputError, ModelNotFoundError
from .http_server import HttpError, HttpServer, Request, Response
from .runtime import Runtime, ServedModel
from .sessions import TensorInfo
from .tensors import DATATYPE_OF, DTYPE_OF

__all__ = ["ApiServer", "ApiSettings", "load_or_create_token"]

log = logging.getLogger(__name__)

BINARY_HEADER = "Inference-Header-Content-Length"
_BINARY_HEADER_LC = BINARY_HEADER.lower()
_OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_INSTALL_PATH = "/v2/edgefleet/install"
_MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                         r"(?P<action>/ready|/infer)?")
_LITTLE = {name: np.dtype(name).newbyteorder("<") for name in DTYPE_OF.values()}
_DATATYPE_BY_DTYPE = {np.dtype(name): datatype for name, datatype in DATATYPE_OF.items()}
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}


@dataclass(frozen=True)
class ApiSettings:
    """How the API listens and whom it lets in."""

    host: str = "127.0.0.1"
    port: int | None = AGENT_API_PORT  # None: no TCP listener (Unix socket only)
    unix_socket: Path | None = None
    token: str | None = None  # None: no authentication (only for tests and demos)
    max_body_bytes: int = 64 * 1024 * 1024
    max_bundle_bytes: int = 512 * 1024 * 1024


def load_or_create_token(path: Path) -> str:
    """The API token in ``path``, creating it (0600) with a random token if missing.

    Refuses a token file that others can read: anyone with the token can install models.
    """
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise AgentError(f"token file {path} has mode {mode:o}; it must be readable by "
                             f"its owner only: chmod 600 {path}")
        token = path.read_text(encoding="ascii").strip()
        if not token:
            raise AgentError(f"token file {path} is empty; delete it to create a new token")
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    return token


class _Api:
    """The Open Inference Protocol routes over a runtime (an :class:`~.http_server.App`)."""

    def __init__(self, runtime: Runtime, settings: ApiSettings) -> None:
        self.runtime = runtime
        self.settings = settings

    def admit(self, method: str, path: str, headers: Mapping[str, str]) -> int:
        if path in _OPEN_PATHS:
            return 0
        token = self.settings.token
        if token is not None:
            scheme, _, value = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                     token.encode()):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token; "
                                "send 'Authorization: Bearer <token>' with the token from the "
                                "agent's token file")
        if path == _INSTALL_PATH:
            return self.settings.max_bundle_bytes
        return self.settings.max_body_bytes

    def error(self, status: HTTPStatus, message: str) -> Response:
        return Response(status, _json({"error": message}))

    def handle(self, request: Request) -> Response:
        try:
            return self._route(request)
        except InvalidInputError as exc:
            return self.error(HTTPStatus.BAD_REQUEST, str(exc))
        except ModelNotFoundError as exc:
            return self.error(HTTPStatus.NOT_FOUND, str(exc))
        except AgentError as exc:
            return self.error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
        except HttpError:
            raise
        except Exception as exc:  # the server outlives any one request
            log.exception("request %s %s failed", request.method, request.path)
            return self.error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    def _route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if path in _OPEN_PATHS:
            ready = path.endswith("live") or bool(self.runtime.models())
            return Response(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE)
        fixed = _FIXED_ROUTES.get((method, path))
        if fixed is not None:
            return fixed(self, request)
        match = _MODEL_PATH.fullmatch(path)
        if match is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {path}")
        name, version, action = match["name"], match["version"], match["action"]
        served = self.runtime.served(name)
        if version is not None and version != str(served.version or 1):
            raise ModelNotFoundError(f"model {name} serves version {served.version or 1}, "
                                     f"not {version}")
        if action == "/infer" and method == "POST":
            return self._infer(served, request)
        if action == "/ready" and method == "GET":
            return Response(HTTPStatus.OK)
        if action is None and method == "GET":
            return Response(HTTPStatus.OK, _json(_model_metadata(self.runtime, name)))
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")

    def _server_metadata(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, _json({"name": "edgefleet-agent", "version": __version__,
                                              "extensions": ["binary_tensor_data",
                                                             "edgefleet"]}))

    def _status(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, _json(self.runtime.status()))

    def _infer(self, served: ServedModel, request: Request) -> Response:
        body, binary = _split_binary(request.body, request.headers.get(_BINARY_HEADER_LC))
        feeds = _decode_inputs(body, binary, served.session.inputs)
        # The model object looked up for this request serves it, even if a swap lands now.
        return _encode_response(body, served.name, served.version, served.run(feeds))

    def _install(self, request: Request) -> Response:
        installer = self.runtime.installer
        if installer is None:
            raise HttpError(HTTPStatus.CONFLICT, "this agent serves model files without a "
                            "state directory; it cannot install bundles")
        fd, tmp = tempfile.mkstemp(dir=installer.dirs.root, prefix=".upload-", suffix=".efb")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(request.body)
            record = self.runtime.install(Path(tmp))
        finally:
            Path(tmp).unlink(missing_ok=True)
        status = HTTPStatus.OK if record.reason is None else HTTPStatus.UNPROCESSABLE_ENTITY
        return Response(status, _json(record.summary()))


_FIXED_ROUTES: dict[tuple[str, str], Callable[[_Api, Request], Response]] = {
    ("GET", "/v2"): _Api._server_metadata,
    ("GET", "/v2/edgefleet/status"): _Api._status,
    ("POST", _INSTALL_PATH): _Api._install,
}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _split_binary(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON request and the binary tensor data after it (binary tensor extension)."""
    try:
        json_length = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{BINARY_HEADER} is not a number") from None
    if not 0 <= json_length <= len(body):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{BINARY_HEADER} {json_length} is outside "
                         f"the body of {len(body)} bytes")
    try:
        request = json.loads(body[:json_length])
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"request body is not JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise HttpError(HTTPStatus.BAD_REQUEST, "request must be a JSON object with an "
                         "'inputs' list (Open Inference Protocol v2)")
    return request, body[json_length:]


def _decode_inputs(request: Mapping[str, Any], binary: bytes,
                   expected: tuple[TensorInfo, ...]) -> dict[str, np.ndarray]:
    """Arrays from the request; shape and dtype against the model are checked by the
    runtime. InvalidInputError for tensors that do not even describe themselves."""
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for number, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict):
            raise InvalidInputError(f"inputs[{number}] is not an object")
        name = tensor.get("name")
        where = f"input {name!r}" if isinstance(name, str) else f"inputs[{number}]"
        signature = _Signature(expected)
        datatype, shape = tensor.get("datatype"), tensor.get("shape")
        dtype = DTYPE_OF.get(datatype) if isinstance(datatype, str) else None
        if not isinstance(name, str) or dtype is None:
            raise InvalidInputError(f"{where}: needs a 'name' and a 'datatype' out of "
                                    f"{', '.join(DTYPE_OF)}; the model expects {signature}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidInputError(f"{where}: 'shape' must be a list of non-negative "
                                    f"integers; the model expects {signature}")
        count = math.prod(shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * np.dtype(dtype).itemsize or offset + size > len(binary):
                raise InvalidInputError(f"{where}: binary_data_size {size} does not fit shape "
                                        f"{shape} of {datatype} or the data sent")
            # The protocol's binary data is little-endian, as numpy's native order is on
            # every platform the agent runs on; "<" keeps a big-endian host correct.
            array = np.frombuffer(binary, dtype=_LITTLE[dtype], count=count, offset=offset)
            offset += size
        else:
            try:
                array = np.asarray(tensor.get("data"), dtype=dtype)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"{where}: 'data' is not {datatype} ({exc})") from None
            if array.size != count:
                raise InvalidInputError(f"{where}: {array.size} values for shape {shape}")
        feeds[name] = array.reshape(shape)
    return feeds


class _Signature:
    """The model's input signature, formatted only when an error message needs it."""

    def __init__(self, expected: tuple[TensorInfo, ...]) -> None:
        self.expected = expected

    def __str__(self) -> str:
        return "; ".join(i.describe() for i in self.expected)


def _encode_response(request: Mapping[str, Any], name: str, version: int | None,
                     outputs: Mapping[str, np.ndarray]) -> Response:
    wanted = request.get("outputs")
    default_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    binary_for = {}
    if isinstance(wanted, list) and wanted:
        for out in wanted:
            out_name = out.get("name") if isinstance(out, dict) else None
            if not isinstance(out_name, str) or out_name not in outputs:
                raise InvalidInputError(f"requested output {out_name!r} does not exist; the "
                                        f"model outputs {', '.join(outputs)}")
            binary_for[out_name] = bool((out.get("parameters") or {}).get("binary_data",
                                                                          default_binary))
    else:
        binary_for = dict.fromkeys(outputs, default_binary)
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
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    response: dict[str, Any] = {"model_name": name, "model_version": str(version or 1),
                                "outputs": described}
    if "id" in request:
        response["id"] = request["id"]
    head = _json(response)
    if not blobs:
        return Response(HTTPStatus.OK, head)
    return Response(HTTPStatus.OK, head + b"".join(blobs), "application/octet-stream",
                    {BINARY_HEADER: str(len(head))})


def _model_metadata(runtime: Runtime, name: str) -> dict[str, Any]:
    info = runtime.model(name)

    def tensors(infos: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": DATATYPE_OF.get(t.dtype, t.dtype.upper()),
                 "shape": [-1 if d is None else d for d in t.shape]} for t in infos]

    return {"name": info.name, "versions": [str(info.version or 1)],
            "platform": _PLATFORMS.get(info.backend.split(":", 1)[0], info.backend),
            "inputs": tensors(info.inputs), "outputs": tensors(info.outputs),
            "parameters": {"backend": info.backend, "fallback": info.fallback,
                           "state": info.state, "source": info.source}}


class ApiServer:
    """The API over ``runtime``, listening as ``settings`` say; start() and stop()."""

    def __init__(self, runtime: Runtime, settings: ApiSettings) -> None:
        if settings.port is None and settings.unix_socket is None:
            raise AgentError("the API needs a TCP port or a Unix socket to listen on")
        self.runtime = runtime
        self.settings = settings
        try:
            self._http = HttpServer(
                _Api(runtime, settings), server_name=f"edgefleet-agent/{__version__}",
                tcp=None if settings.port is None else (settings.host, settings.port),
                unix=settings.unix_socket)
        except OSError as exc:
            where = settings.unix_socket or f"{settings.host}:{settings.port}"
            raise AgentError(f"cannot listen on {where} ({exc.strerror}); is another agent "
                             "running? choose another --port") from exc

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        return self._http.port

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the TCP listener."""
        return None if self.port is None else f"http://{self.settings.host}:{self.port}"

    def start(self) -> None:
        """Serve in background threads."""
        self._http.start()

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._http.stop()

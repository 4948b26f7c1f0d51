"""The local inference API: Open Inference Protocol v2 (KServe v2) over HTTP/1.1.

Speaks what existing clients (``tritonclient.http``, KServe's own) expect:

    GET  /v2/health/live, /v2/health/ready          no token needed (liveness probes)
    GET  /v2/openapi.json                           this API's OpenAPI document (no token)
    GET  /v2                                        server metadata
    GET  /v2/models                                 repository index: the served models
    POST /v2/repository/index                       the same, as Triton's extension (a list)
    GET  /v2/models/stats                           every model's statistics (Triton's shape)
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer     JSON tensors, or the binary tensor
                                                    extension (Inference-Header-Content-Length)
    POST /v2/models/{name}[/versions/{v}]/feedback  an answer's outcome: {"id": ..., "reward":
                                                    number} or {"id": ..., "label": class}
    GET  /v2/models/{name}[/versions/{v}]/stats     one model's statistics
    GET  /v2/edgefleet/status                       agent status (models, installs)
    GET  /metrics                                   Prometheus text format, when turned on
                                                    (``[monitor] prometheus``; agent.prometheus)
    POST /v2/edgefleet/install                      body: a bundle file; installs it

The router dispatches from one table of routes (:data:`_ROUTES`), which also generates the
OpenAPI document (:mod:`.openapi`). Every request but the open ones needs
``Authorization: Bearer <token>`` (the token file is created with mode 0600 beside the
agent's state). Cross-origin requests from web apps are refused unless their origin is in
``api.cors_origins`` (:mod:`.cors`, answered by the server before authentication).

Every request is bounded (:class:`~.config.ApiLimits`): a body over its limit is refused
with 413 before it is read, and an inference request's batch and decoded input size are
checked from its declared shapes before any array is made (413). A bad request gets a JSON
``{"error": ...}`` naming what was wrong (400) and never affects the serving model or the
server. JSON output is always valid JSON: non-finite
floats are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, which
numpy (and so tritonclient) reads back as numbers. Listens on localhost TCP and/or a Unix
socket.

Every inference answer carries an ``id`` (the request's own, else a fresh one) that the app
can report an outcome for (:mod:`.experiments`, docs/experiments.md). A model name under an
experiment is served by the arm :class:`~.experiments.DeviceExperiments` picks for the
request (sticky per ``parameters.client_key`` when the app sends one).
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from common.atomic import write_atomic
from experiments.errors import InvalidExperimentData, UnknownResponse
from protocol.defaults import AGENT_API_PORT

from . import __version__
from .api_views import model_metadata, model_statistics, repository_index
from .config import DEFAULT_API_HOST, ApiLimits
from .cors import CorsPolicy
from .errors import AgentError, InvalidInputError, ModelNotFoundError, RequestTooLargeError
from .experiments import DeviceExperiments
from .http_server import HttpError, HttpServer, Request, Response
from .inference_codec import (
    BINARY_HEADER,
    BINARY_HEADER_LC,
    decode_inputs,
    encode_response,
    json_bytes,
    json_length,
    parameters_of,
    split_binary,
    wanted_outputs,
)
from .openapi import Operation, openapi_document
from .prometheus import RuntimeCollector, exposition
from .runtime import Runtime, ServedModel

__all__ = ["ApiServer", "ApiSettings", "load_or_create_token"]

log = logging.getLogger(__name__)

_INSTALL_PATH = "/v2/edgefleet/install"


@dataclass(frozen=True)
class ApiSettings:
    """How the API listens, whom it lets in and what it accepts."""

    host: str = DEFAULT_API_HOST
    port: int | None = AGENT_API_PORT  # None: no TCP listener (Unix socket only)
    unix_socket: Path | None = None
    token: str | None = None  # None: no authentication (only for tests and demos)
    limits: ApiLimits = field(default_factory=ApiLimits)
    #: Web origins (``http://localhost:3000``) allowed to call the API; empty: none.
    cors_origins: tuple[str, ...] = ()
    #: Also serve KServe v2 gRPC on this port of ``host`` (:mod:`.grpc_api`); None: no gRPC.
    grpc_port: int | None = None
    prometheus: bool = False  # serve GET /metrics


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
    try:
        # Atomic: a full disk or a crash leaves no token file rather than an empty one.
        write_atomic(path, (token + "\n").encode("ascii"), mode=0o600)
    except OSError as exc:
        raise AgentError(f"cannot create the API token file {path} ({exc.strerror}); check "
                         "that its directory is writable and has free space") from exc
    return token


class _Api:
    """The Open Inference Protocol routes over a runtime (an :class:`~.http_server.App`)."""

    def __init__(self, runtime: Runtime, settings: ApiSettings,
                 experiments: DeviceExperiments) -> None:
        self.runtime = runtime
        self.settings = settings
        self.experiments = experiments
        self._prometheus = RuntimeCollector(runtime) if settings.prometheus else None

    def admit(self, method: str, path: str, headers: Mapping[str, str], length: int) -> None:
        if path in _OPEN_PATHS:
            limit, what = 0, "a health check"
        else:
            self._authenticate(headers)
            limit, what = self._body_limit(path, headers)
        if length > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is "
                            f"over the limit of {limit} for {what}; it was not read")

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        token = self.settings.token
        if token is not None:
            scheme, _, value = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                     token.encode()):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token; "
                                "send 'Authorization: Bearer <token>' with the token from the "
                                "agent's token file")

    def _body_limit(self, path: str, headers: Mapping[str, str]) -> tuple[int, str]:
        """The largest body for ``path``, and what it is (for the 413's message)."""
        limits = self.settings.limits
        if path == _INSTALL_PATH:
            return limits.max_bundle_bytes, "a bundle (api.limits.max_bundle_bytes)"
        declared = headers.get(BINARY_HEADER_LC)
        if declared is None:
            return (min(limits.max_json_bytes, limits.max_body_bytes), "a JSON body (api."
                    "limits.max_json_bytes; send large tensors with the binary extension)")
        if json_length(declared) > limits.max_json_bytes:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{BINARY_HEADER} "
                            f"{declared} is over the limit of {limits.max_json_bytes} for "
                            "the JSON part (api.limits.max_json_bytes); it was not read")
        return limits.max_body_bytes, "a request (api.limits.max_body_bytes)"

    def error(self, status: HTTPStatus, message: str) -> Response:
        return Response(status, json_bytes({"error": message}))

    def handle(self, request: Request) -> Response:
        try:
            return self._route(request)
        except RequestTooLargeError as exc:
            return self.error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))
        except (InvalidInputError, InvalidExperimentData) as exc:
            return self.error(HTTPStatus.BAD_REQUEST, str(exc))
        except (ModelNotFoundError, UnknownResponse) as exc:
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
        methods = _EXACT.get(path)
        served = None
        if methods is None:
            match = _MODEL_PATH.fullmatch(path)
            if match is None:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {path} "
                                "(GET /v2/openapi.json lists them)")
            methods = _BY_ACTION[match["action"] or ""]
            name, version = match["name"], match["version"]
            # An experiment's public name is checked against its first arm's model.
            served = self.runtime.served(self.experiments.representative(name))
            if version is not None and version != str(served.version or 1):
                raise ModelNotFoundError(f"model {name} serves version {served.version or 1}, "
                                         f"not {version}")
        handler = methods.get(method)
        if handler is None:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on "
                            f"{path}; use {' or '.join(methods)}")
        return handler(self, request, served)

    def _live(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK)

    def _ready(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK if self.runtime.models() else
                        HTTPStatus.SERVICE_UNAVAILABLE)

    def _openapi(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK, _OPENAPI)

    def _server_metadata(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK, json_bytes({"name": "edgefleet-agent",
                                                   "version": __version__,
                                                   "extensions": ["binary_tensor_data",
                                                                  "model_repository",
                                                                  "statistics",
                                                                  "edgefleet"]}))

    def _index(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK, json_bytes({"models": self._index_entries()}))

    def _repository_index(self, request: Request, served: ServedModel | None) -> Response:
        if request.body.strip():
            try:
                body = json.loads(request.body)
            except (ValueError, RecursionError):
                body = None
            if not isinstance(body, dict):
                raise InvalidInputError("the repository index request must be empty or a "
                                        "JSON object such as {\"ready\": true}")
        return Response(HTTPStatus.OK, json_bytes(self._index_entries()))

    def _index_entries(self) -> list[dict[str, str]]:
        return repository_index(self.runtime)

    def _all_stats(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK, json_bytes({"model_stats": [
            model_statistics(self.runtime.served(info.name)) for info in self.runtime.models()]}))

    def _model_stats(self, request: Request, served: ServedModel | None) -> Response:
        assert served is not None
        return Response(HTTPStatus.OK, json_bytes({"model_stats": [model_statistics(served)]}))

    def _model_metadata(self, request: Request, served: ServedModel | None) -> Response:
        assert served is not None
        return Response(HTTPStatus.OK, json_bytes(model_metadata(self.runtime, served.name)))

    def _model_ready(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK)

    def _status(self, request: Request, served: ServedModel | None) -> Response:
        return Response(HTTPStatus.OK, json_bytes(self.runtime.status()))

    def _metrics(self, request: Request, served: ServedModel | None) -> Response:
        if self._prometheus is None:
            raise HttpError(HTTPStatus.NOT_FOUND, "GET /metrics is off; turn it on with "
                            "prometheus = true in the agent config's [monitor] table")
        body, content_type = exposition(self._prometheus)
        return Response(HTTPStatus.OK, body, content_type)

    def _infer(self, request: Request, served: ServedModel | None) -> Response:
        assert served is not None
        body, binary = split_binary(request.body, request.headers.get(BINARY_HEADER_LC))
        name = _model_name(request)
        client_key = parameters_of(body, "the request").get("client_key")
        if client_key is not None and not isinstance(client_key, str):
            raise InvalidInputError("parameters.client_key must be a string (the app's user "
                                    "or session key, to keep one arm per key)")
        arm, model = self.experiments.route(name, client_key)
        if model != served.name:
            served = self.runtime.served(model)
        feeds = decode_inputs(body, binary, served.session.inputs, self.settings.limits)
        wanted = wanted_outputs(body, served.output_names)
        # The model object looked up for this request serves it, even if a swap lands now.
        outputs = served.run(feeds)
        response_id = self.experiments.record(name, arm, outputs, body.get("id"))
        return encode_response(response_id, served.name, served.version, outputs, wanted)

    def _feedback(self, request: Request, served: ServedModel | None) -> Response:
        reward = self.experiments.feedback(_model_name(request), bytes(request.body))
        return Response(HTTPStatus.OK, json_bytes({"reward": reward}))

    def _install(self, request: Request, served: ServedModel | None) -> Response:
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
        return Response(status, json_bytes(record.summary()))


_Handler = Callable[[_Api, Request, "ServedModel | None"], Response]

#: Every route: what the OpenAPI document says of it, and its handler. Model routes
#: (``model=True``) have a path suffix after /v2/models/{name}[/versions/{v}].
_ROUTES: tuple[tuple[Operation, _Handler], ...] = (
    (Operation("GET", "/v2/health/live", "liveness: the agent answers", None, open=True),
     _Api._live),
    (Operation("GET", "/v2/health/ready", "readiness: at least one model is served", None,
               open=True, errors=(503,)), _Api._ready),
    (Operation("GET", "/v2/openapi.json", "this document", "OpenApi", open=True),
     _Api._openapi),
    (Operation("GET", "/v2", "server metadata", "ServerMetadata"), _Api._server_metadata),
    (Operation("GET", "/v2/models", "repository index: every served model",
               "RepositoryIndex"), _Api._index),
    (Operation("POST", "/v2/repository/index", "repository index as Triton's model "
               "repository extension answers it (tritonclient's get_model_repository_index)",
               "RepositoryIndexList", request="RepositoryIndexRequest", errors=(400,)),
     _Api._repository_index),
    (Operation("GET", "/v2/models/stats", "statistics of every served model (Triton's "
               "statistics extension)", "ModelStatistics"), _Api._all_stats),
    (Operation("GET", "/v2/edgefleet/status", "agent status: models, figures, installs",
               "Status"), _Api._status),
    (Operation("GET", "/metrics", "the served models in the Prometheus text format, when "
               "[monitor] prometheus is on (docs/telemetry.md)", None, errors=(404,)),
     _Api._metrics),
    (Operation("POST", _INSTALL_PATH, "install a bundle (hot-swap)", "InstallRecord",
               request="bundle", errors=(409, 413, 422)), _Api._install),
    (Operation("GET", "", "model metadata", "ModelMetadata", model=True, errors=(404,)),
     _Api._model_metadata),
    (Operation("GET", "/ready", "model readiness", None, model=True, errors=(404,)),
     _Api._model_ready),
    (Operation("POST", "/infer", "run the model", "InferenceResponse",
               request="InferenceRequest", model=True, errors=(400, 404, 413, 500)),
     _Api._infer),
    (Operation("POST", "/feedback", "report the outcome of an answer, by the answer's id "
               "(docs/experiments.md)", "FeedbackResult", request="Feedback", model=True,
               errors=(400, 404, 413)), _Api._feedback),
    (Operation("GET", "/stats", "statistics of this model (Triton's statistics extension)",
               "ModelStatistics", model=True, errors=(404,)), _Api._model_stats),
)
_EXACT: dict[str, dict[str, _Handler]] = {}
_BY_ACTION: dict[str, dict[str, _Handler]] = {}
for _op, _handler in _ROUTES:
    (_BY_ACTION if _op.model else _EXACT).setdefault(_op.path, {})[_op.method] = _handler
_OPEN_PATHS = frozenset(op.path for op, _ in _ROUTES if op.open)
_MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                         rf"(?P<action>{'|'.join(re.escape(a) for a in _BY_ACTION if a)})?")
_OPENAPI = json.dumps(openapi_document((op for op, _ in _ROUTES), __version__),
                      indent=1).encode()


def _model_name(request: Request) -> str:
    """The model name in a model route's path (an experiment's public name, or a model's)."""
    match = _MODEL_PATH.fullmatch(request.path)
    assert match is not None  # the router only dispatches model routes that match
    return match["name"]


class ApiServer:
    """The API over ``runtime``, listening as ``settings`` say; start() and stop()."""

    def __init__(self, runtime: Runtime, settings: ApiSettings,
                 experiments: DeviceExperiments | None = None) -> None:
        if settings.port is None and settings.unix_socket is None:
            raise AgentError("the API needs a TCP port or a Unix socket to listen on")
        self.runtime = runtime
        self.settings = settings
        #: Arms, response ids and feedback; without a device's own, one kept in memory.
        self.experiments = experiments or DeviceExperiments("local")
        limits = settings.limits
        try:
            self._http = HttpServer(
                _Api(runtime, settings, self.experiments),
                server_name=f"edgefleet-agent/{__version__}",
                tcp=None if settings.port is None else (settings.host, settings.port),
                unix=settings.unix_socket, max_head_bytes=limits.max_head_bytes,
                max_headers=limits.max_headers, idle_timeout_s=limits.idle_timeout_s,
                max_connections=limits.max_connections,
                cors=CorsPolicy(frozenset(settings.cors_origins)) if settings.cors_origins
                else None)
        except OverflowError as exc:  # a port over 65535
            raise AgentError(f"cannot listen on port {settings.port} ({exc}); choose another "
                             "--port") from exc
        except OSError as exc:
            hint = ("is another agent running? choose another --port or socket"
                    if exc.errno == errno.EADDRINUSE
                    else "check --host, --port and --unix-socket")
            raise AgentError(f"cannot listen on {exc.filename} ({exc.strerror}); {hint}") from exc

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

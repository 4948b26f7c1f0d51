"""The operator HTTP API: JSON over the standard library's threading HTTP server.

Routes are :data:`ROUTES`; their description is :data:`fleet_server.api_spec.OPENAPI`,
served at ``GET /api/openapi.json``. Every route but ``/api/enroll`` (authenticated by the
one-time enrollment token it carries) and the spec needs ``Authorization: Bearer TOKEN``
with the admin token, a file made 0600 in the data directory on first start
(:func:`load_admin_token`). Errors are ``{"error": "..."}`` with a 4xx status for a refused
request and 500 for a server fault (logged, details not sent).

It speaks HTTPS only, with a server certificate from the fleet CA (``fleet serve`` issues
it at every start, :meth:`fleet_server.service.FleetService.api_identity`): devices verify it
with the CA their enrollment token pins (``GET /api/fleet`` serves that CA, for the device
to check against the pin before it trusts anything else), and the ``fleet`` commands with
the CA in the data directory. It binds 127.0.0.1 by default.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from bundle.archive import Limits
from bundle.errors import BundleError
from common.atomic import write_atomic
from transport.mqtt import TLSIdentity

from . import __version__
from .api_audit import AUDIT_ROUTES, AUDITED, audit_request, note_root
from .api_experiments import EXPERIMENT_ROUTES
from .api_rollouts import ROLLOUT_ROUTES
from .api_spec import OPENAPI
from .errors import (
    ApiError,
    CSRError,
    EnrollmentError,
    FleetError,
    MonitoringError,
    RegistryError,
    ReleaseError,
    RolloutError,
)
from .https_server import BoundedHTTPSServer, server_context
from .monitoring import api_routes, dashboard
from .registry import (
    BundleRecord,
    DeltaRecord,
    DesiredChange,
    Device,
    EventRecord,
    desired_json,
)
from .service import Enrollment, FleetService, IssuedToken, PublishResult

__all__ = [
    "GENERIC_PROFILE",
    "ROUTES",
    "ApiServer",
    "RawBody",
    "Route",
    "bundle_json",
    "device_json",
    "enrollment_json",
    "event_json",
    "load_admin_token",
    "server_context",
    "token_json",
]

log = logging.getLogger(__name__)

#: JSON request bodies are small; anything larger is a mistake or an attack.
_MAX_JSON_BYTES = 1 << 20
#: Bundle uploads: the bundle reader's own limit.
_MAX_BUNDLE_BYTES = Limits().max_bundle_bytes
_MAX_EVENTS = 10_000
#: Seconds a connection may sit idle (or trickle a request) before it is closed.
_CONNECTION_TIMEOUT_S = 30.0
#: Connections served at once; more are closed at once, so idle or slow clients cannot take
#: every thread and file descriptor of the server.
_MAX_CONNECTIONS = 128
_DEFAULT_TTL_S = 24 * 3600.0
#: An enrollment token is a credential: it must expire, and within a month.
_MAX_TTL_S = 30 * 24 * 3600.0
_DEFAULT_GROUP = "default"
#: The profile recorded for a device that enrolls without one.
GENERIC_PROFILE = "generic"


# --- JSON shapes (also used by the CLI's --json output) ----------------------------------

def device_json(device: Device, *, online: bool | None) -> dict[str, Any]:
    """A device as the API shows it (OpenAPI schema ``Device``); ``online`` is None when
    the server cannot tell (no broker connection)."""
    return {"id": device.id, "group": device.group, "tags": list(device.tags),
            "profile": device.profile, "cert_fingerprint": device.cert_fingerprint,
            "enrolled_at": device.enrolled_at, "last_seen": device.last_seen,
            "online": online,
            "desired": device.desired_json(),
            "reported": dict(device.reported), "reported_at": device.reported_at,
            "converged": device.converged, "encryption_key": device.encryption_key,
            "reset_at": device.reset_at}


def bundle_json(record: BundleRecord | DeltaRecord) -> dict[str, Any]:
    """A stored bundle (schema ``Bundle``); the blob's path stays private."""
    if isinstance(record, DeltaRecord):
        return {"sha256": record.sha256, "size": record.size, "created_at": record.created_at,
                "bundle_sha256": record.bundle_sha256, "base_version": record.base_version}
    return {"sha256": record.sha256, "name": record.name, "version": record.version,
            "size": record.size, "created_at": record.created_at,
            "metadata_version": record.metadata_version, "rollback_of": record.rollback_of}


def event_json(event: EventRecord) -> dict[str, Any]:
    """An event of the log (schema ``Event``)."""
    return {"id": event.id, "at": event.at, "device": event.device, "kind": event.kind,
            "detail": dict(event.detail)}


def change_json(change: DesiredChange) -> dict[str, Any]:
    """A desired-state change (schema ``Change``)."""
    return {"device": change.device, "model": change.model,
            "before": None if change.before is None else desired_json(change.before),
            "after": None if change.after is None else desired_json(change.after)}


def publish_json(result: PublishResult) -> dict[str, Any]:
    """The answer of publish and rollback (schema ``PublishResult``)."""
    return {"devices": list(result.devices),
            "changes": [change_json(c) for c in result.changes],
            "delivered": result.delivered,
            "released": [bundle_json(b) for b in result.released],
            "transfer": None if result.transfer is None else result.transfer.as_json()}


def token_json(issued: IssuedToken) -> dict[str, Any]:
    """An issued enrollment token (schema ``EnrollmentToken``)."""
    return {"token": issued.token, "group": issued.group, "expires_at": issued.expires_at,
            "device": issued.device}


def enrollment_json(enrollment: Enrollment) -> dict[str, Any]:
    """An enrollment (schema ``Enrollment``): PEM strings, root.json in base64."""
    return {"device_id": enrollment.device_id, "fleet": enrollment.fleet,
            "group": enrollment.group,
            "certificate": enrollment.certificate_pem.decode("ascii"),
            "ca_certificate": enrollment.ca_certificate_pem.decode("ascii"),
            "broker_url": enrollment.broker_url,
            "root": base64.b64encode(enrollment.root_json).decode("ascii")}


# --- admin token --------------------------------------------------------------------------

def load_admin_token(path: Path) -> str:
    """The admin token in ``path``, created (256 random bits, mode 0600) if missing."""
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read the admin token {path} ({exc}); fix its permissions or "
                       "delete it to make a new one") from exc
    if token:
        return token
    token = secrets.token_urlsafe(32)
    try:
        write_atomic(path, (token + "\n").encode("ascii"), 0o600)
    except OSError as exc:
        raise ApiError(f"cannot write the admin token {path} ({exc.strerror}); check that the "
                       "data directory is writable") from exc
    log.info("created the admin token %s", path)
    return token


# --- requests and routes ------------------------------------------------------------------

class _HttpError(Exception):
    """Answer with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class Request:
    """One request, as handlers see it."""

    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    #: Header names in lower case.
    headers: Mapping[str, str]
    _read: Callable[[int], bytes] = field(repr=False)
    #: Who sends it: the operator identity of the admin token ("" on open routes).
    actor: str = ""
    #: The JSON body once read (for the audit entry written after the handler).
    cached_json: dict[str, Any] | None = None

    def body(self, limit: int) -> bytes:
        """The body, refused (413) beyond ``limit`` bytes before any of it is read."""
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            raise _HttpError(400, "Content-Length is not a number") from None
        if length < 0:
            raise _HttpError(400, "Content-Length is negative")
        if length > limit:
            raise _HttpError(413, f"the body has {length} bytes, more than the {limit} this "
                             "route accepts")
        return self._read(length)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 if it is not one)."""
        raw = self.body(_MAX_JSON_BYTES)
        try:
            obj = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"the body is not JSON ({exc}); send a JSON object") from None
        except RecursionError:
            raise _HttpError(400, "the body nests JSON too deeply") from None
        if not isinstance(obj, dict):
            raise _HttpError(400, "the body must be a JSON object")
        self.cached_json = obj
        return obj

    def arg(self, name: str) -> str | None:
        """A query parameter (the last one if repeated), or None."""
        values = self.query.get(name)
        return values[-1] if values else None

    def int_arg(self, name: str, default: int, low: int, high: int) -> int:
        """An integer query parameter within [low, high] (400 otherwise)."""
        text = self.arg(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise _HttpError(400, f"query parameter {name}={text!r} is not an integer") \
                from None
        if not low <= value <= high:
            raise _HttpError(400, f"query parameter {name}={value} is outside {low}..{high}")
        return value


Handler = Callable[[FleetService, Request], tuple[int, Any]]


@dataclass(frozen=True)
class Route:
    """One operation: ``path`` is the OpenAPI template (``/api/devices/{id}``)."""

    method: str
    path: str
    handler: Handler
    admin: bool = True
    #: Also open to the scrape token (``/metrics``).
    scrape: bool = False

    @property
    def pattern(self) -> re.Pattern[str]:
        """The path as a regular expression with one named group per ``{param}``."""
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)",
                                       re.escape(self.path)) + "$")


def _openapi(_service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, OPENAPI


def _status(service: FleetService, _request: Request) -> tuple[int, Any]:
    broker = service.broker
    return 200, {"fleet": service.fleet, "broker_url": service.broker_url,
                 "mqtt_connected": service.connected,
                 "disconnected_since": service.disconnected_since,
                 "broker": {"embedded": broker.embedded_process, "running": broker.running,
                            "restarts": broker.restarts, "down_since": broker.down_since},
                 "version": __version__, "devices": len(service.registry.list_devices())}


def _devices(service: FleetService, request: Request) -> tuple[int, Any]:
    devices = service.registry.list_devices(group=request.arg("group"),
                                            tag=request.arg("tag"))
    connected = service.connected
    return 200, {"devices": [device_json(d, online=_online(service, d)) for d in devices],
                 "broker_connected": connected,
                 "disconnected_since": service.disconnected_since}


def _device(service: FleetService, request: Request) -> tuple[int, Any]:
    device = service.registry.get_device(request.params["id"])
    if device is None:
        raise _HttpError(404, f"no device {request.params['id']!r} is enrolled; list them "
                         "with GET /api/devices")
    return 200, device_json(device, online=_online(service, device))


def _online(service: FleetService, device: Device) -> bool | None:
    if not service.connected:
        return None
    return device.online_at(time.time(), service.config.offline_after_s)


def _bundles(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, {"bundles": [bundle_json(b) for b in service.registry.list_bundles()]}


def _upload(service: FleetService, request: Request) -> tuple[int, Any]:
    data = request.body(_MAX_BUNDLE_BYTES)
    if not data:
        raise _HttpError(400, "the body is empty; send the bundle file's bytes")
    try:
        record = service.add_bundle(data)
    except BundleError as exc:
        reason = type(exc).__name__
        raise _HttpError(400, f"bundle refused: {reason}: {exc}", reason) from exc
    except RegistryError as exc:
        raise _HttpError(409, str(exc)) from exc
    return 201, bundle_json(record)


def _selection(body: Mapping[str, Any]) -> tuple[list[str] | None, str | None]:
    devices, group = body.get("devices"), body.get("group")
    if (devices is None) == (group is None):
        raise _HttpError(400, 'give either "devices" (a list of ids) or "group", not both and '
                         "not neither")
    if devices is not None and (not isinstance(devices, list) or not devices
                                or not all(isinstance(d, str) for d in devices)):
        raise _HttpError(400, '"devices" must be a non-empty list of device ids')
    if group is not None and not isinstance(group, str):
        raise _HttpError(400, '"group" must be a string')
    return devices, group


def _publish(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    sha = body.get("bundle_sha256")
    if not isinstance(sha, str):
        raise _HttpError(400, '"bundle_sha256" (a string) is required')
    if service.registry.get_bundle(sha) is None:
        raise _HttpError(404, f"no stored bundle has sha256 {sha!r}; upload it with POST "
                         "/api/bundles and use the sha256 it returns")
    devices, group = _selection(body)
    encrypt_for = body.get("encrypt_for", [])
    if not isinstance(encrypt_for, list) or not all(isinstance(e, str) for e in encrypt_for):
        raise _HttpError(400, '"encrypt_for" must be a list of selectors (device:ID, group:G, '
                         "profile:P)")
    return 200, publish_json(service.publish(sha, devices=devices, group=group,
                                             encrypt_for=encrypt_for))


def _rollback(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    devices, group = _selection(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _HttpError(400, '"model" must be a string')
    return 200, publish_json(service.rollback(devices=devices, group=group, model=model))


def _events(service: FleetService, request: Request) -> tuple[int, Any]:
    order = request.arg("order") or "oldest"
    if order not in ("oldest", "newest"):
        raise _HttpError(400, f"order={order!r}: use oldest (to follow the log with since) "
                         "or newest")
    events = service.registry.events(
        request.int_arg("since", 0, 0, 2**63 - 1), device=request.arg("device"),
        limit=request.int_arg("limit", 1000, 1, _MAX_EVENTS), newest=order == "newest")
    return 200, {"events": [event_json(e) for e in events]}


def _token(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    device = body.get("device")
    if device is not None and not isinstance(device, str):
        raise _HttpError(400, '"device" must be a device id')
    group = body.get("group")
    if group is None:
        # A token to re-enroll a device keeps it in its group unless told otherwise.
        known = service.registry.get_device(device) if device is not None else None
        group = known.group if known is not None else _DEFAULT_GROUP
    ttl = body.get("ttl_s", _DEFAULT_TTL_S)
    if not isinstance(group, str):
        raise _HttpError(400, '"group" must be a string')
    if (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
            or not 0 < ttl <= _MAX_TTL_S):
        raise _HttpError(400, f'"ttl_s" must be a number of seconds from 1 to {_MAX_TTL_S:.0f} '
                         "(30 days); issue a new token when one expires")
    return 201, token_json(service.issue_token(group, float(ttl), device))


def _reset(service: FleetService, request: Request) -> tuple[int, Any]:
    device_id = request.params["id"]
    if service.registry.get_device(device_id) is None:
        raise _HttpError(404, f"no device {device_id!r} is enrolled")
    device = service.reset_device(device_id)
    return 200, device_json(device, online=_online(service, device))


@dataclass(frozen=True)
class RawBody:
    """A response that is not JSON (``/metrics``, the dashboard's files)."""

    content_type: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


def _overview(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, api_routes.overview(service.monitor, service.ingest)


def _metrics(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.totals(service.monitor, _query(request))


def _metric_series(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.series(service.monitor, _query(request))


def _alerts(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, api_routes.alerts(service.monitor, _query(request))


def _prometheus(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, RawBody(*api_routes.prometheus(service.monitor, service.ingest))


def _dashboard(_service: FleetService, request: Request) -> tuple[int, Any]:
    found = dashboard.asset(request.params.get("file", "index.html"))
    if found is None:
        raise _HttpError(404, f"no dashboard file {request.path!r}; open /dashboard")
    return 200, RawBody(*found, headers=dashboard.HEADERS)


def _query(request: Request) -> dict[str, str]:
    return {name: values[-1] for name, values in request.query.items() if values}


def _fleet(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, {"fleet": service.fleet, "ca_certificate": service.ca.cert_pem.decode("ascii"),
                 "root": base64.b64encode(service.root_json()).decode("ascii")}


def _enroll(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    fields = {}
    for name in ("token", "device_id", "csr"):
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise _HttpError(400, f'"{name}" (a non-empty string) is required')
        fields[name] = value
    # An agent that matched no firmware profile runs the generic CPU variants.
    profile = body.get("profile") or GENERIC_PROFILE
    if not isinstance(profile, str):
        raise _HttpError(400, '"profile" must be a string')
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _HttpError(400, '"tags" must be a list of strings')
    encryption_key = body.get("encryption_key")
    if encryption_key is not None and not isinstance(encryption_key, str):
        raise _HttpError(400, '"encryption_key" must be base64 of an X25519 public key')
    try:
        enrollment = service.enroll(fields["token"], fields["device_id"],
                                    fields["csr"].encode("utf-8"), profile, tags,
                                    encryption_key=encryption_key)
    except EnrollmentError as exc:
        raise _HttpError(403, str(exc)) from exc
    return 200, enrollment_json(enrollment)


#: Every operation of the API; :data:`OPENAPI` describes exactly these.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/openapi.json", _openapi, admin=False),
    Route("GET", "/api/status", _status),
    Route("GET", "/api/devices", _devices),
    Route("GET", "/api/devices/{id}", _device),
    Route("POST", "/api/devices/{id}/reset", _reset),
    Route("GET", "/api/bundles", _bundles),
    Route("POST", "/api/bundles", _upload),
    Route("POST", "/api/publish", _publish),
    Route("POST", "/api/rollback", _rollback),
    Route("GET", "/api/events", _events),
    Route("POST", "/api/enroll-tokens", _token),
    Route("GET", "/api/fleet", _fleet, admin=False),
    Route("POST", "/api/enroll", _enroll, admin=False),
    Route("GET", "/api/overview", _overview),
    Route("GET", "/api/metrics", _metrics),
    Route("GET", "/api/metrics/series", _metric_series),
    Route("GET", "/api/alerts", _alerts),
    Route("GET", "/metrics", _prometheus, scrape=True),
    # The page and its files hold no data; what they show comes from the routes above.
    Route("GET", "/dashboard", _dashboard, admin=False),
    Route("GET", "/dashboard/{file}", _dashboard, admin=False),
    *(Route(method, path, handler) for method, path, handler in (*ROLLOUT_ROUTES,
                                                                 *AUDIT_ROUTES)),
    *(Route(method, path, handler) for method, path, handler in EXPERIMENT_ROUTES),
)


# --- the server ---------------------------------------------------------------------------

class ApiServer:
    """The API on ``https://host:port`` (port 0 picks a free one), served from a background
    thread, with the certificate and key of ``tls``.

    ``start()`` / ``stop()`` or a context manager; the service must be started first.
    """

    def __init__(self, service: FleetService, admin_token: str, tls: TLSIdentity, *,
                 host: str = "127.0.0.1", port: int = 0,
                 connection_timeout: float = _CONNECTION_TIMEOUT_S,
                 max_connections: int = _MAX_CONNECTIONS,
                 scrape_token: str | None = None) -> None:
        self.service = service
        # A token that may read /metrics only, for Prometheus (the admin token may too).
        self._scrape = None if scrape_token is None else scrape_token.encode("utf-8")
        self._context = server_context(tls)
        self._connection_timeout = connection_timeout
        self._max_connections = max_connections
        self._token = admin_token.encode("utf-8")
        # The operator's identity in the audit log: the admin token's fingerprint (a new
        # token is a new identity), never the token itself.
        self._actor = f"admin:{hashlib.sha256(self._token).hexdigest()[:12]}"
        self._host = host
        self._port = port
        self._httpd: BoundedHTTPSServer | None = None

    @property
    def url(self) -> str:
        """``https://host:port`` of the listening server."""
        if self._httpd is None:
            raise RuntimeError("the API server is not started")
        host, port = self._httpd.server_address[:2]
        host = str(host)
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    def start(self) -> None:
        """Bind and serve in a background thread. ApiError if the address is unusable."""
        note_root(self.service)  # a key rotation done while the server was down
        handler = type("_BoundHandler", (_Handler,),
                       {"api": self, "timeout": self._connection_timeout})
        try:
            httpd = BoundedHTTPSServer((self._host, self._port), handler,
                                       self._max_connections, self._context,
                                       timeout=self._connection_timeout,
                                       name="operator API")
        except OSError as exc:
            raise ApiError(f"cannot listen on {self._host}:{self._port} ({exc.strerror}); "
                           "choose another --port or stop what uses it") from exc
        self._httpd = httpd
        httpd.serve_in_background()
        log.info("operator API on %s", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stop()

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorized(self, header: str | None, *, scrape: bool = False) -> bool:
        """Whether an Authorization header carries the admin token (or, with ``scrape``,
        the scrape token), compared in constant time."""
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode("utf-8")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given, self._token) or (
            scrape and self._scrape is not None and hmac.compare_digest(given, self._scrape))

    def handle(self, method: str, target: str, headers: Mapping[str, str],
               read: Callable[[int], bytes]) -> tuple[int, Any, dict[str, str]]:
        """Route one request; returns (status, JSON body, extra headers)."""
        parts = urlsplit(target)
        path = unquote(parts.path)
        allowed = []
        for route in ROUTES:
            match = route.pattern.match(path)
            if match is None:
                continue
            allowed.append(route.method)
            if route.method != method:
                continue
            if route.admin and not self.authorized(headers.get("authorization"),
                                                   scrape=route.scrape):
                return 401, {"error": "missing or wrong admin token: send 'Authorization: "
                             "Bearer TOKEN' with the token in the server's admin.token "
                             "file"}, {"WWW-Authenticate": "Bearer"}
            request = Request(method, path, match.groupdict(), parse_qs(parts.query),
                              headers, read, actor=self._actor if route.admin else "")
            return self._call(route, request)
        if allowed:
            return 405, {"error": f"{method} is not supported on {path}; use "
                         f"{' or '.join(allowed)}"}, {"Allow": ", ".join(allowed)}
        return 404, {"error": f"no route {path}; see GET /api/openapi.json"}, {}

    def _call(self, route: Route, request: Request) -> tuple[int, Any, dict[str, str]]:
        try:
            status, body = route.handler(self.service, request)
        except _HttpError as exc:
            error: dict[str, Any] = {"error": str(exc)}
            if exc.reason:
                error["reason"] = exc.reason
            return exc.status, error, {}
        except (CSRError, RegistryError, MonitoringError, RolloutError, ApiError,
                ReleaseError) as exc:
            # A refusal: 409 for what devices would refuse, a handler's own status (404)
            # for an ApiError, else 400.
            refused = (409 if isinstance(exc, ReleaseError)
                       else exc.status or 400 if isinstance(exc, ApiError) else 400)
            return refused, {"error": str(exc)}, {}
        except FleetError as exc:
            log.error("%s %s failed: %s", request.method, request.path, exc)
            return 500, {"error": str(exc)}, {}
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return 500, {"error": "internal error; the server's log has the details"}, {}
        action = AUDITED.get((route.method, route.path))
        if action is not None and 200 <= status < 300:
            audit_request(self.service, action, request, body)
            if action == "bundle.upload":
                note_root(self.service)
        return status, body, {}


class _Handler(BaseHTTPRequestHandler):
    """Glue between http.server and :meth:`ApiServer.handle`."""

    api: ApiServer
    server_version = f"edgefleet/{__version__}"
    #: Socket timeout of every read and write (set per server from ApiServer's
    #: connection_timeout): a silent or trickling client is dropped.
    timeout = _CONNECTION_TIMEOUT_S

    def do_GET(self) -> None:
        self._respond("GET")

    def do_POST(self) -> None:
        self._respond("POST")

    def do_PUT(self) -> None:
        self._respond("PUT")

    def do_DELETE(self) -> None:
        self._respond("DELETE")

    def _respond(self, method: str) -> None:
        server = self.server
        assert isinstance(server, BoundedHTTPSServer)
        server.mark(self.request, busy=True)
        try:
            self._answer(method)
        finally:
            server.mark(self.request, busy=False)

    def _answer(self, method: str) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra = self.api.handle(method, self.path, headers, self.rfile.read)
        if isinstance(body, RawBody):
            data, content_type = body.data, body.content_type
            extra = {**body.headers, **extra}
        else:
            data = json.dumps(body, indent=None, separators=(",", ":")).encode("utf-8")
            content_type = "application/json"
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

"""The operator HTTP API: JSON over the standard library's threading HTTP server.

Routes are :data:`ROUTES`, gathered from one module per concern: ``api_devices`` (status,
devices, events), ``api_bundles`` (bundles, publish, rollback), ``api_enrollment``,
``api_monitoring``, ``api_rollouts`` and ``api_audit``; what a handler sees is
:mod:`fleet_server.api_routing`, the JSON it answers :mod:`fleet_server.api_json`. Their
description is :data:`fleet_server.api_spec.OPENAPI`, served at ``GET /api/openapi.json``.

Every route but ``/api/enroll`` (authenticated by the one-time enrollment token it carries),
``/api/fleet``, the dashboard's files and the spec needs ``Authorization: Bearer TOKEN``
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

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from common.atomic import write_atomic
from transport.mqtt import TLSIdentity

from . import __version__
from .api_audit import AUDIT_ROUTES, AUDITED, audit_request, note_root
from .api_bundles import BUNDLE_ROUTES
from .api_devices import DEVICE_ROUTES
from .api_enrollment import ENROLLMENT_ROUTES
from .api_experiments import EXPERIMENT_ROUTES
from .api_monitoring import MONITORING_ROUTES
from .api_rollouts import ROLLOUT_ROUTES
from .api_routing import HttpError, RawBody, Request, Route
from .api_spec import OPENAPI
from .errors import (
    ApiError,
    CSRError,
    FleetError,
    MonitoringError,
    RegistryError,
    ReleaseError,
    RolloutError,
)
from .https_server import BoundedHTTPSServer, server_context
from .service import FleetService

# Request is re-exported for the route modules that import it from here for their types.
__all__ = ["ROUTES", "ApiServer", "Request", "load_admin_token", "server_context"]

log = logging.getLogger(__name__)

#: Seconds a connection may sit idle (or trickle a request) before it is closed.
_CONNECTION_TIMEOUT_S = 30.0
#: Connections served at once; more are closed at once, so idle or slow clients cannot take
#: every thread and file descriptor of the server.
_MAX_CONNECTIONS = 128


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


# --- routes -------------------------------------------------------------------------------

def _openapi(_service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, OPENAPI


#: Every operation of the API; :data:`OPENAPI` describes exactly these. One line per route
#: module.
ROUTES: tuple[Route, ...] = (
    Route("GET", "/api/openapi.json", _openapi, admin=False),
    *DEVICE_ROUTES,
    *BUNDLE_ROUTES,
    *ENROLLMENT_ROUTES,
    *MONITORING_ROUTES,
    *(Route(method, path, handler) for method, path, handler in ROLLOUT_ROUTES),
    *(Route(method, path, handler) for method, path, handler in AUDIT_ROUTES),
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
        except HttpError as exc:
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

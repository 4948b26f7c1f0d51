"""Cross-origin requests (CORS) from web apps on the device: an allow-list, off by default.

A browser lets a page call the agent only if the agent says the page's origin may: before a
request with a token (or a binary body) it sends a preflight, ``OPTIONS`` with ``Origin``
and ``Access-Control-Request-Method``, which carries no token. :class:`CorsPolicy` decides
both answers from the configured origins (``api.cors_origins``); pure, so the server only
asks it. Origins are compared exactly (scheme, host and port), never with wildcards: any
page that may call the API may run models and, with the token, install them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

__all__ = ["CorsPolicy", "Preflight", "check_origin"]

_METHODS = ("GET", "POST")
_HEADERS = ("authorization", "content-type", "inference-header-content-length")
#: How long a browser may cache a preflight's answer (seconds).
_MAX_AGE_S = 600


def check_origin(origin: str) -> None:
    """Raise ValueError unless ``origin`` is ``scheme://host[:port]`` (what browsers send)."""
    parts = urlsplit(origin)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (parts.scheme not in ("http", "https") or not parts.hostname or not port_ok
            or parts.path or parts.query or parts.fragment or parts.username
            or origin != origin.strip() or origin.endswith("/")):
        raise ValueError(f"{origin!r} is not a web origin; write it as the browser sends it, "
                         "scheme://host[:port] with no path, e.g. http://localhost:3000")


@dataclass(frozen=True)
class Preflight:
    """The answer to a preflight: its status, headers, and why it is refused (or None)."""

    status: HTTPStatus
    headers: Mapping[str, str]
    refused: str | None


@dataclass(frozen=True)
class CorsPolicy:
    """Which web origins may call the API."""

    origins: frozenset[str]

    @staticmethod
    def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
        """Whether a request (lower-case ``headers``) is a CORS preflight."""
        return (method == "OPTIONS" and "origin" in headers
                and "access-control-request-method" in headers)

    def preflight(self, headers: Mapping[str, str]) -> Preflight:
        """The answer to a preflight with these (lower-case) ``headers``."""
        origin = headers["origin"]
        if origin not in self.origins:
            return Preflight(HTTPStatus.FORBIDDEN, {"Vary": "Origin"},
                             f"origin {origin[:200]!r} may not call this agent; add it to "
                             "api.cors_origins in agent.toml (or --cors-origin)")
        method = headers["access-control-request-method"].strip()
        asked = {h.strip().lower() for h in
                 headers.get("access-control-request-headers", "").split(",") if h.strip()}
        unknown = sorted(asked - set(_HEADERS))
        allowed = self.response_headers(origin)
        if method not in _METHODS:
            return Preflight(HTTPStatus.FORBIDDEN, allowed, f"method {method[:20]!r} is not "
                             f"used by this API; it accepts {', '.join(_METHODS)}")
        if unknown:
            return Preflight(HTTPStatus.FORBIDDEN, allowed, f"header(s) "
                             f"{', '.join(unknown)[:200]} are not accepted cross-origin; "
                             f"send only {', '.join(_HEADERS)}")
        return Preflight(HTTPStatus.NO_CONTENT, {
            **allowed, "Access-Control-Allow-Methods": ", ".join(_METHODS),
            "Access-Control-Allow-Headers": ", ".join(_HEADERS),
            "Access-Control-Max-Age": str(_MAX_AGE_S)}, None)

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Headers to add to an answer to a request from ``origin`` (none if not allowed)."""
        if origin is None or origin not in self.origins:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": "Inference-Header-Content-Length"}

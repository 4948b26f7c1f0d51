"""Requests and routes of the operator API as its handlers see them: :class:`Request`,
:class:`Route`, the :class:`HttpError` a handler raises to answer with a status, and
:class:`RawBody` for an answer that is not JSON. :mod:`fleet_server.api` matches requests to
routes; the route modules (``api_*.py``) hold the handlers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["MAX_JSON_BYTES", "Handler", "HttpError", "RawBody", "Request", "Route"]

#: JSON request bodies are small; anything larger is a mistake or an attack.
MAX_JSON_BYTES = 1 << 20


class HttpError(Exception):
    """Answer with ``status`` and ``{"error": message}`` (and ``reason``, a machine-readable
    cause, if given)."""

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
            raise HttpError(400, "Content-Length is not a number") from None
        if length < 0:
            raise HttpError(400, "Content-Length is negative")
        if length > limit:
            raise HttpError(413, f"the body has {length} bytes, more than the {limit} this "
                             "route accepts")
        return self._read(length)

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 if it is not one)."""
        raw = self.body(MAX_JSON_BYTES)
        try:
            obj = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not JSON ({exc}); send a JSON object") from None
        except RecursionError:
            raise HttpError(400, "the body nests JSON too deeply") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "the body must be a JSON object")
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
            raise HttpError(400, f"query parameter {name}={text!r} is not an integer") \
                from None
        if not low <= value <= high:
            raise HttpError(400, f"query parameter {name}={value} is outside {low}..{high}")
        return value



Handler = Callable[["FleetService", Request], tuple[int, Any]]


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


@dataclass(frozen=True)
class RawBody:
    """A response that is not JSON (``/metrics``, the dashboard's files)."""

    content_type: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


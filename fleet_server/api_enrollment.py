"""The operator API's enrollment routes: tokens for the operator, and the two open routes a
device enrolls through (``/api/fleet``, then ``/api/enroll`` with its one-time token;
:mod:`fleet_server.enroller`). Described in :mod:`fleet_server.api_spec`; wired into
:data:`fleet_server.api.ROUTES`."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from .api_json import enrollment_json, token_json
from .api_routing import HttpError, Request, Route
from .errors import EnrollmentError

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["ENROLLMENT_ROUTES", "GENERIC_PROFILE"]

_DEFAULT_TTL_S = 24 * 3600.0
#: An enrollment token is a credential: it must expire, and within a month.
_MAX_TTL_S = 30 * 24 * 3600.0
_DEFAULT_GROUP = "default"
#: The profile recorded for a device that enrolls without one.
GENERIC_PROFILE = "generic"


def _token(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    device = body.get("device")
    if device is not None and not isinstance(device, str):
        raise HttpError(400, '"device" must be a device id')
    group = body.get("group")
    if group is None:
        # A token to re-enroll a device keeps it in its group unless told otherwise.
        known = service.registry.get_device(device) if device is not None else None
        group = known.group if known is not None else _DEFAULT_GROUP
    ttl = body.get("ttl_s", _DEFAULT_TTL_S)
    if not isinstance(group, str):
        raise HttpError(400, '"group" must be a string')
    if (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
            or not 0 < ttl <= _MAX_TTL_S):
        raise HttpError(400, f'"ttl_s" must be a number of seconds from 1 to {_MAX_TTL_S:.0f} '
                         "(30 days); issue a new token when one expires")
    return 201, token_json(service.issue_token(group, float(ttl), device))


def _fleet(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, {"fleet": service.fleet, "ca_certificate": service.ca.cert_pem.decode("ascii"),
                 "root": base64.b64encode(service.root_json()).decode("ascii")}


def _enroll(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    fields = {}
    for name in ("token", "device_id", "csr"):
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise HttpError(400, f'"{name}" (a non-empty string) is required')
        fields[name] = value
    # An agent that matched no firmware profile runs the generic CPU variants.
    profile = body.get("profile") or GENERIC_PROFILE
    if not isinstance(profile, str):
        raise HttpError(400, '"profile" must be a string')
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise HttpError(400, '"tags" must be a list of strings')
    encryption_key = body.get("encryption_key")
    if encryption_key is not None and not isinstance(encryption_key, str):
        raise HttpError(400, '"encryption_key" must be base64 of an X25519 public key')
    try:
        enrollment = service.enroll(fields["token"], fields["device_id"],
                                    fields["csr"].encode("utf-8"), profile, tags,
                                    encryption_key=encryption_key)
    except EnrollmentError as exc:
        raise HttpError(403, str(exc)) from exc
    return 200, enrollment_json(enrollment)


#: The routes of this module.
ENROLLMENT_ROUTES = (
    Route("POST", "/api/enroll-tokens", _token),
    Route("GET", "/api/fleet", _fleet, admin=False),
    Route("POST", "/api/enroll", _enroll, admin=False),
)

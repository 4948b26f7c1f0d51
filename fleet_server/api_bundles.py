"""The operator API's routes of bundles and desired state: the stored bundles, uploads,
publish and rollback (:mod:`fleet_server.publishing`). Described in
:mod:`fleet_server.api_spec`; wired into :data:`fleet_server.api.ROUTES`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bundle.archive import Limits
from bundle.errors import BundleError

from .api_json import bundle_json, publish_json
from .api_routing import HttpError, Request, Route
from .errors import RegistryError

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["BUNDLE_ROUTES"]

#: Bundle uploads: the bundle reader's own limit.
_MAX_BUNDLE_BYTES = Limits().max_bundle_bytes


def _bundles(service: FleetService, _request: Request) -> tuple[int, Any]:
    return 200, {"bundles": [bundle_json(b) for b in service.registry.list_bundles()]}


def _upload(service: FleetService, request: Request) -> tuple[int, Any]:
    data = request.body(_MAX_BUNDLE_BYTES)
    if not data:
        raise HttpError(400, "the body is empty; send the bundle file's bytes")
    try:
        record = service.add_bundle(data)
    except BundleError as exc:
        reason = type(exc).__name__
        raise HttpError(400, f"bundle refused: {reason}: {exc}", reason) from exc
    except RegistryError as exc:
        raise HttpError(409, str(exc)) from exc
    return 201, bundle_json(record)


def _selection(body: Mapping[str, Any]) -> tuple[list[str] | None, str | None]:
    devices, group = body.get("devices"), body.get("group")
    if (devices is None) == (group is None):
        raise HttpError(400, 'give either "devices" (a list of ids) or "group", not both and '
                         "not neither")
    if devices is not None and (not isinstance(devices, list) or not devices
                                or not all(isinstance(d, str) for d in devices)):
        raise HttpError(400, '"devices" must be a non-empty list of device ids')
    if group is not None and not isinstance(group, str):
        raise HttpError(400, '"group" must be a string')
    return devices, group


def _publish(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    sha = body.get("bundle_sha256")
    if not isinstance(sha, str):
        raise HttpError(400, '"bundle_sha256" (a string) is required')
    if service.registry.get_bundle(sha) is None:
        raise HttpError(404, f"no stored bundle has sha256 {sha!r}; upload it with POST "
                         "/api/bundles and use the sha256 it returns")
    devices, group = _selection(body)
    encrypt_for = body.get("encrypt_for", [])
    if not isinstance(encrypt_for, list) or not all(isinstance(e, str) for e in encrypt_for):
        raise HttpError(400, '"encrypt_for" must be a list of selectors (device:ID, group:G, '
                         "profile:P)")
    return 200, publish_json(service.publish(sha, devices=devices, group=group,
                                             encrypt_for=encrypt_for))


def _rollback(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    devices, group = _selection(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise HttpError(400, '"model" must be a string')
    return 200, publish_json(service.rollback(devices=devices, group=group, model=model))



#: The routes of this module.
BUNDLE_ROUTES = (
    Route("GET", "/api/bundles", _bundles),
    Route("POST", "/api/bundles", _upload),
    Route("POST", "/api/publish", _publish),
    Route("POST", "/api/rollback", _rollback),
)

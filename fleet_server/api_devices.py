"""The operator API's routes of the fleet's state: the server's status, the devices (and a
device's reset) and the event log. Described in :mod:`fleet_server.api_spec`; wired into
:data:`fleet_server.api.ROUTES`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .api_json import device_json, event_json
from .api_routing import HttpError, Request, Route
from .registry import Device

if TYPE_CHECKING:
    from .service import FleetService

__all__ = ["DEVICE_ROUTES"]

_MAX_EVENTS = 10_000


def _status(service: FleetService, _request: Request) -> tuple[int, Any]:
    broker, ingest = service.broker, service.ingest
    return 200, {"fleet": service.fleet, "broker_url": service.broker_url,
                 "mqtt_connected": service.connected,
                 "disconnected_since": service.disconnected_since,
                 "broker": {"embedded": broker.embedded_process, "running": broker.running,
                            "restarts": broker.restarts, "down_since": broker.down_since},
                 "instance": service.config.instance,
                 "leader": service.leadership.is_leader(),
                 "ingest": {"queued": ingest.depth, "rate_limited": ingest.dropped,
                            "database_unavailable": ingest.outage},
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
        raise HttpError(404, f"no device {request.params['id']!r} is enrolled; list them "
                         "with GET /api/devices")
    return 200, device_json(device, online=_online(service, device))


def _online(service: FleetService, device: Device) -> bool | None:
    if not service.connected:
        return None
    return device.online_at(time.time(), service.config.offline_after_s)


def _reset(service: FleetService, request: Request) -> tuple[int, Any]:
    device_id = request.params["id"]
    if service.registry.get_device(device_id) is None:
        raise HttpError(404, f"no device {device_id!r} is enrolled")
    device = service.reset_device(device_id)
    return 200, device_json(device, online=_online(service, device))


def _events(service: FleetService, request: Request) -> tuple[int, Any]:
    order = request.arg("order") or "oldest"
    if order not in ("oldest", "newest"):
        raise HttpError(400, f"order={order!r}: use oldest (to follow the log with since) "
                         "or newest")
    events = service.registry.events(
        request.int_arg("since", 0, 0, 2**63 - 1), device=request.arg("device"),
        limit=request.int_arg("limit", 1000, 1, _MAX_EVENTS), newest=order == "newest")
    return 200, {"events": [event_json(e) for e in events]}



#: The routes of this module.
DEVICE_ROUTES = (
    Route("GET", "/api/status", _status),
    Route("GET", "/api/devices", _devices),
    Route("GET", "/api/devices/{id}", _device),
    Route("POST", "/api/devices/{id}/reset", _reset),
    Route("GET", "/api/events", _events),
)

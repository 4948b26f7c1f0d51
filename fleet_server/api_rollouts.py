"""The operator API's rollout routes (``/api/rollouts``), over
:class:`~fleet_server.rollouts.runner.RolloutRunner`. Described in
:mod:`fleet_server.api_spec`; wired into :data:`fleet_server.api.ROUTES`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import ApiError, RolloutError
from .rollouts.model import RolloutState
from .rollouts.runner import RolloutOptions, Selection
from .rollouts.views import rollout_json

if TYPE_CHECKING:
    from .api import Request
    from .service import FleetService

__all__ = ["ROLLOUT_ROUTES"]

_MAX_GATES = 32
_MAX_DEVICES = 100_000


def _list(service: FleetService, request: Request) -> tuple[int, Any]:
    active = request.arg("active") in ("1", "true")
    return 200, {"rollouts": [rollout_json(s, devices=False)
                              for s in service.rollouts.all(active=active)]}


def _get(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, rollout_json(_known(service, request.params["id"]))


def _start(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    sha = body.get("bundle_sha256")
    if not isinstance(sha, str):
        raise RolloutError('"bundle_sha256" (a string) is required')
    if service.registry.get_bundle(sha) is None:
        raise ApiError(f"no stored bundle has sha256 {sha!r}; upload it with POST "
                       "/api/bundles and use the sha256 it returns", 404)
    devices = body.get("devices") or []
    if (not isinstance(devices, list) or len(devices) > _MAX_DEVICES
            or not all(isinstance(d, str) for d in devices)):
        raise RolloutError('"devices" must be a list of device ids')
    selection = Selection(group=_opt_str(body, "group"), devices=tuple(devices),
                          tag=_opt_str(body, "tag"), profile=_opt_str(body, "profile"))
    gates = gate_list(body)
    steps = body.get("steps", list(RolloutOptions.steps))
    if not isinstance(steps, list) or not all(_is_number(s) for s in steps):
        raise RolloutError('"steps" must be a list of percentages (5, 25, 100)')
    defaults = RolloutOptions()
    options = RolloutOptions(
        steps=tuple(float(s) for s in steps), gates=gates,
        bake_s=_number(body, "bake_s", defaults.bake_s),
        shadow_s=_number(body, "shadow_s", defaults.shadow_s),
        shadow_rate=_number(body, "shadow_rate", defaults.shadow_rate),
        compare_share=_number(body, "compare_share", defaults.compare_share),
        min_reporting=_number(body, "min_reporting", defaults.min_reporting))
    state = service.rollouts.create(sha, selection, options, actor=request.actor)
    return 201, rollout_json(state)


def _command(service: FleetService, request: Request) -> tuple[int, Any]:
    rollout = _known(service, request.params["id"]).spec.id
    action = request.params["action"]
    reason = request.json().get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise RolloutError('"reason" must be text of at most 500 characters')
    return 200, rollout_json(service.rollouts.command(rollout, action, request.actor, reason))


def _known(service: FleetService, rollout_id: str) -> RolloutState:
    try:
        return service.rollouts.get(rollout_id)
    except RolloutError as exc:
        raise ApiError(str(exc), 404) from exc


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RolloutError(f'"{key}" must be a string')
    return value


def gate_list(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The request's ``gates``: gate expressions (RolloutError names what is wrong)."""
    gates = body.get("gates", [])
    if (not isinstance(gates, list) or len(gates) > _MAX_GATES
            or not all(isinstance(g, str) for g in gates)):
        raise RolloutError('"gates" must be a list of gate expressions (agreement>=0.98)')
    return tuple(gates)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if not _is_number(value):
        raise RolloutError(f'"{key}" must be a number')
    return float(value)


#: (method, path, handler) of each rollout operation.
ROLLOUT_ROUTES = (
    ("GET", "/api/rollouts", _list),
    ("POST", "/api/rollouts", _start),
    ("GET", "/api/rollouts/{id}", _get),
    ("POST", "/api/rollouts/{id}/{action}", _command),
)

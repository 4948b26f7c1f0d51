"""The operator API's experiment routes (``/api/experiments``), over
:class:`~fleet_server.experiment_runner.ExperimentRunner`; promotion goes through the
rollout controller (:class:`~fleet_server.rollouts.runner.RolloutRunner`). Wired into
:data:`fleet_server.api.ROUTES`; described by :data:`EXPERIMENT_PATHS` (merged into
:data:`fleet_server.api_spec.OPENAPI`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from experiments.errors import ExperimentError

from .api_rollouts import _is_number, _number, gate_list
from .errors import ApiError, RegistryError, RolloutError
from .experiment_runner import ExperimentRequest
from .rollouts.runner import RolloutOptions, Selection
from .rollouts.views import rollout_json

if TYPE_CHECKING:
    from .api import Request
    from .service import FleetService

__all__ = ["EXPERIMENT_PATHS", "EXPERIMENT_ROUTES"]

_MAX_DEVICES = 100_000
_MAX_ARMS = 16
Handler = Callable[["FleetService", "Request"], tuple[int, Any]]


def _refusals(handler: Handler) -> Handler:
    """The pure core's refusals are the client's fault: 400 with its message."""
    def call(service: FleetService, request: Request) -> tuple[int, Any]:
        try:
            return handler(service, request)
        except ExperimentError as exc:
            raise ApiError(str(exc), 400) from exc
    return call


def _list(service: FleetService, request: Request) -> tuple[int, Any]:
    runner = service.experiments
    status = request.arg("status")
    return 200, {"experiments": [runner.status(r.name) for r in
                                 service.registry.list_experiments(status=status)]}


def _get(service: FleetService, request: Request) -> tuple[int, Any]:
    return 200, service.experiments.status(_known(service, request.params["name"]))


def _start(service: FleetService, request: Request) -> tuple[int, Any]:
    body = request.json()
    variants = body.get("variants")
    if (not isinstance(variants, list) or not 2 <= len(variants) <= _MAX_ARMS
            or not all(isinstance(v, dict) and isinstance(v.get("arm"), str)
                       and isinstance(v.get("bundle_sha256"), str) for v in variants)):
        raise ApiError(f'"variants" must list 2 to {_MAX_ARMS} objects {{"arm": name, '
                       '"bundle_sha256": sha256}', 400)
    for v in variants:
        if service.registry.get_bundle(v["bundle_sha256"]) is None:
            raise ApiError(f"no stored bundle has sha256 {v['bundle_sha256']!r}; upload it "
                           "with POST /api/bundles", 404)
    devices = body.get("devices") or []
    if (not isinstance(devices, list) or len(devices) > _MAX_DEVICES
            or not all(isinstance(d, str) for d in devices)):
        raise ApiError('"devices" must be a list of device ids', 400)
    split = body.get("split")
    if split is not None and (not isinstance(split, list) or not all(_is_number(s)
                                                                     for s in split)):
        raise ApiError('"split" must be a list of numbers, one per variant', 400)
    higher = body.get("higher_is_better", True)
    if not isinstance(higher, bool):
        raise ApiError('"higher_is_better" must be true or false', 400)
    defaults = ExperimentRequest("", ())
    record = service.experiments.start(ExperimentRequest(
        name=_str(body, "name", None) or "",
        bundles=tuple((v["arm"], v["bundle_sha256"]) for v in variants),
        split=None if split is None else tuple(float(s) for s in split),
        group=_str(body, "group", None), devices=tuple(devices),
        model=_str(body, "model", None), unit=_str(body, "unit", defaults.unit) or "",
        strategy=_str(body, "strategy", defaults.strategy) or "",
        metric=_str(body, "metric", defaults.metric) or "",
        low=_number(body, "low", defaults.low), high=_number(body, "high", defaults.high),
        higher_is_better=higher, family=_str(body, "family", defaults.family) or "",
        alpha=_number(body, "alpha", defaults.alpha)), request.actor)
    return 201, service.experiments.status(record.name)


def _stop(service: FleetService, request: Request) -> tuple[int, Any]:
    name = _known(service, request.params["name"])
    service.experiments.stop(name, request.actor, reason=_reason(request.json()))
    return 200, service.experiments.status(name)


def _promote(service: FleetService, request: Request) -> tuple[int, Any]:
    """End the experiment and roll the winner's bundle out to its devices."""
    name = _known(service, request.params["name"])
    body = request.json()
    winner = _str(body, "winner", None)
    if winner is None:
        raise ApiError('"winner" (an arm) is required', 400)
    runner = service.experiments
    record = runner.get(name)
    sha = record.detail.get("bundles", {}).get(winner)
    if sha is None:
        raise ApiError(f"{winner!r} is not an arm of {name}", 400)
    defaults = RolloutOptions()
    steps = body.get("steps", list(defaults.steps))
    if not isinstance(steps, list) or not all(_is_number(s) for s in steps):
        raise ApiError('"steps" must be a list of percentages (5, 25, 100)', 400)
    options = RolloutOptions(steps=tuple(float(s) for s in steps), gates=gate_list(body),
                             bake_s=_number(body, "bake_s", defaults.bake_s))
    devices = tuple(service.registry.experiment_devices(name))
    if record.status == "running":  # stop() refuses the others with its own message
        # Everything the rollout would refuse, before the experiment ends: all or nothing.
        try:
            service.rollouts.precheck(sha, Selection(devices=devices), options)
        except (RolloutError, RegistryError) as exc:
            raise ApiError(f"experiment {name} is still running: the rollout of {winner} "
                           f"would be refused: {exc}", 409) from exc
    runner.stop(name, request.actor, winner=winner, reason=_reason(body))
    try:
        rollout = service.rollouts.create(sha, Selection(devices=devices), options,
                                          actor=request.actor)
    except (RolloutError, RegistryError) as exc:
        raise ApiError(f"experiment {name} ended with {winner} promoted, but its rollout "
                       f"could not start: {exc}; start it with `fleet rollout start`",
                       409) from exc
    return 200, {"experiment": runner.status(name), "rollout": rollout_json(rollout)}


def _known(service: FleetService, name: str) -> str:
    try:
        return service.experiments.get(name).name
    except RegistryError as exc:
        raise ApiError(str(exc), 404) from exc


def _reason(body: Mapping[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > 500:
        raise ApiError('"reason" must be text of at most 500 characters', 400)
    return reason


def _str(body: Mapping[str, Any], key: str, default: str | None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise ApiError(f'"{key}" must be a string', 400)
    return value


#: (method, path, handler) of each experiment operation.
EXPERIMENT_ROUTES = (
    ("GET", "/api/experiments", _refusals(_list)),
    ("POST", "/api/experiments", _refusals(_start)),
    ("GET", "/api/experiments/{name}", _refusals(_get)),
    ("POST", "/api/experiments/{name}/stop", _refusals(_stop)),
    ("POST", "/api/experiments/{name}/promote", _refusals(_promote)),
)

_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_ERROR = {"description": "refused (the error says why)", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}
_EXPERIMENT = {"description": "the experiment: declaration, status, per arm n, mean, "
               "always-valid interval, probability of being best, and the verdict",
               "content": {"application/json": {"schema": {"type": "object", "required": [
                   "experiment", "status", "verdict", "arms"]}}}}
_ERRORS = {"400": _ERROR, "401": _ERROR, "404": _ERROR}

#: The OpenAPI paths of :data:`EXPERIMENT_ROUTES` (docs/experiments.md).
EXPERIMENT_PATHS: dict[str, Any] = {
    "/api/experiments": {
        "get": {"summary": "Experiments, newest first, each with its status",
                "parameters": [{"name": "status", "in": "query", "schema": {
                    "type": "string", "enum": ["running", "stopped", "promoted"]}}],
                "responses": {"200": {"description": "the experiments", "content": {
                    "application/json": {"schema": {"type": "object", "required": [
                        "experiments"]}}}}, **_ERRORS}},
        "post": {"summary": "Start an A/B test or a bandit (docs/experiments.md)",
                 "description": "Give exactly one of group, devices. Each variant's bundle "
                 "becomes a desired model of the devices that may serve it.",
                 "requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"type": "object", "required": ["name", "variants"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "variants": {"type": "array", "items": {
                                        "type": "object", "required": ["arm",
                                                                       "bundle_sha256"]}},
                                    "group": {"type": "string"},
                                    "devices": {"type": "array",
                                                "items": {"type": "string"}},
                                    "split": {"type": "array", "items": {"type": "number"}},
                                    "model": {"type": "string"},
                                    "unit": {"type": "string", "enum": ["device", "request"]},
                                    "strategy": {"type": "string",
                                                 "enum": ["split", "thompson"]},
                                    "metric": {"type": "string"},
                                    "low": {"type": "number"}, "high": {"type": "number"},
                                    "higher_is_better": {"type": "boolean"},
                                    "family": {"type": "string", "enum": ["beta", "normal"]},
                                    "alpha": {"type": "number"}}}}}},
                 "responses": {"201": _EXPERIMENT, **_ERRORS, "409": _ERROR}}},
    "/api/experiments/{name}": {"get": {
        "summary": "One experiment's status", "parameters": _NAME,
        "responses": {"200": _EXPERIMENT, **_ERRORS}}},
    "/api/experiments/{name}/stop": {"post": {
        "summary": "End it: devices serve the public model name directly again",
        "parameters": _NAME,
        "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"reason": {"type": "string"}}}}}},
        "responses": {"200": _EXPERIMENT, **_ERRORS}}},
    "/api/experiments/{name}/promote": {"post": {
        "summary": "End it and roll the winner's bundle out to its devices (a rollout)",
        "parameters": _NAME,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["winner"], "properties": {
                "winner": {"type": "string"}, "reason": {"type": "string"},
                "steps": {"type": "array", "items": {"type": "number"}},
                "bake_s": {"type": "number"}}}}}},
        "responses": {"200": {"description": "the experiment and the rollout started",
                              "content": {"application/json": {"schema": {
                                  "type": "object",
                                  "required": ["experiment", "rollout"]}}}},
                      **_ERRORS, "409": _ERROR}}},
}

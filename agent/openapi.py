"""The local API's OpenAPI 3.1 document, generated from the routes the server dispatches on.

:mod:`.http_api` keeps one table of :class:`Operation` records, each paired with its
handler; the router dispatches from that table and :func:`openapi_document` describes the
same table, so a route cannot exist without being documented or be documented without
existing. The response schemas below are checked against real answers of a running agent
(tests/agent/test_openapi.py validates every documented operation's answer with
jsonschema). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .tensors import DATATYPE_OF

__all__ = ["MODEL_PREFIX", "Operation", "openapi_document"]

#: Model routes are documented under this prefix, with and without ``/versions/{version}``.
MODEL_PREFIX = "/v2/models/{model}"

_BUNDLE = "bundle"
_JSON = "application/json"
_ERROR_MEANING = {
    400: "the request is malformed or does not fit the model's signature",
    401: "missing or wrong bearer token",
    404: "no such model or version (feedback: no answer with that id awaits an outcome)",
    405: "method not allowed on this path",
    409: "this agent has no state directory, so it cannot install bundles",
    413: "the request is over one of the agent's limits (api.limits)",
    422: "the bundle was rejected or its install failed (the install record says why)",
    500: "the model failed while running",
    503: "no model is served yet",
}


@dataclass(frozen=True)
class Operation:
    """One documented operation of the local API.

    ``path`` is exact, or a suffix (``""``, ``"/infer"``...) of a model route when ``model``
    is set. ``response`` and ``request`` name schemas of :data:`SCHEMAS` (``request`` may be
    ``"bundle"``: a bundle file as the body). ``open`` operations need no token.
    """

    method: str
    path: str
    summary: str
    response: str | None
    request: str | None = None
    open: bool = False
    model: bool = False
    errors: tuple[int, ...] = ()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_DATATYPE = {"type": "string", "enum": sorted(DATATYPE_OF.values())}
_SHAPE = {"type": "array", "items": {"type": "integer"}}
_PARAMETERS = {"type": "object"}
_STAT = {"type": "object", "required": ["count", "ns"],
         "properties": {"count": {"type": "integer", "minimum": 0},
                        "ns": {"type": "integer", "minimum": 0}}}

#: The components' schemas (JSON Schema 2020-12, as OpenAPI 3.1 uses).
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"],
                       "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                      "extensions": {"type": "array",
                                                     "items": {"type": "string"}}}},
    "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": _DATATYPE,
                                      "shape": {**_SHAPE, "description": "-1: any size"}}},
    "ModelMetadata": {
        "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "parameters": {
                "type": "object",
                "description": "edgefleet: backend, the device actually used, why a "
                               "preferred accelerator is not (fallback), state, source",
                "properties": {"backend": {"type": "string"},
                               "device": {"type": "string"},
                               "fallback": {"type": ["string", "null"]},
                               "state": {"enum": ["serving", "probation"]},
                               "source": {"type": "string"}}}}},
    "RepositoryModel": {
        "type": "object", "required": ["name", "version", "state", "reason"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "state": {"enum": ["READY"]}, "reason": {"type": "string"}}},
    "RepositoryIndex": {"type": "object", "required": ["models"],
                        "properties": {"models": {"type": "array",
                                                  "items": _ref("RepositoryModel")}}},
    "RepositoryIndexList": {"type": "array", "items": _ref("RepositoryModel")},
    "RepositoryIndexRequest": {"type": "object",
                               "properties": {"ready": {"type": "boolean"}}},
    "ModelStatistics": {
        "type": "object", "required": ["model_stats"],
        "properties": {"model_stats": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "version", "last_inference", "inference_count",
                         "execution_count", "inference_stats", "batch_stats"],
            "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "last_inference": {"type": "integer", "minimum": 0,
                                   "description": "ms since the epoch; 0: none yet"},
                "inference_count": {"type": "integer", "minimum": 0},
                "execution_count": {"type": "integer", "minimum": 0},
                "inference_stats": {
                    "type": "object", "required": ["success", "fail", "compute_infer"],
                    "properties": {"success": _STAT, "fail": _STAT, "compute_infer": _STAT}},
                "batch_stats": {"type": "array"}}}}}},
    "RequestInput": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {"name": {"type": "string"}, "shape": _SHAPE, "datatype": _DATATYPE,
                       "parameters": {**_PARAMETERS, "properties": {
                           "binary_data_size": {"type": "integer"}}},
                       "data": {"type": "array",
                                "description": "row-major values (omit with binary data)"}}},
    "RequestOutput": {"type": "object", "required": ["name"],
                      "properties": {"name": {"type": "string"}, "parameters": {
                          **_PARAMETERS,
                          "properties": {"binary_data": {"type": "boolean"}}}}},
    "InferenceRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"},
                       "parameters": {**_PARAMETERS, "properties": {
                           "binary_data_output": {"type": "boolean"},
                           "client_key": {"type": "string", "description":
                                          "the app's user or session: one experiment arm "
                                          "per key"}}},
                       "inputs": {"type": "array", "items": _ref("RequestInput")},
                       "outputs": {"type": "array", "items": _ref("RequestOutput")}}},
    "ResponseOutput": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {"name": {"type": "string"}, "shape": _SHAPE, "datatype": _DATATYPE,
                       "parameters": _PARAMETERS, "data": {"type": "array"}}},
    "InferenceResponse": {
        "type": "object", "required": ["model_name", "model_version", "id", "outputs"],
        "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                       "id": {"type": "string", "description": "the request's id, else a "
                              "fresh one: report the outcome with it (feedback)"},
                       "outputs": {"type": "array", "items": _ref("ResponseOutput")}}},
    "Feedback": {
        "type": "object", "required": ["id"],
        "oneOf": [{"required": ["reward"]}, {"required": ["label"]}],
        "description": "exactly one of reward and label",
        "properties": {"id": {"type": "string", "minLength": 1, "maxLength": 64},
                       "reward": {"type": "number", "description": "clipped to the "
                                  "experiment's reward range when learnt"},
                       "label": {"type": "integer", "description": "the true class: reward "
                                 "1 when the answer predicted it, else 0"}}},
    "FeedbackResult": {"type": "object", "required": ["reward"],
                       "properties": {"reward": {"type": "number"}}},
    "Status": {"type": "object", "required": ["models", "installs", "problems"],
               "properties": {"models": {"type": "array", "items": {"type": "object"}},
                              "installs": {"type": "array", "items": {"type": "object"}},
                              "problems": {"type": "array", "items": {"type": "string"}}}},
    "InstallRecord": {"type": "object", "required": ["id", "state", "reason"]},
    "OpenApi": {"type": "object", "required": ["openapi", "paths"]},
}


def openapi_document(operations: Iterable[Operation], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``operations`` (the server's route table)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        templates = ([f"{MODEL_PREFIX}{op.path}", f"{MODEL_PREFIX}/versions/{{version}}{op.path}"]
                     if op.model else [op.path])
        for template in templates:
            paths.setdefault(template, {})[op.method.lower()] = _operation(op, template)
    return {
        "openapi": "3.1.0",
        "info": {"title": "edgefleet agent local API", "version": version,
                 "description": "Open Inference Protocol v2 (KServe v2) with the binary "
                                "tensor, model repository (index) and statistics extensions, "
                                "plus edgefleet's status and install. Send "
                                "'Authorization: Bearer <token>' (the agent's api-token "
                                "file) on every operation not marked open."},
        "servers": [{"url": "http://127.0.0.1:8470"}],
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(op: Operation, template: str) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary,
                           "operationId": _operation_id(op.method, template)}
    if op.open:
        out["security"] = []
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in ("model", "version") if f"{{{name}}}" in template]
    if parameters:
        out["parameters"] = parameters
    if op.request == _BUNDLE:
        out["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary",
                       "description": "a signed bundle file (.efb)"}}}}
    elif op.request is not None:
        content: dict[str, Any] = {_JSON: {"schema": _ref(op.request)}}
        if op.request == "InferenceRequest":
            content["application/octet-stream"] = {"schema": {
                "type": "string", "format": "binary",
                "description": "binary tensor extension: the JSON request (its length in "
                               "the Inference-Header-Content-Length header), then the "
                               "tensors' bytes"}}
        out["requestBody"] = {"required": op.request != "RepositoryIndexRequest",
                              "content": content}
    ok: dict[str, Any] = {"description": "success"}
    if op.response is not None:
        ok["content"] = {_JSON: {"schema": _ref(op.response)}}
    responses: dict[str, Any] = {"200": ok}
    errors = op.errors if op.open else (401, *op.errors)
    for status in sorted(errors):
        responses[str(status)] = {"description": _ERROR_MEANING[status]}
        if status != 503:
            schema = "InstallRecord" if status == 422 else "Error"
            responses[str(status)]["content"] = {_JSON: {"schema": _ref(schema)}}
    out["responses"] = responses
    return out


def _operation_id(method: str, template: str) -> str:
    words = [part.strip("{}") for part in template.split("/") if part and part != "v2"]
    return method.lower() + "".join(w.replace(".", "_").title().replace("_", "")
                                     for w in words)

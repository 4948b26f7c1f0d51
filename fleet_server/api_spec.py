"""The OpenAPI 3 description of the operator HTTP API: the one place it is written.

``GET /api/openapi.json`` serves :data:`OPENAPI` as is, and ``tests/fleet_server/
test_api.py`` checks that every operation here is a route of :mod:`fleet_server.api` and
every route is described here, so the two cannot drift apart.

Why one module of about 500 lines: it is one document, declarative data without logic, whose
paths refer to its shared schemas (``$ref``); split by route module it would scatter what is
served, read and reviewed as one.
"""

from __future__ import annotations

from typing import Any

from .api_experiments import EXPERIMENT_PATHS

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "the request is malformed or refused (the error says why)",
            401: "missing or wrong bearer token",
            403: "the enrollment token is unknown, used, expired, of another root, or for "
                 "another device; or the device id is enrolled already",
            404: "no such device or bundle",
            409: "conflicts with what is stored (e.g. another bundle has this name and "
                 "version), or devices would refuse it",
            413: "the body is too large"}
    return {str(c): _json(_ref("Error"), text[c]) for c in codes}


_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
#: A time (seconds since the epoch) something started, null if it is not the case now.
_SINCE = {"type": "number", "nullable": True}
_DESIRED_MODEL = {"type": "object", "required": ["version", "bundle_sha256", "size"],
                  "properties": {"version": {"type": "integer", "minimum": 1},
                                 "bundle_sha256": _SHA256,
                                 "size": {"type": "integer", "description": "bytes"}}}
_SELECTION = {
    "devices": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                "description": "device ids; give this or group"},
    "group": {"type": "string", "description": "every device of this group; give this or "
              "devices"},
}

_WINDOW = {"name": "window", "in": "query",
           "schema": {"type": "integer", "minimum": 60, "maximum": 7776000},
           "description": "seconds back from now (default 3600)"}
_METRIC_FILTERS = [{"name": name, "in": "query", "schema": {"type": kind},
                    "description": f"only this {name}"}
                   for name, kind in (("device", "string"), ("group", "string"),
                                      ("profile", "string"), ("model", "string"),
                                      ("version", "integer"))]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "edgefleet operator API",
        "version": "1",
        "description": "Devices, bundles, desired state and events of one fleet "
        "(docs/fleet-server.md), over HTTPS with a certificate from the fleet CA. Every "
        "operation but /api/fleet, /api/enroll and /api/openapi.json needs the admin token "
        "(DATA/admin.token) as a bearer token. Errors are "
        '{"error": "what was wrong and what to do"}.',
    },
    "security": [{"admin": []}],
    "paths": {
        "/api/openapi.json": {"get": {
            "summary": "This description", "security": [],
            "responses": {"200": _json({"type": "object"}, "the OpenAPI document")}}},
        "/api/status": {"get": {
            "summary": "The server: fleet, broker URL, whether its MQTT link is up",
            "responses": {"200": _json(_ref("Status"), "status"), **_errors(401)}}},
        "/api/devices": {"get": {
            "summary": "Enrolled devices, in id order",
            "parameters": [
                {"name": "group", "in": "query", "schema": {"type": "string"},
                 "description": "only this group's devices"},
                {"name": "tag", "in": "query", "schema": {"type": "string"},
                 "description": "only devices with this tag"}],
            "responses": {"200": _json({"type": "object", "required": ["devices"],
                                        "properties": {
                                            "devices": {"type": "array",
                                                        "items": _ref("Device")},
                                            "broker_connected": {
                                                "type": "boolean", "description":
                                                "false: the server cannot see devices now; "
                                                "their state is as last reported"},
                                            "disconnected_since": _SINCE}},
                                       "the devices"), **_errors(401)}}},
        "/api/devices/{id}": {"get": {
            "summary": "One device",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Device"), "the device"), **_errors(401, 404)}}},
        "/api/devices/{id}/reset": {"post": {
            "summary": "Reset a device: revoke its certificate, free its id for any token",
            "description": "The device's certificate goes on the fleet CA's revocation list "
            "and the broker refuses it from now on (an embedded broker restarts to drop its "
            "connection). The next enrollment of this id needs no device-bound token; group, "
            "tags and desired state are kept for it.",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Device"), "the device as it was enrolled"),
                          **_errors(401, 404)}}},
        "/api/bundles": {
            "get": {"summary": "Stored bundles, by name then version",
                    "responses": {"200": _json({"type": "object", "required": ["bundles"],
                                                "properties": {"bundles": {
                                                    "type": "array",
                                                    "items": _ref("Bundle")}}},
                                               "the bundles"), **_errors(401)}},
            "post": {
                "summary": "Upload a signed bundle",
                "description": "The body is the bundle file. It is verified against the "
                "fleet's root.json (signatures, hashes, expiry) and stored under the name "
                "and version of its signed manifest. The same bytes again return the stored "
                "record. A delta bundle (docs/bundle-format.md §8) is stored with the full "
                "bundle of its release, which must be uploaded first; the answer then has "
                "bundle_sha256 and base_version.",
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"201": _json(_ref("Bundle"), "stored"),
                              **_errors(400, 401, 409, 413)}}},
        "/api/publish": {"post": {
            "summary": "Make a stored bundle desired for devices or a group",
            "description": "Records the desired state, then publishes each selected "
            "device's full desired state (retained) on MQTT. Refused (409, nothing changed) "
            "if a selected device would refuse the bundle: a lower version than it has, or "
            "metadata older than it trusts. With encrypt_for, the server first re-releases "
            "the bundle (next version) with its artifacts encrypted for those devices, and "
            "publishes that.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["bundle_sha256"],
                "properties": {"bundle_sha256": _SHA256, **_SELECTION,
                               "encrypt_for": {"type": "array", "items": {
                                   "type": "string", "pattern": "^(device|group|profile):.+$"},
                                   "description": "recipients: device:ID, group:G, "
                                   "profile:P"}}}}}},
            "responses": {"200": _json(_ref("PublishResult"), "published"),
                          **_errors(400, 401, 404, 409)}}},
        "/api/rollback": {"post": {
            "summary": "Undo the last desired-state change of devices or a group",
            "description": "Each bundle devices go back to is re-released first: its "
            "contents under the next version of its model and fresh metadata, signed by the "
            "server with its online keys, with rollback_of naming the version restored "
            "(devices refuse lower versions). 409 if the server holds no online keys.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {**_SELECTION, "model": {
                    "type": "string", "description": "only changes of this model"}}}}}},
            "responses": {"200": _json(_ref("PublishResult"), "rolled back and published"),
                          **_errors(400, 401, 409)}}},
        "/api/events": {"get": {
            "summary": "The event log in id order; poll with since = the last id seen",
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0},
                 "description": "only events with a greater id (default 0)"},
                {"name": "device", "in": "query", "schema": {"type": "string"},
                 "description": "only this device's events"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                 "description": "at most this many (default 1000)"},
                {"name": "order", "in": "query",
                 "schema": {"type": "string", "enum": ["oldest", "newest"]},
                 "description": "which events to keep when there are more than limit: "
                 "the oldest (default; to follow the log) or the newest; either way "
                 "they are returned in id order"}],
            "responses": {"200": _json({"type": "object", "required": ["events"],
                                        "properties": {"events": {
                                            "type": "array", "items": _ref("Event")}}},
                                       "the events"), **_errors(400, 401)}}},
        "/api/enroll-tokens": {"post": {
            "summary": "Issue a one-time enrollment token",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object",
                "properties": {"group": {"type": "string", "description": "default: the "
                                         "device's group with device, else default"},
                               "ttl_s": {"type": "number", "default": 86400,
                                         "description": "lifetime in seconds"},
                               "device": {"type": "string", "description": "only this "
                                          "device id, which it may take even if enrolled "
                                          "(re-enrollment)"}}}}}},
            "responses": {"201": _json(_ref("EnrollmentToken"), "the token (shown once)"),
                          **_errors(400, 401)}}},
        "/api/fleet": {"get": {
            "summary": "What a device checks against its token's pins before enrolling",
            "security": [],
            "description": "Public: the fleet CA certificate and root.json are what every "
            "device trusts anyway. A device fetches them without verifying the server (it "
            "has no CA yet), compares their SHA-256 with the pins in its token, and only "
            "then talks to the server over TLS verified with this CA.",
            "responses": {"200": _json({
                "type": "object", "required": ["fleet", "ca_certificate", "root"],
                "properties": {"fleet": {"type": "string"},
                               "ca_certificate": {"type": "string", "description": "PEM"},
                               "root": {"type": "string", "format": "byte",
                                        "description": "root.json, base64"}}},
                "the fleet's trust anchors")}}},
        "/api/enroll": {"post": {
            "summary": "Enroll a device (authenticated by its one-time token)",
            "security": [],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("EnrollRequest")}}},
            "responses": {"200": _json(_ref("Enrollment"), "enrolled"),
                          **_errors(400, 403)}}},
        "/api/overview": {"get": {
            "summary": "The fleet at a glance: devices online, versions per group, "
            "convergence, firing alerts, ingest queue and lag",
            "responses": {"200": _json(_ref("Overview"), "the overview"), **_errors(401)}}},
        "/api/metrics": {"get": {
            "summary": "Telemetry summed over a window per device, group, profile, model "
            "or version: requests, errors, error rate, latency quantiles, drift, devices",
            "parameters": [_WINDOW,
                           {"name": "by", "in": "query", "schema": {"type": "string"},
                            "description": "comma-separated keys among device, group, "
                            "profile, model, version (default group,model,version)"},
                           *_METRIC_FILTERS],
            "responses": {"200": _json({"type": "object", "properties": {
                "window_s": {"type": "integer"}, "by": {"type": "array", "items": {
                    "type": "string"}},
                "totals": {"type": "array", "items": _ref("MetricTotals")}}}, "the sums"),
                **_errors(400, 401)}}},
        "/api/metrics/series": {"get": {
            "summary": "Telemetry summed per step over a window (for charts)",
            "parameters": [_WINDOW,
                           {"name": "step", "in": "query", "schema": {
                               "type": "integer", "minimum": 60, "maximum": 86400},
                            "description": "seconds per point, a multiple of 60 (default "
                            "60; at most 1440 points)"},
                           *_METRIC_FILTERS],
            "responses": {"200": _json({"type": "object", "properties": {
                "window_s": {"type": "integer"}, "step_s": {"type": "integer"},
                "points": {"type": "array", "items": _ref("MetricTotals"),
                           "description": "each with at: the start of its step"}}},
                "the points"), **_errors(400, 401)}}},
        "/api/alerts": {"get": {
            "summary": "Alerts: the firing ones, or all with state=all",
            "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string",
                                                            "enum": ["firing", "all"]}},
                {"name": "kind", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 10000}}],
            "responses": {"200": _json({"type": "object", "properties": {"alerts": {
                "type": "array", "items": _ref("Alert")}}}, "the alerts"),
                **_errors(400, 401)}}},
        "/metrics": {"get": {
            "summary": "Prometheus exposition of the fleet (text format 0.0.4)",
            "description": "Needs the admin token or the scrape token "
            "(scrape_token_file in the server config's [monitoring]). docs/monitoring.md "
            "lists the metrics.",
            "responses": {"200": {"description": "the metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, **_errors(401)}}},
        "/dashboard": {"get": {
            "summary": "The web dashboard (its sign-in page asks for the admin token)",
            "security": [],
            "responses": {"200": {"description": "the page", "content": {
                "text/html": {"schema": {"type": "string"}}}}}}},
        "/dashboard/": {"get": {
            "summary": "The web dashboard, as at /dashboard (a bookmark or proxy adds the "
            "slash)",
            "security": [],
            "responses": {"200": {"description": "the page", "content": {
                "text/html": {"schema": {"type": "string"}}}}}}},
        "/dashboard/{file}": {"get": {
            "summary": "The dashboard's script and style sheet (no fleet data)",
            "security": [],
            "parameters": [{"name": "file", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the file"}, **_errors(404)}}},
        "/api/rollouts": {
            "get": {"summary": "Rollouts, newest first (without per-device outcomes)",
                    "parameters": [{"name": "active", "in": "query",
                                    "schema": {"type": "string", "enum": ["true", "false"]},
                                    "description": "only running and paused ones"}],
                    "responses": {"200": _json({"type": "object", "required": ["rollouts"],
                                                "properties": {"rollouts": {
                                                    "type": "array",
                                                    "items": _ref("Rollout")}}},
                                               "the rollouts"), **_errors(400, 401)}},
            "post": {
                "summary": "Start a rollout of a stored bundle (docs/rollouts.md)",
                "description": "Give exactly one of devices, group, tag, profile. Steps are "
                "increasing percentages ending at 100; gates are expressions such as "
                "agreement>=0.98 (replacing that metric's default) or METRIC=off.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "required": ["bundle_sha256"], "properties": {
                        "bundle_sha256": _SHA256, **_SELECTION,
                        "tag": {"type": "string"}, "profile": {"type": "string"},
                        "steps": {"type": "array", "items": {"type": "number"},
                                  "default": [5, 25, 100]},
                        "bake_s": {"type": "number", "default": 600},
                        "shadow_s": {"type": "number", "default": 0},
                        "gates": {"type": "array", "items": {"type": "string"}},
                        "shadow_rate": {"type": "number", "default": 0.1},
                        "compare_share": {"type": "number", "default": 0.1},
                        "min_reporting": {"type": "number", "default": 0.8}}}}}},
                "responses": {"201": _json(_ref("Rollout"), "started"),
                              **_errors(400, 401, 404, 409)}}},
        "/api/rollouts/{id}": {"get": {
            "summary": "One rollout: state, current step, per step devices and results, "
            "every gate with measured value, threshold and sample size",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("Rollout"), "the rollout"), **_errors(401, 404)}}},
        "/api/rollouts/{id}/{action}": {"post": {
            "summary": "pause, resume, abort (back to the previous version) or promote "
            "(every target gets the version now)",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "action", "in": "path", "required": True,
                            "schema": {"type": "string",
                                       "enum": ["pause", "resume", "abort", "promote"]}}],
            "requestBody": {"content": {"application/json": {"schema": {
                "type": "object", "properties": {"reason": {"type": "string"}}}}}},
            "responses": {"200": _json(_ref("Rollout"), "the rollout after it"),
                          **_errors(400, 401, 404)}}},
        "/api/audit": {"get": {
            "summary": "The hash-chained audit log, oldest first, and its head",
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0},
                 "description": "only entries with a greater seq (default 0)"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            "responses": {"200": _json({"type": "object", "required": ["entries", "head"],
                                        "properties": {
                                            "entries": {"type": "array",
                                                        "items": _ref("AuditEntry")},
                                            "head": {"type": "object", "properties": {
                                                "seq": {"type": "integer"},
                                                "hash": _SHA256}}}},
                                       "entries"), **_errors(400, 401)}}},
        **EXPERIMENT_PATHS,
    },
    "components": {
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer",
                                      "description": "the contents of DATA/admin.token"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"},
                                     "reason": {"type": "string", "description":
                                                "for a refused bundle: the bundle error "
                                                "class, e.g. SignatureError"}}},
            "Status": {"type": "object",
                       "properties": {"fleet": {"type": "string"},
                                      "broker_url": {"type": "string"},
                                      "mqtt_connected": {"type": "boolean"},
                                      "disconnected_since": _SINCE,
                                      "broker": {"type": "object", "properties": {
                                          "embedded": {"type": "boolean"},
                                          "running": {"type": "boolean"},
                                          "restarts": {"type": "integer"},
                                          "down_since": _SINCE}},
                                      "instance": {"type": "string", "nullable": True,
                                                   "description": "fleet serve --instance"},
                                      "leader": {"type": "boolean", "description":
                                                 "whether this process does the fleet's "
                                                 "once-only work (docs/scale.md)"},
                                      "ingest": {"type": "object", "properties": {
                                          "queued": {"type": "integer"},
                                          "rate_limited": {"type": "integer",
                                                           "description": "device messages "
                                                           "dropped since start"},
                                          "database_unavailable": {"type": "boolean"}}},
                                      "version": {"type": "string"},
                                      "devices": {"type": "integer"}}},
            "Device": {"type": "object", "properties": {
                "id": {"type": "string"}, "group": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "profile": {"type": "string"}, "cert_fingerprint": _SHA256,
                "enrolled_at": {"type": "number"},
                "last_seen": {"type": "number", "nullable": True},
                "online": {"type": "boolean", "nullable": True, "description":
                           "null while the server has no broker connection (unknown)"},
                "desired": {"type": "object", "additionalProperties": _DESIRED_MODEL,
                            "description": "model name -> what the device should run"},
                "reported": {"type": "object", "description": "the device's last report, "
                             "as sent (protocol.messages.Reported)"},
                "reported_at": {"type": "number", "nullable": True},
                "converged": {"type": "boolean", "description": "reports every desired "
                              "model at its desired version, committed"},
                "encryption_key": {"type": "string", "nullable": True, "description":
                                   "its X25519 public key, base64 of 32 bytes: bundles are "
                                   "encrypted for it"},
                "reset_at": {"type": "number", "nullable": True, "description": "when the "
                             "operator reset it (its id free for any token); null once it "
                             "enrolled again"}}},
            "Bundle": {"type": "object", "properties": {
                "sha256": _SHA256, "name": {"type": "string"},
                "version": {"type": "integer"}, "size": {"type": "integer"},
                "created_at": {"type": "number"},
                "metadata_version": {"type": "integer", "description": "its TUF metadata "
                                     "version (0: stored before it was recorded)"},
                "rollback_of": {"type": "integer", "nullable": True, "description": "for a "
                                "re-release by rollback: the version it restores"},
                "bundle_sha256": {**_SHA256, "description": "only for a delta bundle: the "
                                  "full bundle of its release"},
                "base_version": {"type": "integer", "description": "only for a delta bundle: "
                                 "the version its deltas build on"}}},
            "TransferPlan": {"type": "object", "properties": {
                "delta_devices": {"type": "object", "description": "base version -> the "
                                  "devices offered the delta from it",
                                  "additionalProperties": {"type": "array",
                                                           "items": {"type": "string"}}},
                "full_devices": {"type": "array", "items": {"type": "string"}},
                "full_bytes": {"type": "integer", "description": "bytes if every device "
                               "fetched the full bundle"},
                "wire_bytes": {"type": "integer", "description": "bytes expected with the "
                               "deltas (a device whose base is damaged fetches the full "
                               "bundle instead)"},
                "saved_bytes": {"type": "integer"}}},
            "Event": {"type": "object", "properties": {
                "id": {"type": "integer"}, "at": {"type": "number"},
                "device": {"type": "string", "nullable": True}, "kind": {"type": "string"},
                "detail": {"type": "object"}}},
            "Change": {"type": "object", "properties": {
                "device": {"type": "string"}, "model": {"type": "string"},
                "before": {**_DESIRED_MODEL, "nullable": True},
                "after": {**_DESIRED_MODEL, "nullable": True}}},
            "PublishResult": {"type": "object", "required": ["devices", "changes"],
                              "properties": {
                                  "devices": {"type": "array", "items": {"type": "string"},
                                              "description": "devices whose desired state "
                                              "was published"},
                                  "changes": {"type": "array", "items": _ref("Change"),
                                              "description": "what changed (devices "
                                              "already there are not listed)"},
                                  "delivered": {"type": "boolean", "description": "false: "
                                                "stored, but the server has no broker "
                                                "connection; sent when it returns"},
                                  "released": {"type": "array", "items": _ref("Bundle"),
                                               "description": "re-releases the server "
                                               "signed for this (rollback, encryption)"},
                                  "transfer": {**_ref("TransferPlan"), "nullable": True,
                                               "description": "publish only: who gets a "
                                               "delta, and the bytes saved"}}},
            "EnrollmentToken": {"type": "object", "required": ["token", "group", "expires_at"],
                                "properties": {
                                    "token": {"type": "string", "pattern":
                                              "^eft1(\\.[A-Za-z0-9_-]{43}){3}$",
                                              "description": "eft1.<secret>.<CA pin>.<root "
                                              "pin> (protocol.enrollment)"},
                                    "group": {"type": "string"},
                                    "expires_at": {"type": "number"},
                                    "device": {"type": "string", "nullable": True}}},
            "EnrollRequest": {"type": "object",
                              "required": ["token", "device_id", "csr"],
                              "properties": {
                                  "token": {"type": "string"},
                                  "device_id": {"type": "string",
                                                "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                                  "csr": {"type": "string", "description": "PEM CSR made on "
                                          "the device (transport.x509)"},
                                  "profile": {"type": "string", "nullable": True,
                                              "description": "the device's firmware "
                                              "profile; absent or null: generic"},
                                  "tags": {"type": "array", "items": {"type": "string"},
                                           "default": []},
                                  "encryption_key": {"type": "string", "nullable": True,
                                                     "description": "the device's X25519 "
                                                     "public key, base64 of 32 bytes"}}},
            "Enrollment": {"type": "object", "required": [
                "device_id", "fleet", "group", "certificate", "ca_certificate", "broker_url",
                "root"], "properties": {
                    "device_id": {"type": "string"}, "fleet": {"type": "string"},
                    "group": {"type": "string"},
                    "certificate": {"type": "string", "description": "the device's "
                                    "certificate, PEM"},
                    "ca_certificate": {"type": "string", "description": "the fleet CA, PEM: "
                                       "trust it for the broker"},
                    "broker_url": {"type": "string", "description": "mqtts://host:port"},
                    "root": {"type": "string", "format": "byte", "description":
                                  "the fleet's TUF root.json, base64: pin it"}}},
            "MetricTotals": {"type": "object", "description": "the keys summed by (group, "
                             "model, ...) and the sums", "properties": {
                "samples": {"type": "integer"}, "requests": {"type": "integer"},
                "errors": {"type": "integer"},
                "error_rate": {"type": "number", "nullable": True},
                "latency_ms": {"type": "object", "description": "p50, p90, p99 (null "
                               "without requests)"},
                "latency_hist": {"type": "array", "items": {"type": "integer"},
                                 "description": "counts per bucket: 0.05 0.1 0.25 0.5 1 2.5 "
                                 "5 10 25 50 100 250 1000 ms and above"},
                "drift": {"type": "object", "description": "psi_max, ks_max, psi_mean "
                          "(null: no drift statistics)"},
                "devices": {"type": "integer", "description": "devices that reported"},
                "first": {"type": "number", "nullable": True},
                "last": {"type": "number", "nullable": True}}},
            "Alert": {"type": "object", "properties": {
                "kind": {"type": "string"}, "key": {"type": "string"},
                "state": {"type": "string", "enum": ["firing", "resolved"]},
                "summary": {"type": "string"}, "detail": {"type": "object"},
                "first_at": {"type": "number"}, "last_at": {"type": "number"},
                "raised": {"type": "integer", "description": "times raised while firing"},
                "resolved_at": {"type": "number", "nullable": True}}},
            "Overview": {"type": "object", "properties": {
                "devices": {"type": "integer"}, "online": {"type": "integer"},
                "converged": {"type": "integer"},
                "groups": {"type": "object", "description": "group -> devices, online, "
                           "converged, convergence, running (model -> version -> devices), "
                           "desired (model -> version)"},
                "alerts_firing": {"type": "array", "items": _ref("Alert")},
                "ingest": {"type": "object", "properties": {
                    "queue_depth": {"type": "integer"}, "lag_s": {"type": "number"}}}}},
            "Rollout": {"type": "object", "required": ["id", "state", "step", "steps", "gates"],
                        "properties": {
                            "id": {"type": "string"}, "model": {"type": "string"},
                            "version": {"type": "integer"},
                            "state": {"type": "string", "enum": [
                                "running", "paused", "halted", "succeeded", "aborted"]},
                            "step": {"type": "string", "description": "shadow or 5%, ..."},
                            "steps": {"type": "array", "items": {
                                "type": "object", "description": "name, share, count, "
                                "verdict, reporting, required, gates, devices (id: outcome)"}},
                            "gates": {"type": "array", "items": _ref("GateResult")},
                            "reason": {"type": "object", "nullable": True}}},
            "GateResult": {"type": "object", "properties": {
                "gate": {"type": "string"}, "metric": {"type": "string"},
                "op": {"type": "string"}, "threshold": {"type": "number"},
                "value": {"type": "number", "nullable": True},
                "bound": {"type": "number", "nullable": True}, "n": {"type": "integer"},
                "status": {"type": "string", "enum": ["pass", "fail", "waiting"]}}},
            "AuditEntry": {"type": "object", "properties": {
                "seq": {"type": "integer"}, "at": {"type": "number"},
                "actor": {"type": "string"}, "action": {"type": "string"},
                "target": {"type": "string"}, "reason": {"type": "string"},
                "detail": {"type": "object"}, "prev_hash": _SHA256, "hash": _SHA256}},
        },
    },
}

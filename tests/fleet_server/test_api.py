"""The operator HTTP API over a real socket, in front of a real service (Mosquitto and the
registry on SQLite and PostgreSQL): routes against the OpenAPI spec, authentication, errors,
and the enrollment, upload, publish and rollback flows.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet_server.api import ROUTES, ApiServer, load_admin_token
from fleet_server.api_client import ServerClient
from fleet_server.api_spec import OPENAPI
from fleet_server.ca import FleetCA
from fleet_server.errors import ApiError
from fleet_server.service import FleetService
from tests.bundle.repo import NOW, Repo, spec
from tests.fleet_server.server_env import PROFILE
from transport.x509 import make_device_key_and_csr

pytestmark = pytest.mark.integration


@pytest.fixture
def token(service: FleetService) -> str:
    return load_admin_token(service.config.data_dir / "admin.token")


@pytest.fixture
def api(service: FleetService, token: str) -> Iterator[ApiServer]:
    with ApiServer(service, token, service.api_identity()) as started:
        yield started


def https(api: ApiServer, timeout: float = 10) -> http.client.HTTPSConnection:
    """A connection to the API that verifies its certificate with the fleet CA."""
    host, port = api.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(api.service.ca.cert_path))
    return http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)


class Caller:
    """Requests to the API; one connection per request, closed after it."""

    def __init__(self, api: ApiServer, token: str) -> None:
        self.api = api
        self.token = token

    def __call__(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                 token: str | None = "admin", headers: dict[str, str] | None = None,
                 ) -> tuple[int, Any]:
        conn = https(self.api)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["Authorization"] = f"Bearer {self.token if token == 'admin' else token}"
            if body is not None:
                data = json.dumps(body).encode()
                sent["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            self.last_headers = dict(response.getheaders())
            raw = response.read()
            if not response.getheader("Content-Type", "").startswith("application/json"):
                return response.status, {"text": raw.decode()}  # /metrics
            return response.status, json.loads(raw)
        finally:
            conn.close()


@pytest.fixture
def call(api: ApiServer, token: str) -> Caller:
    return Caller(api, token)


def _enroll(call: Caller, device_id: str, group: str = "lab") -> dict[str, Any]:
    status, answer = call("POST", "/api/enroll-tokens", {"group": group, "ttl_s": 600})
    assert status == 201, answer
    _, csr = make_device_key_and_csr(device_id)
    status, enrollment = call("POST", "/api/enroll", {
        "token": answer["token"], "device_id": device_id, "csr": csr.decode(),
        "profile": PROFILE, "tags": ["canary"]}, token=None)
    assert status == 200, enrollment
    return dict(enrollment)


# --- the spec and the routes --------------------------------------------------------------

def test_openapi_describes_exactly_the_routes(call: Caller) -> None:
    described = {(method.upper(), path) for path, ops in OPENAPI["paths"].items()
                 for method in ops}
    assert described == {(r.method, r.path) for r in ROUTES}
    for route in ROUTES:
        operation = OPENAPI["paths"][route.path][route.method.lower()]
        assert (operation.get("security") != []) == route.admin, route.path

    assert call("GET", "/api/openapi.json", token=None) == (200, OPENAPI)
    # Every described operation is served: the router finds it (a handler may still refuse
    # the empty request, but never with the router's 404 or 405).
    for route in ROUTES:
        status, body = call(route.method, route.path.replace("{id}", "nope"), {})
        assert status != 405, route
        assert not str(body.get("error", "")).startswith("no route"), route


def test_unknown_routes_and_methods(call: Caller) -> None:
    status, body = call("GET", "/api/nothing")
    assert status == 404
    assert body["error"].startswith("no route /api/nothing")
    status, body = call("DELETE", "/api/bundles")
    assert status == 405
    assert call.last_headers["Allow"] == "GET, POST"


def test_operator_routes_need_the_admin_token(call: Caller, service: FleetService,
                                              token: str) -> None:
    path = service.config.data_dir / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_admin_token(path) == token  # made once, then reused
    for bad in (None, "wrong", ""):
        status, body = call("GET", "/api/devices", token=bad)
        assert status == 401
        assert "admin token" in body["error"]
    assert call.last_headers["WWW-Authenticate"] == "Bearer"
    status, body = call("GET", "/api/devices", token=None,
                        headers={"Authorization": f"Basic {token}"})
    assert status == 401
    status, body = call("GET", "/api/status")
    assert status == 200
    assert body["fleet"] == "testfleet"
    assert body["mqtt_connected"] is True
    assert body["broker_url"] == service.broker_url
    assert body["leader"] is True  # the only process
    assert body["ingest"] == {"queued": 0, "rate_limited": 0, "database_unavailable": False}


def test_malformed_requests_are_refused_with_reasons(call: Caller) -> None:
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/api/publish", {"group": "lab"}, 400, '"bundle_sha256"'),
        ("POST", "/api/publish", {"bundle_sha256": "ab" * 32, "group": "lab"}, 404,
         "no stored bundle"),
        ("POST", "/api/rollback", {}, 400, 'either "devices"'),
        ("POST", "/api/rollback", {"devices": "gw-1"}, 400, "non-empty list"),
        ("POST", "/api/rollback", {"group": "lab", "devices": ["x"]}, 400, "not both"),
        ("POST", "/api/enroll-tokens", {"ttl_s": "soon"}, 400, '"ttl_s"'),
        ("POST", "/api/enroll-tokens", {"ttl_s": -1}, 400, "from 1 to"),
        ("POST", "/api/enroll-tokens", {"ttl_s": 1e308}, 400, "(30 days)"),
        ("POST", "/api/enroll-tokens", {"group": ""}, 400, "invalid group ''"),
        ("POST", "/api/enroll-tokens", {"group": " lab"}, 400, "1-128 printable"),
        ("POST", "/api/enroll", {"token": "t"}, 400, '"device_id"'),
        ("GET", "/api/events?limit=0", {}, 400, "outside 1..10000"),
        ("GET", "/api/events?since=x", {}, 400, "not an integer"),
        ("GET", "/api/devices/gw-9", {}, 404, "no device 'gw-9'"),
    ]
    for method, path, body, status, message in cases:
        got, answer = call(method, path, body if method == "POST" else None)
        assert (got, message in answer["error"]) == (status, True), (path, answer)
    # A long name is refused without being echoed whole.
    status, answer = call("POST", "/api/enroll-tokens", {"group": "g" * 500_000})
    assert status == 400
    assert len(answer["error"]) < 300
    status, answer = call("POST", "/api/publish", data=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert status == 400
    assert "not JSON" in answer["error"]
    status, answer = call("POST", "/api/bundles", data=b"",
                          headers={"Content-Length": str(1 << 40)})
    assert status == 413


# --- flows --------------------------------------------------------------------------------

def test_enroll_over_http(call: Caller, service: FleetService, repo: Repo) -> None:
    enrollment = _enroll(call, "gw-1")
    assert enrollment["device_id"] == "gw-1"
    assert enrollment["fleet"] == "testfleet"
    assert enrollment["group"] == "lab"
    assert enrollment["broker_url"] == service.broker_url
    assert enrollment["ca_certificate"] == service.ca.cert_pem.decode()
    assert enrollment["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert base64.b64decode(enrollment["root"]) == repo.root
    status, device = call("GET", "/api/devices/gw-1")
    assert status == 200
    assert (device["group"], device["tags"], device["online"]) == ("lab", ["canary"], False)

    _, answer = call("POST", "/api/enroll-tokens", {})
    assert answer["group"] == "default"
    token = answer["token"]
    _, csr = make_device_key_and_csr("gw-2")
    status, body = call("POST", "/api/enroll", {"token": token, "device_id": "gw-2",
                                                "csr": "garbage"}, token=None)
    assert status == 400
    assert "PEM CSR" in body["error"]
    # No profile: recorded as generic. The token survived the refused attempt.
    status, body = call("POST", "/api/enroll", {"token": token, "device_id": "gw-2",
                                                "csr": csr.decode()}, token=None)
    assert status == 200, body
    assert call("GET", "/api/devices/gw-2")[1]["profile"] == "generic"
    status, body = call("POST", "/api/enroll", {"token": token, "device_id": "gw-3",
                                                "csr": csr.decode()}, token=None)
    assert status == 403
    assert "already used" in body["error"]


def test_upload_publish_rollback_and_events(call: Caller, repo: Repo,
                                            bundles: dict[str, bytes]) -> None:
    _enroll(call, "gw-1", "lab")
    _enroll(call, "gw-2", "field")
    status, v1 = call("POST", "/api/bundles", data=bundles["v1"])
    assert status == 201, v1
    assert (v1["name"], v1["version"], v1["size"]) == ("digits", 1, len(bundles["v1"]))
    assert call("POST", "/api/bundles", data=bundles["v1"]) == (201, v1)  # idempotent
    _, v2 = call("POST", "/api/bundles", data=bundles["v2"])
    assert call("GET", "/api/bundles")[1] == {"bundles": [v1, v2]}

    status, result = call("POST", "/api/publish", {"bundle_sha256": v1["sha256"],
                                                   "group": "lab"})
    assert status == 200
    assert result == {"devices": ["gw-1"], "changes": [{
        "device": "gw-1", "model": "digits", "before": None,
        "after": {"version": 1, "bundle_sha256": v1["sha256"], "size": v1["size"]}}],
        "delivered": True, "released": [],
        "transfer": {"full_devices": ["gw-1"], "delta_devices": {}, "full_bytes": v1["size"],
                     "wire_bytes": v1["size"], "saved_bytes": 0}}
    call("POST", "/api/publish", {"bundle_sha256": v2["sha256"], "devices": ["gw-1", "gw-2"]})
    status, devices = call("GET", "/api/devices?group=lab")
    assert [d["desired"]["digits"]["version"] for d in devices["devices"]] == [2]
    assert devices["devices"][0]["converged"] is False
    assert [d["id"] for d in call("GET", "/api/devices?tag=canary")[1]["devices"]] == [
        "gw-1", "gw-2"]

    status, result = call("POST", "/api/rollback", {"devices": ["gw-1"], "model": "digits"})
    assert status == 200, result
    # v1 comes back re-released as v3 (issue 9.13): devices refuse anything below v2.
    [v3] = result["released"]
    assert (v3["name"], v3["version"], v3["rollback_of"]) == ("digits", 3, 1)
    assert v3["metadata_version"] > v2["metadata_version"]
    assert [(c["before"]["version"], c["after"]) for c in result["changes"]] == [
        (2, {"version": 3, "bundle_sha256": v3["sha256"], "size": v3["size"]})]
    status, body = call("POST", "/api/publish", {"bundle_sha256": v1["sha256"],
                                                 "devices": ["gw-1"]})
    assert status == 409
    assert "digits v1 is older than v3, which gw-1 has" in body["error"]
    assert "fleet rollback" in body["error"]
    status, body = call("POST", "/api/rollback", {"group": "nowhere"})
    assert status == 400
    assert "has no devices" in body["error"]

    _, events = call("GET", "/api/events?device=gw-1")
    kinds = [e["kind"] for e in events["events"]]
    assert kinds[-3:] == ["desired.set", "desired.set", "desired.rolled_back"]
    last = events["events"][-2]["id"]
    _, later = call("GET", f"/api/events?since={last}&device=gw-1")
    assert [e["kind"] for e in later["events"]] == ["desired.rolled_back"]
    _, limited = call("GET", "/api/events?limit=2")
    assert len(limited["events"]) == 2


def test_bad_bundles_are_refused_with_the_reason(call: Caller, repo: Repo,
                                                 bundles: dict[str, bytes]) -> None:
    tampered = bytearray(bundles["v1"])
    tampered[len(tampered) // 2] ^= 1
    expired = repo.build(spec("digits", 7), expires=NOW - timedelta(days=1))
    cases = {
        "ChecksumError": bytes(tampered),
        "UntrustedSignatureError": Repo().build(),
        "ExpiredError": expired,
    }
    for reason, data in cases.items():
        status, body = call("POST", "/api/bundles", data=data)
        assert (status, body.get("reason")) == (400, reason), body
        assert body["error"].startswith(f"bundle refused: {reason}: ")
    # Another bundle under a stored name and version: a conflict, not a bad bundle.
    call("POST", "/api/bundles", data=bundles["v1"])
    clash = repo.build(spec("digits", 1, profiles=("arm64",)))
    status, body = call("POST", "/api/bundles", data=clash)
    assert status == 409
    assert "versions are immutable" in body["error"]
    assert [b["version"] for b in call("GET", "/api/bundles")[1]["bundles"]] == [1]


# --- bounds ---------------------------------------------------------------------------------

def test_deeply_nested_json_is_a_400(call: Caller) -> None:
    body = b'{"token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = call("POST", "/api/enroll", data=body, token=None,
                          headers={"Content-Type": "application/json"})
    assert status == 400
    assert "nests JSON too deeply" in answer["error"]


def test_idle_connections_are_closed_and_make_room_for_new_ones(
        service: FleetService, token: str) -> None:
    """Connections that say nothing (not even a TLS handshake) are dropped after the
    timeout, and a flood of them cannot lock the operator out: beyond the cap, the idlest
    connection is closed to make room, so a real request is answered at once."""
    with ApiServer(service, token, service.api_identity(), connection_timeout=0.5,
                   max_connections=4) as api:
        host, port = api.url.removeprefix("https://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            for sock in idle:  # each is closed by the server: recv sees the end
                sock.settimeout(10)
                assert sock.recv(1) == b""
        finally:
            for sock in idle:
                sock.close()
    with ApiServer(service, token, service.api_identity(), connection_timeout=60.0,
                   max_connections=4) as api:
        # Every slot held by a connection that finished its handshake and then sends nothing
        # (it would be kept for 60 s): the operator's request still gets through.
        held = [https(api) for _ in range(4)]
        try:
            for conn in held:
                conn.connect()
            assert Caller(api, token)("GET", "/api/status")[0] == 200
            assert Caller(api, token)("GET", "/api/status")[0] == 200
        finally:
            for conn in held:
                conn.close()


def test_the_api_speaks_tls_only_with_a_fleet_ca_certificate(
        api: ApiServer, service: FleetService) -> None:
    host, port = api.url.removeprefix("https://").split(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    plain.request("GET", "/api/status")
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        plain.getresponse()
    plain.close()
    stranger = ssl.create_default_context()  # the system's CAs: the fleet CA is not one
    conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/api/status")
    conn.close()
    conn = https(api)
    conn.request("GET", "/api/fleet")
    fleet = json.loads(conn.getresponse().read())
    conn.close()
    assert fleet == {"fleet": "testfleet", "ca_certificate": service.ca.cert_pem.decode(),
                     "root": base64.b64encode(service.root_json()).decode()}


def test_the_cli_client_verifies_the_server_with_the_fleet_ca(
        api: ApiServer, token: str, tmp_path: Path) -> None:
    assert ServerClient(api.url, token, api.service.ca.cert_path).get("/api/status")[
        "fleet"] == "testfleet"
    other = FleetCA.create(tmp_path / "other", "testfleet")
    with pytest.raises(ApiError, match=r"is not the one the CA .* vouches for"):
        ServerClient(api.url, token, other.cert_path).get("/api/status")


# --- rollouts and the audit log ------------------------------------------------------------

def test_rollouts_and_the_audit_log(call: Caller, token: str,
                                    bundles: dict[str, bytes]) -> None:
    for device in ("gw-1", "gw-2"):
        _enroll(call, device)
    status, stored = call("POST", "/api/bundles", data=bundles["v2"])
    assert status == 201, stored
    sha = stored["sha256"]
    assert call("POST", "/api/rollouts", {"bundle_sha256": "0" * 64, "group": "lab"})[0] == 404
    status, answer = call("POST", "/api/rollouts", {"bundle_sha256": sha, "group": "lab",
                                                    "gates": ["speed<=2"]})
    assert status == 400
    assert "unknown metric 'speed'" in answer["error"]
    status, answer = call("POST", "/api/rollouts", {"bundle_sha256": sha, "group": "lab",
                                                    "steps": [5, 25]})
    assert status == 400
    assert "last step must be 100" in answer["error"]
    assert call("POST", "/api/rollouts", {"bundle_sha256": sha}, token="wrong")[0] == 401
    status, rollout = call("POST", "/api/rollouts", {"bundle_sha256": sha, "group": "lab",
                                                     "bake_s": 60, "reason": "test"})
    assert status == 201, rollout
    assert rollout["state"] == "running"
    assert rollout["step"] == "5%"
    assert len(rollout["devices_in_step"]) == 1
    assert {g["metric"] for g in rollout["steps"][0].get("gates", [])} <= {
        "install_failures", "error_rate", "crash_rate", "p99_ratio", "agreement",
        "confidence_shift", "drift"}
    path = f"/api/rollouts/{rollout['id']}"
    assert call("GET", "/api/rollouts/r-nothing")[0] == 404
    assert call("POST", f"{path}/pause", {"reason": "lunch"})[1]["state"] == "paused"
    status, answer = call("POST", f"{path}/pause", {})
    assert status == 400
    assert "paused already" in answer["error"]
    assert call("POST", f"{path}/explode", {})[0] == 400
    status, aborted = call("POST", f"{path}/abort", {"reason": "wrong model"})
    assert status == 200
    assert aborted["state"] == "aborted"
    status, listed = call("GET", "/api/rollouts")
    assert [r["id"] for r in listed["rollouts"]] == [rollout["id"]]
    status, log = call("GET", "/api/audit")
    assert status == 200
    actions = [(e["actor"], e["action"], e["reason"]) for e in log["entries"]]
    operator = actions[-1][0]
    assert operator.startswith("admin:")
    assert token not in json.dumps(log)
    assert ("keys directory", "keys.rotated", "root.json v1 found (was none)") in actions
    assert (operator, "rollout.paused", "lunch") in actions
    assert (operator, "rollout.aborted", "wrong model") in actions
    assert [a for _, a, _ in actions].count("enroll") == 2
    assert log["head"]["seq"] == len(log["entries"])

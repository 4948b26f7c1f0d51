"""CORS: the allow-list's decisions (pure), and a real server answering a browser's
preflight and requests; off by default."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from http import HTTPStatus

import pytest

from agent.cors import CorsPolicy, check_origin
from agent.http_api import ApiServer, ApiSettings
from agent.runtime import Runtime
from tests.agent.bundles import DIGITS

APP = "http://localhost:3000"
TOKEN = "t0ken"
_PREFLIGHT = {"Origin": APP, "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://app.local",
                                    "http://127.0.0.1:8080", "http://[::1]:5173"])
def test_origins_as_browsers_send_them(origin: str) -> None:
    check_origin(origin)


@pytest.mark.parametrize("origin", ["*", "localhost:3000", "http://localhost:3000/",
                                    "http://localhost:3000/app", "file://", "null",
                                    "http://x:99999", "http://u@x", " http://x"])
def test_anything_else_is_not_an_origin(origin: str) -> None:
    with pytest.raises(ValueError, match="is not a web origin"):
        check_origin(origin)


def test_policy_decisions() -> None:
    policy = CorsPolicy(frozenset({APP}))
    headers = {k.lower(): v for k, v in _PREFLIGHT.items()}
    assert CorsPolicy.is_preflight("OPTIONS", headers)
    assert not CorsPolicy.is_preflight("OPTIONS", {"origin": APP})
    ok = policy.preflight(headers)
    assert ok.status == HTTPStatus.NO_CONTENT
    assert ok.refused is None
    assert ok.headers["Access-Control-Allow-Origin"] == APP
    other = policy.preflight({**headers, "origin": "http://evil.example"})
    assert other.status == HTTPStatus.FORBIDDEN
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "api.cors_origins" in (other.refused or "")
    put = policy.preflight({**headers, "access-control-request-method": "PUT"})
    assert put.status == HTTPStatus.FORBIDDEN
    assert "GET, POST" in (put.refused or "")
    cookie = policy.preflight({**headers, "access-control-request-headers": "x-secret"})
    assert cookie.status == HTTPStatus.FORBIDDEN
    assert "x-secret" in (cookie.refused or "")
    assert policy.response_headers(APP)["Access-Control-Allow-Origin"] == APP
    assert policy.response_headers("http://evil.example") == {}
    assert policy.response_headers(None) == {}


def _server(origins: tuple[str, ...]) -> ApiServer:
    runtime = Runtime()
    runtime.load_file(DIGITS, "digits")
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN, cors_origins=origins))
    server.start()
    return server


@pytest.fixture
def allowed() -> Iterator[ApiServer]:
    server = _server((APP,))
    yield server
    server.stop()


@pytest.fixture
def default() -> Iterator[ApiServer]:
    server = _server(())
    yield server
    server.stop()


def _call(server: ApiServer, method: str, path: str, headers: dict[str, str],
          ) -> tuple[int, dict[str, str], bytes]:
    assert server.port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_a_listed_origin_passes_preflight_and_reads_answers(allowed: ApiServer) -> None:
    status, headers, body = _call(allowed, "OPTIONS", "/v2/models/digits/infer", _PREFLIGHT)
    assert status == 204, body
    assert (body, "Content-Type" in headers, "Content-Length" in headers) == (
        b"", False, False)  # no content, so no type and no length
    assert headers["Access-Control-Allow-Origin"] == APP
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"]
    status, headers, body = _call(allowed, "GET", "/v2/models/digits",
                                  {"Origin": APP, "Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == APP
    assert headers["Access-Control-Expose-Headers"] == "Inference-Header-Content-Length"
    # The page can read why it was refused, too.
    status, headers, _ = _call(allowed, "GET", "/v2/models/digits", {"Origin": APP})
    assert status == 401
    assert headers["Access-Control-Allow-Origin"] == APP


def test_an_unlisted_origin_is_refused(allowed: ApiServer) -> None:
    evil = {**_PREFLIGHT, "Origin": "http://evil.example"}
    status, headers, body = _call(allowed, "OPTIONS", "/v2/models/digits/infer", evil)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers
    assert "add it to api.cors_origins" in json.loads(body)["error"]
    status, headers, _ = _call(allowed, "GET", "/v2/models/digits",
                               {"Origin": "http://evil.example",
                                "Authorization": f"Bearer {TOKEN}"})
    assert status == 200  # the browser, not the agent, withholds the answer from the page
    assert "Access-Control-Allow-Origin" not in headers


def test_off_by_default(default: ApiServer) -> None:
    status, headers, _ = _call(default, "OPTIONS", "/v2/models/digits/infer", _PREFLIGHT)
    assert status == 401  # no CORS: a preflight is just an unauthenticated request
    assert not any(h.startswith("Access-Control") for h in headers)
    status, headers, _ = _call(default, "GET", "/v2/models/digits",
                               {"Origin": APP, "Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert not any(h.startswith("Access-Control") for h in headers)

"""The OpenAPI document the agent serves says what its handlers do: every documented
operation is called on a real server and its answer checked against the documented status
codes and schemas (jsonschema); every other method on a documented path is 405."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import numpy as np
import pytest
import tritonclient.http as triton

from agent.http_api import ApiServer, ApiSettings
from agent.runtime import Runtime
from tests.agent.bundles import DIGITS, samples

TOKEN = "t0ken"
_INFER = {"id": "a", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                 "data": samples(1).ravel().tolist()}]}


@pytest.fixture(scope="module")
def server() -> Iterator[ApiServer]:
    runtime = Runtime()
    runtime.load_file(DIGITS, "digits")
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN))
    server.start()
    yield server
    server.stop()


def _call(server: ApiServer, method: str, path: str, body: bytes = b"",
          token: str | None = TOKEN) -> tuple[int, bytes]:
    assert server.port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def document(server: ApiServer) -> dict[str, Any]:
    status, body = _call(server, "GET", "/v2/openapi.json", token=None)
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


def _body_for(server: ApiServer, path: str, method: str) -> bytes:
    if path.endswith("/infer"):
        return json.dumps(_INFER).encode()
    if path.endswith("/feedback"):
        # An outcome for a fresh answer, so the success answer is validated too.
        _, answer = _call(server, "POST", path.removesuffix("/feedback") + "/infer",
                          json.dumps({**_INFER, "id": ""}).encode())
        return json.dumps({"id": json.loads(answer)["id"], "reward": 1}).encode()
    if path.endswith("/install"):
        return b"not a bundle"
    return b""


def test_every_documented_operation_answers_as_documented(server: ApiServer,
                                                          document: dict[str, Any]) -> None:
    checked = 0
    for template, operations in document["paths"].items():
        path = template.replace("{model}", "digits").replace("{version}", "1")
        for method, operation in operations.items():
            status, body = _call(server, method.upper(), path, _body_for(server, path, method))
            documented = operation["responses"]
            assert str(status) in documented, (method, path, status, body)
            assert status == 200 or not path.endswith(("/infer", "/feedback")), body
            schema = documented[str(status)].get("content", {}).get("application/json")
            if schema is not None:
                jsonschema.validate(json.loads(body), {**schema["schema"],
                                                       "components": document["components"]})
            if operation.get("security") != []:
                unauthorised, _ = _call(server, method.upper(), path, token=None)
                assert unauthorised == 401, (method, path)
            checked += 1
    # live, ready, openapi, /v2, index x2, all stats, status, metrics (off here: 404),
    # install, and 5 model routes x2
    assert checked == 20


def test_other_methods_and_paths_are_refused(server: ApiServer,
                                             document: dict[str, Any]) -> None:
    for template, operations in document["paths"].items():
        if template.startswith("/v2/health") or template == "/v2/openapi.json":
            continue  # open routes: admitted without a token, answered whatever the method
        path = template.replace("{model}", "digits").replace("{version}", "1")
        for method in {"get", "post", "put", "delete"} - set(operations):
            status, body = _call(server, method.upper(), path)
            assert status == 405, (method, path)
            assert "is not allowed" in json.loads(body)["error"]
    status, body = _call(server, "GET", "/v2/nothing")
    assert status == 404
    assert "GET /v2/openapi.json lists them" in json.loads(body)["error"]


def test_the_document_is_valid_openapi_shape(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json",
                                                    "application/octet-stream"}
    assert document["paths"]["/v2/health/live"]["get"]["security"] == []


def test_statistics_and_repository_index_through_tritonclient(server: ApiServer) -> None:
    assert server.url is not None
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        before = client.get_inference_statistics("digits", headers=dict(auth))["model_stats"][0]
        x = samples(2)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for _ in range(3):
            client.infer("digits", [tensor], headers=dict(auth))
        bad = triton.InferInput("input", [1, 64], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(triton.InferenceServerException):
            client.infer("digits", [bad], headers=dict(auth))
        after = client.get_inference_statistics("digits", headers=dict(auth))["model_stats"][0]
        every = client.get_inference_statistics(headers=dict(auth))["model_stats"]
        index = client.get_model_repository_index(headers=dict(auth))
    finally:
        client.close()
    success = after["inference_stats"]["success"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert after["execution_count"] == success["count"]
    assert after["last_inference"] >= before["last_inference"]
    # A request refused by the model's signature is the caller's fault, not the model's:
    # the runtime rejects it before it counts as a failed run.
    assert after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"][
        "count"]
    assert [s["name"] for s in every] == ["digits"]
    assert index == [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]


def test_unknown_model_statistics_is_404(server: ApiServer) -> None:
    status, body = _call(server, "GET", "/v2/models/nope/stats")
    assert status == 404
    assert "no model named 'nope'" in json.loads(body)["error"]
    status, _ = _call(server, "POST", "/v2/repository/index", b"[1]")
    assert status == 400

"""The local API over real sockets: an existing Open Inference Protocol client, our client,
authentication, and every kind of bad request."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from agent.client import AgentClient, ApiError
from agent.config import ApiLimits
from agent.errors import AgentError
from agent.http_api import ApiServer, ApiSettings, load_or_create_token
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from firmware_profiles.model import Profile
from tests.agent.bundles import DIGITS, DIGITS_TFLITE, digits_spec, outputs, samples, write_bundle
from tests.bundle.repo import Repo

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def runtime() -> Runtime:
    runtime = Runtime()
    runtime.load_file(DIGITS, "digits")
    runtime.load_file(DIGITS_TFLITE, "digits_lite")
    return runtime


@pytest.fixture
def server(runtime: Runtime) -> Iterator[ApiServer]:
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN,
                                            limits=ApiLimits(max_body_bytes=64 * 1024)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ApiServer) -> Iterator[AgentClient]:
    assert server.url is not None
    with AgentClient(server.url, token=TOKEN) as client:
        yield client


@pytest.fixture
def tclient(server: ApiServer) -> Iterator[triton.InferenceServerClient]:
    assert server.url is not None
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_unchanged_gets_onnxruntime_outputs(tclient: triton.InferenceServerClient,
                                                         binary: bool) -> None:
    assert tclient.is_server_live()
    assert tclient.is_server_ready()
    # tritonclient adds its own headers to the dict it is given, so each call gets a copy.
    assert tclient.is_model_ready("digits", headers=dict(AUTH))
    metadata = tclient.get_model_metadata("digits", headers=dict(AUTH))
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert metadata["platform"] == "onnxruntime_onnx"
    x = samples(5)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = tclient.infer("digits", [tensor], headers=dict(AUTH), request_id="r1",
                           outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("logits"), outputs(DIGITS.read_bytes(), x),
                               rtol=1e-5, atol=1e-5)
    assert result.get_response()["id"] == "r1"


def test_tritonclient_sees_errors_as_errors(tclient: triton.InferenceServerClient) -> None:
    x = samples(1).reshape(1, 64)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="expected \\[\\?, 1, 8, 8\\]"):
        tclient.infer("digits", [tensor], headers=dict(AUTH))
    with pytest.raises(InferenceServerException, match="bearer token"):
        tclient.get_model_metadata("digits")


def test_our_client(client: AgentClient) -> None:
    assert client.live()
    assert client.ready()
    assert client.server_metadata()["extensions"] == ["binary_tensor_data", "model_repository",
                                                      "statistics", "edgefleet"]
    x = samples(3)
    got = client.infer("digits", {"input": x})
    np.testing.assert_allclose(got["logits"], outputs(DIGITS.read_bytes(), x), rtol=1e-5,
                               atol=1e-5)
    lite = client.infer("digits_lite", {"input": x})
    assert lite["Identity"].argmax(1).tolist() == got["logits"].argmax(1).tolist()
    status = client.status()
    assert [m["name"] for m in status["models"]] == ["digits", "digits_lite"]
    assert status["models"][0]["requests"] == 1


def _raw(server: ApiServer, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the server sends until it closes."""
    assert server.port is not None
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _post(path: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}",
             f"Authorization: Bearer {TOKEN}", *headers]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def _infer_json(*tensors: Mapping[str, object]) -> bytes:
    return json.dumps({"inputs": list(tensors)}).encode()


GOOD: dict[str, object] = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
        "data": samples(1).ravel().tolist()}


@pytest.mark.parametrize(("request_bytes", "status", "message"), [
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "shape": [1, 64]})), 400,
     "input input has shape [1, 64], expected [?, 1, 8, 8]; the model expects input: "
     "float32[?, 1, 8, 8]"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "datatype": "FP64"})), 400,
     "input input has dtype float64, expected float32"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "name": "pixels"})), 400,
     "unknown input pixels; the model expects input: float32[?, 1, 8, 8]"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "datatype": "FLOAT"})), 400,
     "input 'input': needs a 'name' and a 'datatype' out of"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "shape": [1, 1, 8, 7]})), 400,
     "input 'input': 64 values for shape [1, 1, 8, 7]"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "shape": "1x64"})), 400,
     "'shape' must be a list of non-negative integers"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "data": ["a"] * 64})), 400,
     "'data' is not FP32"),
    (_post("/v2/models/digits/infer", b"{not json"), 400, "request body is not JSON"),
    (_post("/v2/models/digits/infer", b"[]"), 400, "must be a JSON object with an 'inputs'"),
    (_post("/v2/models/digits/infer", _infer_json(GOOD), "Inference-Header-Content-Length: 9999"),
     400, "is outside the body"),
    (_post("/v2/models/digits/infer",
           _infer_json({**GOOD, "data": None, "parameters": {"binary_data_size": 4}})), 400,
     "binary_data_size 4 does not fit shape [1, 1, 8, 8]"),
    (_post("/v2/models/nope/infer", _infer_json(GOOD)), 404, "no model named 'nope'"),
    (_post("/v2/models/digits/versions/7/infer", _infer_json(GOOD)), 404,
     "serves version 1, not 7"),
    (_post("/v3/anything", b""), 404, "no such endpoint: POST /v3/anything"),
    (_post("/v2/models/digits", b""), 405, "POST is not allowed on /v2/models/digits"),
    (_post("/v2/models/digits/infer", _infer_json(GOOD)).replace(TOKEN.encode(), b"wrong"),
     401, "missing or wrong bearer token"),
    (_post("/v2/models/digits/infer", b"x" * 70000), 413,
     "body of 70000 bytes is over the limit of 65536 for a JSON body"),
    (b"POST /v2/models/digits/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     411, "chunked request bodies are not accepted"),
    (b"GARBAGE\r\n\r\n", 400, "malformed request line 'GARBAGE'"),
    (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header line"),
    (b"GET /v2 HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400, "Content-Length is not a number"),
    # Regressions (issue 9, item 9): the parser accepted all of these.
    (b"GET /v2/" + b"a" * 40_000 + b" HTTP/1.1\r\n\r\n", 431, "request head over 32768 bytes"),
    (b"GET /v2 HTTP/1.1\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n", 431,
     "request head over 32768 bytes"),
    (b"GET /v2 HTTP/1.1\r\n" + b"a: b\r\n" * 200 + b"\r\n", 431,
     "200 header lines, over the limit of 100"),
    (_post("/v2/models/digits/infer", b"{}").replace(b"Content-Length: 2",
                                                     b"Content-Length: 2\r\nContent-Length: 0"),
     400, "conflicting Content-Length headers"),
    (_post("/v2/models/digits/infer", b"").replace(b"Content-Length: 0", b"Content-Length: 1_0"),
     400, "Content-Length is not a number"),
    (_post("/v2/models/digits/infer", b"").replace(b"Content-Length: 0", b"Content-Length: +3"),
     400, "Content-Length is not a number"),
    (b"GET /v2 HTTP/1.9\r\n\r\n", 505, "HTTP/1.9 is not supported"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "parameters": [1]})), 400,
     "input 'input': 'parameters' must be a JSON object, not list"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "parameters": "binary"})), 400,
     "'parameters' must be a JSON object, not str"),
    (_post("/v2/models/digits/infer", json.dumps({"inputs": [GOOD], "parameters": []}).encode()),
     400, "the request: 'parameters' must be a JSON object"),
    (_post("/v2/models/digits/infer",
           json.dumps({"inputs": [GOOD], "outputs": [{"name": "logits", "parameters": 3}]})
           .encode()), 400, "outputs[0]: 'parameters' must be a JSON object"),
    (_post("/v2/models/digits/infer", json.dumps({"inputs": [GOOD], "outputs": "logits"})
           .encode()), 400, "'outputs' must be a list"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "shape": [1, 1, 8, True]})), 400,
     "'shape' must be a list of non-negative integers"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "shape": [2**62, 2**62]})), 400,
     "'shape' must be a list of non-negative integers"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "data": [10**30] * 64,
                                                   "datatype": "INT8"})), 400,
     "'data' is not INT8"),
    (_post("/v2/models/digits/infer", _infer_json({**GOOD, "data": None, "parameters": {
        "binary_data_size": True}})), 400, "binary_data_size True does not fit"),
    (_post("/v2/models/digits/infer", json.dumps({"inputs": [GOOD], "id": {"a": 1}}).encode()),
     400, "'id' must be a string"),
    # Regression (issue 9, item 10): deeply nested JSON gave a 500.
    (_post("/v2/models/digits/infer", b"[" * 20_000 + b"]" * 20_000), 400,
     "request body is not JSON (nested too deeply)"),
    (_post("/v2/models/digits/infer", b'{"inputs": [' + b"[" * 20_000 + b"]" * 20_000 + b"]}"),
     400, "request body is not JSON (nested too deeply)"),
    (_post("/v2/models/digits/infer", b'{"inputs": [{"name": "input", "datatype": "FP32", '
           b'"shape": [1], "data": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}]}"), 400,
     "'data' is not FP32"),
])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(
        server: ApiServer, client: AgentClient, request_bytes: bytes, status: int,
        message: str) -> None:
    response = _raw(server, request_bytes)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), response[:300]
    assert message in json.loads(body)["error"]
    assert client.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
    assert client.status()["models"][0]["errors"] == 0  # none of these is the model's fault


def test_keep_alive_and_pipelining(server: ApiServer) -> None:
    one = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    two = _post("/v2/models/digits/infer", _infer_json(GOOD))
    response = _raw(server, one + two + b"GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert b"HTTP/1.1 401 Unauthorized" in response  # the third request had no token
    assert b'"model_name":"digits"' in response


def test_oversized_body_is_not_read(server: ApiServer) -> None:
    # The server answers 413 and closes at once: it never waits for the 10 MB announced.
    head = _post("/v2/models/digits/infer", b"").replace(b"Content-Length: 0",
                                                          b"Content-Length: 10000000")
    response = _raw(server, head)
    assert response.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in response


def test_health_needs_no_token_but_everything_else_does(server: ApiServer) -> None:
    assert server.url is not None
    with AgentClient(server.url) as anonymous:
        assert anonymous.live()
        with pytest.raises(ApiError, match="HTTP 401: missing or wrong bearer token"):
            anonymous.status()
    not_ready = ApiServer(Runtime(), ApiSettings(port=0, token=None))
    not_ready.start()
    try:
        assert not_ready.url is not None
        with AgentClient(not_ready.url) as client:
            assert client.live()
            assert not client.ready()  # no model loaded yet
    finally:
        not_ready.stop()


def test_unix_socket(runtime: Runtime, tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = ApiServer(runtime, ApiSettings(port=None, unix_socket=path, token=TOKEN))
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with AgentClient(unix_socket=path, token=TOKEN) as client:
            assert client.infer("digits", {"input": samples(2)})["logits"].shape == (2, 10)
    finally:
        server.stop()
    assert not path.exists()


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    token = load_or_create_token(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    path.chmod(0o644)
    with pytest.raises(AgentError, match="chmod 600"):
        load_or_create_token(path)


def test_install_through_the_api(state_dir: Path, repo: Repo, tmp_path: Path,
                                 x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=ProbationPolicy(window_s=0))
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN))
    server.start()
    try:
        assert server.url is not None
        with AgentClient(server.url, token=TOKEN) as client:
            record = client.install(write_bundle(repo, tmp_path, digits_spec(1)))
            assert (record["state"], record["version"]) == ("probation", 1)
            assert client.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
            bad = tmp_path / "bad.efb"
            bad.write_bytes(b"not a bundle")
            refused = client.install(bad)
            assert refused["state"] == "failed"
            assert refused["reason"].startswith("rejected:")
            assert client.status()["models"][0]["version"] == 1
    finally:
        server.stop()


def test_a_bundle_over_the_limit_is_refused_with_the_reason_before_it_is_sent(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=ProbationPolicy(window_s=0))
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN,
                                            limits=ApiLimits(max_bundle_bytes=64 * 1024)))
    server.start()
    try:
        assert server.url is not None
        big = tmp_path / "big.efb"
        big.write_bytes(b"\0" * (8 * 2**20))  # large enough to fill the socket buffers
        with AgentClient(server.url, token=TOKEN) as client:
            with pytest.raises(ApiError, match=r"HTTP 413: .*max_bundle_bytes"):
                client.install(big)
            assert client.live()  # the same client goes on, on a new connection
    finally:
        server.stop()


def test_agent_unreachable_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with AgentClient(f"http://127.0.0.1:{port}") as client, pytest.raises(
            AgentError, match=r"cannot reach the agent .* is `edge-agent serve` running"):
        client.status()


def _strict_json(data: bytes) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(data, parse_constant=refuse)


def test_non_finite_outputs_are_valid_json(server: ApiServer,
                                           tclient: triton.InferenceServerClient) -> None:
    """Regression (issue 9, item 9): NaN outputs were written as bare NaN, invalid JSON."""
    x = samples(2)
    x[0] = np.nan
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = tclient.infer("digits", [tensor], headers=dict(AUTH), outputs=[
        triton.InferRequestedOutput("logits", binary_data=False)])
    logits = result.as_numpy("logits")
    assert np.isnan(logits[0]).all()
    np.testing.assert_allclose(logits[1], outputs(DIGITS.read_bytes(), x[1:])[0], rtol=1e-5,
                               atol=1e-5)
    body = json.dumps({"inputs": [{**GOOD, "data": ["NaN"] * 64}]}).encode()
    head, _, raw = _raw(server, _post("/v2/models/digits/infer", body)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    parsed = _strict_json(raw)
    assert isinstance(parsed, dict)
    assert parsed["outputs"][0]["data"] == ["NaN"] * 10


def _batch(n: int, *, binary: bool = True) -> bytes:
    x = np.zeros((n, 1, 8, 8), np.float32)
    if not binary:
        return _post("/v2/models/digits/infer", _infer_json(
            {"name": "input", "datatype": "FP32", "shape": list(x.shape),
             "data": x.ravel().tolist()}))
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return _post("/v2/models/digits/infer", head + x.tobytes(),
                 f"Inference-Header-Content-Length: {len(head)}")


def _status_and_error(response: bytes) -> tuple[int, str | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body).get("error") if status != 200 else None


def test_batch_and_input_size_limits(runtime: Runtime) -> None:
    """Regression (issue 9, item 8): any batch was run, however large."""
    limits = ApiLimits(max_batch=8, max_input_bytes=4000, max_json_bytes=2048)
    server = ApiServer(runtime, ApiSettings(port=0, token=TOKEN, limits=limits))
    server.start()
    try:
        assert _status_and_error(_raw(server, _batch(8))) == (200, None)
        status, error = _status_and_error(_raw(server, _batch(9)))
        assert status == 413
        assert error == ("input 'input': batch of 9 is over this agent's limit of 8 "
                         "(api.limits.max_batch); split the request")
        # 8 x 256 bytes fit 4000 once; a second input of the same size does not.
        head = json.dumps({"inputs": [
            {"name": name, "datatype": "FP32", "shape": [8, 1, 8, 8],
             "parameters": {"binary_data_size": 2048}} for name in ("input", "other")]})
        request = _post("/v2/models/digits/infer", head.encode() + bytes(4096),
                        f"Inference-Header-Content-Length: {len(head)}")
        status, error = _status_and_error(_raw(server, request))
        assert status == 413
        assert error is not None
        assert "input 'other': the inputs take 4096 bytes or more, over this agent's limit " \
            "of 4000 (api.limits.max_input_bytes)" in error
        status, error = _status_and_error(_raw(server, _batch(8, binary=False)))
        assert status == 413
        assert error is not None
        assert "over the limit of 2048 for a JSON body (api.limits.max_json_bytes; send " \
            "large tensors with the binary extension); it was not read" in error
        assert runtime.served("digits").stats.requests == 1  # none of the refused ran
    finally:
        server.stop()

"""The KServe v2 gRPC API, proved with an existing client (``tritonclient.grpc``) against a
real server: metadata, inference both ways of sending tensors, index, statistics, the
token, limits and errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="the agent-grpc extra (tritonclient[grpc]) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

from agent.config import ApiLimits  # noqa: E402
from agent.grpc_api import GrpcServer  # noqa: E402
from agent.runtime import Runtime  # noqa: E402
from tests.agent.bundles import DIGITS, DIGITS_TFLITE, outputs, samples  # noqa: E402

TOKEN = "t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server() -> Iterator[GrpcServer]:
    runtime = Runtime()
    runtime.load_file(DIGITS, "digits")
    runtime.load_file(DIGITS_TFLITE, "digits_lite")
    server = GrpcServer(runtime, "127.0.0.1", 0, TOKEN, ApiLimits(max_batch=8))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server: GrpcServer) -> Iterator[Any]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def _input(x: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_metadata_and_inference(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", headers=AUTH)
    assert client.get_server_metadata(headers=AUTH).name == "edgefleet-agent"
    metadata = client.get_model_metadata("digits", headers=AUTH, as_json=True)
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32",
                                   "shape": ["-1", "1", "8", "8"]}]
    assert metadata["platform"] == "onnxruntime_onnx"
    x = samples(5)
    result = client.infer("digits", [_input(x)], headers=AUTH, request_id="r7",
                          outputs=[grpcclient.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), outputs(DIGITS.read_bytes(), x),
                               rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "r7"
    lite = client.infer("digits_lite", [_input(x)], headers=AUTH)
    assert lite.as_numpy("Identity").argmax(1).tolist() == result.as_numpy("logits").argmax(
        1).tolist()


def test_typed_contents_as_well_as_raw(server: GrpcServer) -> None:
    """A KServe client may send values in InferTensorContents instead of raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    x = samples(2)
    request = pb.ModelInferRequest(model_name="digits", inputs=[
        pb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape),
            contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=list(AUTH.items()))
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, outputs(DIGITS.read_bytes(), x), rtol=1e-5, atol=1e-5)


def test_index_and_statistics(client: Any) -> None:
    before = client.get_inference_statistics("digits", headers=AUTH, as_json=True)
    client.infer("digits", [_input(samples(1))], headers=AUTH)
    after = client.get_inference_statistics("digits", headers=AUTH, as_json=True)
    count = int(after["model_stats"][0]["inference_stats"]["success"].get("count", 0))
    assert count == int(before["model_stats"][0]["inference_stats"]["success"].get(
        "count", 0)) + 1
    every = client.get_inference_statistics(headers=AUTH, as_json=True)
    assert [s["name"] for s in every["model_stats"]] == ["digits", "digits_lite"]
    index = client.get_model_repository_index(headers=AUTH, as_json=True)
    assert [(m["name"], m["state"]) for m in index["models"]] == [("digits", "READY"),
                                                                 ("digits_lite", "READY")]


@pytest.mark.parametrize(("call", "status", "says"), [
    (lambda c: c.get_model_metadata("digits"), "UNAUTHENTICATED", "bearer token"),
    (lambda c: c.get_model_metadata("digits", headers={"authorization": "Bearer no"}),
     "UNAUTHENTICATED", "bearer token"),
    (lambda c: c.get_model_metadata("nope", headers=AUTH), "NOT_FOUND",
     "no model named 'nope'"),
    (lambda c: c.get_model_metadata("digits", "7", headers=AUTH), "NOT_FOUND",
     "serves version 1, not 7"),
    (lambda c: c.infer("digits", [_input(samples(9))], headers=AUTH), "RESOURCE_EXHAUSTED",
     "batch of 9 is over this agent's limit of 8"),
    (lambda c: c.infer("digits", [_input(samples(1).reshape(1, 64))], headers=AUTH),
     "INVALID_ARGUMENT", "expected [?, 1, 8, 8]"),
    (lambda c: c.infer("digits", [_input(samples(1))], headers=AUTH,
                       outputs=[grpcclient.InferRequestedOutput("nope")]),
     "INVALID_ARGUMENT", "requested output 'nope' does not exist"),
    (lambda c: c.load_model("digits", headers=AUTH), "UNIMPLEMENTED", ""),
])
def test_errors_are_status_codes(client: Any, call, status: str,
                                 says: str) -> None:
    with pytest.raises(InferenceServerException) as raised:
        call(client)
    assert raised.value.status() == f"StatusCode.{status}"
    assert says in raised.value.message()
    assert client.is_model_ready("digits", headers=AUTH)  # nothing a caller does harms it


@pytest.mark.integration
def test_serve_with_grpc(tmp_path) -> None:
    import re
    import subprocess
    import sys
    from pathlib import Path

    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "edge-agent"), "serve", "--model", str(DIGITS),
         "--name", "digits", "--state-dir", str(tmp_path / "s"), "--port", "0",
         "--grpc-port", "0", "--profile", "x86-64-avx2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        port = re.search(r"and gRPC port (\d+)", line)
        assert port is not None, line
        token = (tmp_path / "s" / "api-token").read_text().strip()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port.group(1)}")
        try:
            result = client.infer("digits", [_input(samples(1))],
                                  headers={"authorization": f"Bearer {token}"})
        finally:
            client.close()
        assert result.as_numpy("logits").shape == (1, 10)
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()

"""A cascade end to end: `edge-compress composite --declare`, `fleet bundle build
--composite`, installed into a real agent over its HTTP API, answered as a cascade."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from agent.client import AgentClient
from agent.daemon import AgentProcess
from agent.http_api import ApiSettings
from agent.model_store import ModelStore
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from agent.trust_store import TrustStore
from bundle.composite import CompositeDecl
from bundle.signing import ArtifactInput
from bundle.trust import TrustedState
from compressor.cli import main as edge_compress
from experiments.composite import needs_expensive, probabilities
from fleet_server.cli import main as fleet
from tests.agent.bundles import (
    DATA,
    DIGITS,
    PROFILE,
    digits_spec,
    samples,
    swapped_digits,
    write_bundle,
)
from tests.agent.conftest import profile
from tests.bundle.repo import Repo

TOKEN = "t0ken"
pytestmark = pytest.mark.integration


def _linear_digits(path: Path) -> None:
    """A cheap second model of the digits CNN's signature: softmax regression on the first
    half of the evaluation split (plain gradient descent), as ONNX Flatten + Gemm."""
    data = np.load(DATA)
    x = data["eval_x"][:270].reshape(270, 64).astype(np.float64)
    y = np.eye(10)[data["eval_y"][:270]]
    w, b = np.zeros((64, 10)), np.zeros(10)
    for _ in range(300):
        p = probabilities((x @ w + b).astype(np.float32), "logits")
        w -= 0.5 * x.T @ (p - y) / len(x)
        b -= 0.5 * (p - y).mean(axis=0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])], "linear_digits",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w.astype(np.float32), "w"),
         numpy_helper.from_array(b.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"input": x})[0]
    return out


def test_a_cascade_bundle_installs_and_answers_as_a_cascade(tmp_path: Path) -> None:
    members = tmp_path / "members"
    members.mkdir()
    _linear_digits(members / "a_linear.onnx")
    shutil.copy(DIGITS, members / "b_cnn.onnx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert edge_compress(["composite", str(members / "a_linear.onnx"),
                              str(members / "b_cnn.onnx"), "--data", str(DATA), "--output",
                              "logits", "--timed-rows", "5", "--declare", "cascade"]) == 0
    declaration = json.loads(printed.getvalue())
    assert declaration["members"] == ["artifacts/a_linear.onnx", "artifacts/b_cnn.onnx"]
    threshold = declaration["threshold"]
    (tmp_path / "cascade.json").write_text(json.dumps(declaration))

    keys, bundle = tmp_path / "keys", tmp_path / "digits-v1.efb"
    assert fleet(["keys", "init", "--dir", str(keys)]) == 0
    assert fleet(["bundle", "build", "--name", "digits", "--version", "1", "--artifacts",
                  str(members), "--composite", str(tmp_path / "cascade.json"), "--profile",
                  PROFILE, "--keys", str(keys), "--out", str(bundle)]) == 0

    state = tmp_path / "state"
    TrustStore(state / "trust").save(TrustedState(root=(keys / "root.json").read_bytes()))
    runtime = Runtime(state, profile(), policy=ProbationPolicy(window_s=0))
    process = AgentProcess(runtime, ApiSettings(port=0, token=TOKEN), state)
    process.start(None)
    try:
        assert process.server.url is not None
        with AgentClient(process.server.url, token=TOKEN) as client:
            record = client.install(bundle)
            assert (record["state"], record["version"]) == ("probation", 1), record
            assert runtime.model("digits").backend.startswith("composite:cascade(")
            x = np.load(DATA)["eval_x"]
            got = np.concatenate([client.infer("digits", {"input": x[i:i + 64]})["logits"]
                                  for i in range(0, len(x), 64)])
    finally:
        process.stop()
        process.server.stop()
        runtime.close()

    cheap = probabilities(_run(members / "a_linear.onnx", x), "logits")
    costly = probabilities(_run(members / "b_cnn.onnx", x), "logits")
    unsure = needs_expensive(cheap, threshold)
    assert 0 < unsure.sum() < len(x)  # both paths taken
    np.testing.assert_allclose(got[~unsure], cheap[~unsure], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[unsure], costly[unsure], rtol=1e-5, atol=1e-6)
    labels = np.load(DATA)["eval_y"]
    accuracy = (got.argmax(axis=1) == labels).mean()
    assert accuracy >= (costly.argmax(axis=1) == labels).mean()  # the threshold's target
    assert accuracy > (cheap.argmax(axis=1) == labels).mean()
    # Both members are in the slot, each checked by its sha256.
    stored = ModelStore(state / "models").slot("digits", 1)
    assert [m.path.name for m in stored.members] == ["model.onnx", "member-1.onnx"]
    assert stored.intact()
    assert stored.members[1].path.read_bytes() == DIGITS.read_bytes()


def test_a_damaged_member_is_not_served_after_a_restart(state_dir: Path, repo: Repo,
                                                       tmp_path: Path) -> None:
    spec = digits_spec(1)
    ensemble = dataclasses.replace(
        spec, artifacts=(*spec.artifacts, ArtifactInput("swapped.onnx", swapped_digits(),
                                                        "onnx", "fp32")),
        self_test=(), composite=CompositeDecl(
            "ensemble", ("artifacts/digits.onnx", "artifacts/swapped.onnx"), "logits",
            combiner="mean"))
    runtime = Runtime(state_dir, profile(), policy=ProbationPolicy(window_s=0))
    record = runtime.install(write_bundle(repo, tmp_path, ensemble))
    assert record.reason is None, record.detail
    runtime.check_probation()
    x = samples(4)
    answer = runtime.infer("digits", {"input": x})["logits"]
    one = probabilities(_run(DIGITS, x), "logits")
    np.testing.assert_allclose(answer.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(answer[:, 2:], one[:, 2:], rtol=1e-5)  # classes both agree on
    runtime.close()

    stored = ModelStore(state_dir / "models").slot("digits", 1)
    stored.members[1].path.write_bytes(b"damaged")
    again = Runtime(state_dir, profile())
    try:
        assert [m.name for m in again.models()] == []
        assert any("digits v1 cannot be served" in p and "sha256" in p for p in again.problems)
    finally:
        again.close()

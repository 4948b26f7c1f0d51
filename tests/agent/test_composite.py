"""A composite model served by the runtime from real onnxruntime member sessions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from agent.composite import CompositeSession, serve_composite
from agent.errors import ModelLoadError
from agent.runtime import Runtime
from agent.sessions import Session
from bundle.composite import CompositeDecl
from experiments.composite import combine, probabilities

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_data.npz")["eval_x"][:64]


class RowCounter:
    """A member that counts the rows it is asked to run, around a real session."""

    def __init__(self, inner: Session) -> None:
        self.inner, self.rows = inner, 0
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.backend, self.fallback, self.device = inner.backend, inner.fallback, inner.device

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self.rows += len(next(iter(feeds.values())))
        return self.inner.run(feeds)


@pytest.fixture
def runtime() -> Runtime:
    rt = Runtime()
    rt.load_file(DIGITS, "cheap")
    rt.load_file(DIGITS, "costly")
    return rt


def test_ensemble_answers_the_combined_probabilities(runtime: Runtime) -> None:
    decl = CompositeDecl("ensemble", ("artifacts/a.onnx", "artifacts/b.onnx"), "logits",
                         combiner="mean")
    serve_composite(runtime, "digits", decl, ["cheap", "costly"])
    got = runtime.infer("digits", {"input": X})["logits"]
    one = probabilities(runtime.infer("cheap", {"input": X})["logits"], "logits")
    np.testing.assert_allclose(got, combine([one, one], "mean"), rtol=1e-5)
    assert runtime.model("digits").backend.startswith("composite:ensemble(")
    assert runtime.served("digits").figures["requests"] == 1


@pytest.mark.parametrize(("threshold", "expect_all"), [(0.0, False), (1.0, True), (0.99, None)])
def test_cascade_sends_only_unsure_rows_to_the_expensive_member(
        runtime: Runtime, threshold: float, expect_all: bool | None) -> None:
    cheap, costly = runtime.served("cheap").session, RowCounter(runtime.served("costly").session)
    decl = CompositeDecl("cascade", ("artifacts/a.onnx", "artifacts/b.onnx"), "logits",
                         threshold=threshold)
    session = CompositeSession(decl, [cheap, costly])
    out = session.run({"input": X})[0]
    confident = probabilities(cheap.run({"input": X})[0], "logits").max(axis=1)
    assert costly.rows == int((confident <= threshold).sum())
    if expect_all is not None:
        assert costly.rows == (len(X) if expect_all else 0)
    # Same network on both sides: the cascade's answer is the cheap model's probabilities.
    np.testing.assert_allclose(out, probabilities(cheap.run({"input": X})[0], "logits"),
                               rtol=1e-5)


def test_members_must_share_a_signature_and_the_output(runtime: Runtime) -> None:
    rt = runtime
    rt.load_file(ROOT / "models" / "vad.onnx", "vad")
    decl = CompositeDecl("cascade", ("artifacts/a.onnx", "artifacts/b.onnx"), "logits",
                         threshold=0.5)
    with pytest.raises(ModelLoadError, match="share one signature"):
        serve_composite(rt, "digits", decl, ["cheap", "vad"])
    wrong = CompositeDecl("cascade", ("artifacts/a.onnx", "artifacts/b.onnx"), "probs",
                          threshold=0.5)
    with pytest.raises(ModelLoadError, match="not an output"):
        serve_composite(rt, "digits", wrong, ["cheap", "costly"])

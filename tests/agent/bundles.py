"""Real signed bundles of the reference digits model for agent tests.

Golden self-test outputs are computed with onnxruntime from the model they are meant for,
so a bundle can pair them with a different artifact to fail its self-test on purpose.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from bundle.manifest import SelfTestCase, Tensor, TensorSpec
from bundle.signing import ArtifactInput, BundleSpec
from compressor.report import input_baseline, output_baseline
from tests.bundle.repo import Repo

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TFLITE = ROOT / "models" / "digits_cnn.tflite"
DATA = ROOT / "models" / "digits_data.npz"
PROFILE = "x86-64-avx2"


def samples(n: int = 4) -> np.ndarray:
    """The first ``n`` eval images, shape (n, 1, 8, 8) float32."""
    x: np.ndarray = np.load(DATA)["eval_x"][:n]
    return x


def outputs(model: bytes, x: np.ndarray) -> np.ndarray:
    """What onnxruntime computes for ``x`` with ``model``, one sample at a time."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


@functools.lru_cache(maxsize=1)
def digits_baseline() -> dict[str, Any]:
    """The drift baseline the compressor writes for the digits model (its eval data)."""
    x = np.load(DATA)["eval_x"]
    session = ort.InferenceSession(str(DIGITS), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    return {**input_baseline({"input": x}),
            "outputs": output_baseline({"logits": logits}, {"logits": "top1"})}


def _tensor(a: np.ndarray) -> Tensor:
    return Tensor(dtype=str(a.dtype), shape=a.shape, data=a.astype(a.dtype.newbyteorder("<"))
                  .tobytes())


def digits_spec(version: int, model: bytes | None = None, *, golden_from: bytes | None = None,
                name: str = "digits") -> BundleSpec:
    """A bundle spec for ``model`` (default: the reference digits model), self-tested with
    golden outputs of ``golden_from`` (default: the model itself)."""
    model = DIGITS.read_bytes() if model is None else model
    x = samples(2)
    expected = outputs(golden_from or model, x)
    cases = tuple(SelfTestCase(inputs={"input": _tensor(x[i:i + 1])},
                               expected_outputs={"logits": _tensor(expected[i:i + 1])},
                               atol=1e-4) for i in range(len(x)))
    return BundleSpec(
        name=name, version=version, profiles=(PROFILE,),
        artifacts=(ArtifactInput("digits.onnx", model, "onnx", "fp32"),),
        inputs=(TensorSpec("input", "float32", ("batch", 1, 8, 8)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),), self_test=cases,
        baseline=digits_baseline())


def perturbed_digits() -> bytes:
    """The digits model with its first weight tensor scaled: loads fine, computes wrongly."""
    model = onnx.load(str(DIGITS))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 3.0, first.name))
    return bytes(model.SerializeToString())


def batch_one_only() -> bytes:
    """A model declaring a dynamic batch that fails at run time for any batch but 1
    (a Reshape to [1, 64]): passes its self-test, then errors under real traffic."""
    weights = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "batch_one_only",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "shape"),
         numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def write_bundle(repo: Repo, directory: Path, spec: BundleSpec) -> Path:
    """Build and sign ``spec`` with ``repo``; the bundle file's path."""
    path = directory / f"{spec.name}-v{spec.version}.efb"
    path.write_bytes(repo.build(spec))
    return path


def swapped_digits() -> bytes:
    """The digits model with output classes 0 and 1 swapped: passes a self-test made from
    itself, loads and runs fine, and answers differently whenever it predicts 0 or 1."""
    model = onnx.load(str(DIGITS))
    graph = model.graph
    output = graph.output[0]
    original = output.name
    for node in graph.node:
        node.output[:] = [f"{o}_unswapped" if o == original else o for o in node.output]
    order = np.array([1, 0, *range(2, 10)], dtype=np.int64)
    graph.initializer.append(numpy_helper.from_array(order, "swap_order"))
    graph.node.append(helper.make_node("Gather", [f"{original}_unswapped", "swap_order"],
                                       [original], axis=1))
    return bytes(model.SerializeToString())

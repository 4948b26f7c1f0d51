"""TFLite artifacts: real onnx2tf/TensorFlow conversions of the digits model, run in LiteRT.

The conversion is the slow part (a child process importing TensorFlow, a few seconds), so
each module-scoped fixture converts once: ``converted`` builds every variant with the pass
alone, ``compressed`` runs ``compress()`` for LiteRT and ONNX profiles together. Tests that
need TensorFlow skip, with the reason, where the ``tflite`` extra is not installed; the
tests of what happens without it run everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.cli import main
from compressor.passes import (
    ConvertTflite,
    OptimizeGraph,
    PassContext,
    PassError,
    PreconditionError,
)
from compressor.passes.tflite import TFLITE_VARIANTS, TfliteBuild, tflite_unavailable
from compressor.pipeline import CompressOptions, UnsupportedTargetError, compress
from compressor.runner import open_runner, quantize
from firmware_profiles import get_profile
from firmware_profiles.runtimes import import_litert
from tests.compressor.signing import sign_and_verify

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL, DATA = MODELS / "digits_cnn.onnx", MODELS / "digits_data.npz"
with np.load(DATA) as _data:
    EVAL_X, EVAL_Y, CALLS = _data["eval_x"], _data["eval_y"], [
        {"input": x[None]} for x in _data["calib_x"][:64]]
FAST = CompressOptions(latency_rounds=2, latency_iterations=5, calibration_samples=64)
MISSING = "tensorflow, onnx2tf not installed; install edgefleet[tflite] for TFLite artifacts"

needs_tf = pytest.mark.skipif(
    tflite_unavailable() is not None,
    reason=f"TFLite converter not installed ({tflite_unavailable()}): "
           "pip install -e '.[tflite]' to run the TFLite conversion tests")


def interpreter(path: Path) -> Any:
    litert = import_litert()
    assert litert is not None
    it = litert.interpreter.Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    return it


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The ONNX model's outputs on the evaluation data."""
    return predict(MODEL)


def predict(model: Path, x: np.ndarray = EVAL_X) -> np.ndarray:
    runner = open_runner(model)
    return next(iter(runner.run({"input": x}).values()))


def accuracy(outputs: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=1) == EVAL_Y) * 100)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> TfliteBuild:
    """Every TFLite variant of the optimised digits model, converted once."""
    work = tmp_path_factory.mktemp("tflite")
    ctx = PassContext(workdir=work, calibration=CALLS)
    optimised = OptimizeGraph()(MODEL, ctx).model
    return ConvertTflite().build(optimised, ctx)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """compress() for two LiteRT-first profiles, the Edge TPU and an ONNX gateway."""
    out = tmp_path_factory.mktemp("compressed") / "out"
    profiles = [get_profile(n) for n in ("rpi4", "coral-edgetpu", "android-nnapi",
                                         "x86-64-vnni")]
    report = compress(MODEL, profiles, out, calibration=DATA, evaluation=DATA, options=FAST)
    return out, report


def by_profile(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["profile"]: v for v in report["variants"]}


# --- the conversion pass ------------------------------------------------------------------

@needs_tf
def test_every_variant_runs_in_litert_within_the_gate(converted: TfliteBuild,
                                                      reference: np.ndarray) -> None:
    assert converted.skipped == {}
    assert [a.name for a in converted.artifacts] == list(TFLITE_VARIANTS)
    fp32_accuracy = accuracy(reference)
    for artifact in converted.artifacts:
        assert artifact.dtype == TFLITE_VARIANTS[artifact.name]
        outputs = predict(artifact.path)
        assert outputs.shape == (len(EVAL_X), 10)
        assert outputs.dtype == np.float32  # int8-full outputs come back dequantized
        assert fp32_accuracy - accuracy(outputs) <= 1.0, artifact.name
        assert np.mean(outputs.argmax(1) == reference.argmax(1)) >= 0.99, artifact.name
    fp32 = predict(converted.artifacts[0].path)
    assert float(np.max(np.abs(fp32 - reference))) < 1e-4  # the conversion itself is exact


@needs_tf
def test_io_keeps_the_onnx_names_and_layout(converted: TfliteBuild) -> None:
    for artifact in converted.artifacts:
        it = interpreter(artifact.path)
        (inp,), (out,) = it.get_input_details(), it.get_output_details()
        assert (inp["name"], out["name"]) == ("input", "logits")
        assert list(inp["shape_signature"]) == [-1, 1, 8, 8]  # NCHW, dynamic batch
        expected = np.int8 if artifact.name == "tflite-int8-full" else np.float32
        assert inp["dtype"] == out["dtype"] == expected


@needs_tf
def test_quantized_variants_are_smaller(converted: TfliteBuild) -> None:
    size = {a.name: a.path.stat().st_size for a in converted.artifacts}
    assert size["tflite-fp16"] < 0.6 * size["tflite-fp32"]
    for name in ("tflite-int8-dynamic", "tflite-int8-static", "tflite-int8-full"):
        assert size[name] < size["tflite-fp32"] / 3, name


@needs_tf
def test_int8_full_has_only_integer_tensors(converted: TfliteBuild) -> None:
    (full,) = [a for a in converted.artifacts if a.name == "tflite-int8-full"]
    it = interpreter(full.path)
    kinds = {str(np.dtype(t["dtype"])) for t in it.get_tensor_details()}
    assert kinds <= {"int8", "int32"}, kinds  # int32: biases and shape operands
    assert full.io_quantization is not None
    (q_in,), (q_out,) = full.io_quantization["inputs"], full.io_quantization["outputs"]
    detail = it.get_input_details()[0]
    assert (q_in["dtype"], q_in["scale"], q_in["zero_point"]) == (
        "int8", pytest.approx(detail["quantization"][0]), detail["quantization"][1])
    assert q_out["name"] == "logits"
    assert q_out["scale"] > 0
    # The float variants carry no I/O quantization: a runtime feeds them float32 as is.
    assert all(a.io_quantization is None for a in converted.artifacts if a is not full)


@needs_tf
def test_runner_quantizes_inputs_and_dequantizes_outputs(converted: TfliteBuild) -> None:
    (full,) = [a for a in converted.artifacts if a.name == "tflite-int8-full"]
    assert full.io_quantization is not None
    (q_in,), (q_out,) = full.io_quantization["inputs"], full.io_quantization["outputs"]
    x = EVAL_X[:8]
    it = interpreter(full.path)
    index = it.get_input_details()[0]["index"]
    it.resize_tensor_input(index, list(x.shape))
    it.allocate_tensors()
    it.set_tensor(index, quantize(x, q_in["scale"], q_in["zero_point"], q_in["dtype"]))
    it.invoke()
    raw = it.get_tensor(it.get_output_details()[0]["index"])
    by_hand = (raw.astype(np.float32) - q_out["zero_point"]) * np.float32(q_out["scale"])
    np.testing.assert_array_equal(predict(full.path, x), by_hand)


@needs_tf
def test_unconvertible_model_is_a_pass_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    ctx = PassContext(workdir=tmp_path, calibration=CALLS[:4])
    with pytest.raises(PassError, match="not a readable ONNX model"):
        ConvertTflite(("tflite-fp32",)).build(bad, ctx)


def test_bad_variant_and_missing_calibration_fail_before_converting(tmp_path: Path) -> None:
    ctx = PassContext(workdir=tmp_path)
    with pytest.raises(PreconditionError, match="unknown TFLite variant"):
        ConvertTflite(("tflite-int4",)).build(MODEL, ctx)
    with pytest.raises(PreconditionError, match="tflite-int8-full need calibration data"):
        ConvertTflite(("tflite-int8-full",)).build(MODEL, ctx)


def test_tflite_unavailable_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    def find_spec(name: str) -> Any:  # as if all but these two were installed
        return None if name in {"tensorflow", "onnx2tf"} else object()

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert tflite_unavailable() == MISSING
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert tflite_unavailable() is None


# --- the compressor end to end --------------------------------------------------------------

@needs_tf
def test_each_profile_gets_its_format(compressed: tuple[Path, dict[str, Any]]) -> None:
    out, report = compressed
    variants = by_profile(report)
    # rpi4 lists tflite before onnx: it gets a TFLite artifact even though ONNX fp32 qualifies.
    assert variants["rpi4"]["format"] == "tflite"
    assert variants["rpi4"]["candidate"] in {"tflite-fp32", "tflite-int8-dynamic",
                                             "tflite-int8-static"}
    assert variants["android-nnapi"]["format"] == "tflite"
    assert variants["coral-edgetpu"]["candidate"] == "tflite-int8-full"
    assert variants["coral-edgetpu"]["dtype"] == "int8-full"
    assert variants["x86-64-vnni"]["format"] == "onnx"
    for variant in report["variants"]:
        assert (out / variant["file"]).is_file()
        assert variant["file"].endswith(f".{variant['format']}")
        assert variant["accuracy_drop"] <= 1.0
    decisions = {d["profile"]: d for d in report["decisions"]}
    rpi4 = {r["candidate"]: r["reason"] for r in decisions["rpi4"]["rejected"]}
    assert rpi4["fp32"].startswith("onnx: the profile prefers tflite")
    assert rpi4["tflite-int8-full"] == ("int8-full is not among the profile's dtypes "
                                        "(int8, fp32)")
    # Profiles that prefer ONNX are not converted for: no TFLite candidate in their decision.
    assert not any(r["candidate"].startswith("tflite-")
                   for r in decisions["x86-64-vnni"]["rejected"])


@needs_tf
def test_coral_artifact_is_all_integer(compressed: tuple[Path, dict[str, Any]]) -> None:
    out, report = compressed
    coral = by_profile(report)["coral-edgetpu"]
    it = interpreter(out / coral["file"])
    assert {str(np.dtype(t["dtype"])) for t in it.get_tensor_details()} <= {"int8", "int32"}
    assert it.get_input_details()[0]["dtype"] == np.int8
    assert it.get_output_details()[0]["dtype"] == np.int8
    assert coral["io_quantization"]["inputs"][0]["name"] == "input"


@needs_tf
def test_report_records_tflite_candidates(compressed: tuple[Path, dict[str, Any]]) -> None:
    _, report = compressed
    candidates = {c["name"]: c for c in report["candidates"]}
    assert set(TFLITE_VARIANTS) <= set(candidates)  # fp16 for android-nnapi, int8-full, ...
    for name in TFLITE_VARIANTS:
        candidate = candidates[name]
        assert candidate["format"] == "tflite"
        assert candidate["notes"][0] == ("onnx2tf 1.28.8 (onnxsim 0.8.1), TensorFlow 2.21.0 "
                                         "converter")
        assert candidate["latency_p50_ms"] > 0
        assert candidate["accuracy_drop"] <= 1.0
    assert candidates["fp32"]["format"] == "onnx"
    assert "io_quantization" in candidates["tflite-int8-full"]
    assert report["tools"]["tensorflow"] == "2.21.0"
    assert report["tools"]["onnx2tf"] == "1.28.8"
    assert report["notes"] == []


@needs_tf
def test_self_tests_pass_in_the_agents_litert_session(
        compressed: tuple[Path, dict[str, Any]]) -> None:
    """Each chosen artifact, opened as the agent opens it, passes report.json's self-test.

    int8-full included: the agent serves a full-integer model as float (quantizing inputs
    and dequantizing outputs with the tensors' scale and zero point), so the bundle's float
    golden cases apply to every variant alike.
    """
    from agent.sessions import open_session

    out, report = compressed
    assert any(v.get("io_quantization") for v in report["variants"])  # int8-full is here
    for variant in report["variants"]:
        session = open_session(out / variant["file"], variant["format"])
        assert [(i.name, i.dtype) for i in session.inputs] == [("input", "float32")]
        assert [o.dtype for o in session.outputs] == ["float32"]
        for case in report["self_test"]:
            x = decode(case["inputs"]["input"])
            expected = decode(case["expected_outputs"]["logits"])
            got = session.run({"input": x})[0]
            assert np.abs(got - expected).max() <= variant["self_test_atol"] <= case["atol"]


def decode(tensor: dict[str, Any]) -> np.ndarray:
    import base64

    data = base64.b64decode(tensor["data"])
    return np.frombuffer(data, dtype=np.dtype(tensor["dtype"]).newbyteorder("<")).reshape(
        tensor["shape"]).astype(tensor["dtype"])


@needs_tf
def test_bundle_builds_from_tflite_artifacts(compressed: tuple[Path, dict[str, Any]],
                                             tmp_path: Path) -> None:

    out, _ = compressed
    verified = sign_and_verify(out, tmp_path, "coral-edgetpu")
    formats = {a.profile: (a.format, a.dtype) for a in verified.manifest.artifacts}
    assert formats["coral-edgetpu"] == ("tflite", "int8-full")
    assert formats["rpi4"][0] == "tflite"


@needs_tf
def test_a_tflite_model_is_compressed_too(tmp_path: Path) -> None:
    steps: list[str] = []
    report = compress(MODELS / "digits_cnn.tflite", [get_profile("x86-64-vnni"),
                                                     get_profile("rpi4")],
                      tmp_path / "out", calibration=DATA, evaluation=DATA, options=FAST,
                      progress=lambda step, total, what: steps.append(f"{step}/{total}"))
    assert steps[-2:] == ["9/10", "10/10"]
    candidates = {c["name"]: c for c in report["candidates"]}
    assert candidates["tflite-fp32"]["notes"] == ["the model as given"]
    assert candidates["fp32"]["notes"][0].startswith("translated from TFLite by tf2onnx")
    assert {"int8-static", "tflite-int8-dynamic"} <= set(candidates)
    assert report["model"] == {"file": "digits_cnn.tflite", "format": "tflite",
                               "size_bytes": (MODELS / "digits_cnn.tflite").stat().st_size}
    assert all(c["accuracy_drop"] <= 1.0 for c in candidates.values())
    assert by_profile(report)["rpi4"]["format"] == "tflite"


# --- without TensorFlow ----------------------------------------------------------------------

def test_without_tensorflow_litert_profiles_get_onnx_and_a_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("compressor.pipeline.tflite_unavailable", lambda: MISSING)
    out = tmp_path / "out"
    assert main([str(MODEL), "--profile", "rpi4", "--calibration", str(DATA), "--eval",
                 str(DATA), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"note: no TFLite candidates for rpi4: {MISSING}" in printed.out
    # The profile's own line says it did not get the format it prefers, and so does stderr.
    wanted = (f"wanted TFLite (formats tflite, onnx) but got onnx: no TFLite candidates for "
              f"rpi4: {MISSING}")
    assert f"rpi4: fp32\n  note: {wanted}" in printed.out
    assert f"edge-compress: warning: rpi4: {wanted}\n" in printed.err
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == [f"no TFLite candidates for rpi4: {MISSING}"]
    assert report["variants"][0]["format"] == "onnx"
    assert not any(c["format"] == "tflite" for c in report["candidates"])


def test_without_tensorflow_coral_is_refused(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("compressor.pipeline.tflite_unavailable", lambda: MISSING)
    with pytest.raises(UnsupportedTargetError, match=re.escape(
            "profile coral-edgetpu runs only tflite artifacts, and the TFLite converter is "
            f"missing here: {MISSING} (or drop that --profile).")):
        compress(MODEL, [get_profile("coral-edgetpu")], tmp_path / "out", calibration=DATA,
                 options=FAST)
    assert not (tmp_path / "out").exists()


def test_failed_conversion_is_a_note_not_a_crash(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("compressor.pipeline.tflite_unavailable", lambda: None)

    def fail(self: ConvertTflite, model: Path, ctx: PassContext) -> TfliteBuild:
        raise PassError(f"{model}: onnx2tf cannot convert it")

    monkeypatch.setattr(ConvertTflite, "build", fail)
    report = compress(MODEL, [get_profile("rpi4")], tmp_path / "out", calibration=DATA,
                      evaluation=DATA, options=FAST)
    assert report["notes"][0].startswith("no TFLite candidates: ")
    assert report["notes"][0].endswith("onnx2tf cannot convert it")
    assert report["variants"][0]["format"] == "onnx"
    assert report["decisions"][0]["notes"][-1].startswith(
        "wanted TFLite (formats tflite, onnx) but got onnx: no TFLite candidates: the "
        "conversion failed: ")

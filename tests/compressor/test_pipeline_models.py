"""compress() on models unlike the digits CNN: several inputs of any dtype, recurrent state,
masks, old opsets, a candidate that cannot be built, a report that must stay small."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.pipeline import CompressOptions, compress
from compressor.report import tensor_json
from firmware_profiles import get_profile
from tests.compressor.onnx_models import (
    old_opset_mlp,
    segmentation_model,
    stateful_model,
    two_input_model,
)
from tests.compressor.signing import sign_and_verify

MODELS = Path(__file__).resolve().parents[2] / "models"
FAST = CompressOptions(latency_rounds=1, latency_iterations=3, calibration_samples=16)
VNNI = get_profile("x86-64-vnni")
RNG = np.random.default_rng(0)


def save(path: Path, **arrays: np.ndarray) -> Path:
    named: dict[str, Any] = {k.replace("__", "/"): v for k, v in arrays.items()}
    np.savez(path, **named)
    return path


def test_two_int64_inputs_judged_as_embeddings(tmp_path: Path) -> None:
    model = two_input_model(tmp_path / "enc.onnx")
    ids = RNG.integers(0, 50, size=(40, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 4:] = RNG.integers(0, 2, size=(40, 2))
    data = save(tmp_path / "d.npz", eval_x__ids=ids, eval_x__mask=mask, calib_x__ids=ids[:8],
                calib_x__mask=mask[:8])
    out = tmp_path / "out"
    report = compress(model, [VNNI], out, calibration=data, evaluation=data, options=FAST)
    assert [i["name"] for i in report["inputs"]] == ["ids", "mask"]
    assert report["metrics"] == {"embedding": "embedding"}
    quality = {c["name"]: c["quality"]["embedding"] for c in report["candidates"]}
    assert quality["fp32"]["score"] == 100.0
    assert quality["fp32"]["cosine_mean"] > 0.9999
    assert quality["int8-dynamic"]["cosine_mean"] > 0.95
    case = report["self_test"][0]
    assert set(case["inputs"]) == {"ids", "mask"}
    assert case["inputs"]["ids"]["dtype"] == "int64"
    assert case["inputs"]["ids"]["shape"] == [1, 6]
    assert [b["input"] for b in report["baseline"]["inputs"]] == ["ids", "mask"]
    (outputs,) = report["baseline"]["outputs"]
    assert outputs["kind"] == "values"
    assert outputs["samples"] == len(ids)
    assert sum(outputs["counts"]) % len(ids) == 0
    assert sign_and_verify(out, tmp_path, "x86-64-vnni").manifest.self_test


def test_stateful_model_runs_sequences_and_self_tests_whole_calls(tmp_path: Path) -> None:
    model = stateful_model(tmp_path / "rnn.onnx")
    x = RNG.normal(size=(6, 10, 1, 3)).astype(np.float32)  # 6 sequences of 10 steps
    data = save(tmp_path / "d.npz", eval_x__x=x, const__gain=np.array(0.5, np.float32))
    out = tmp_path / "out"
    report = compress(model, [VNNI], out, evaluation=data, options=FAST)
    assert report["state"] == [{"output": "hn", "input": "h"}]
    assert report["metrics"] == {"y": "relative", "hn": "none"}
    case1 = report["self_test"][1]
    assert set(case1["inputs"]) == {"x", "h", "gain"}
    # The second call's state is the first call's next state, as the reference computed it.
    assert case1["inputs"]["h"] == report["self_test"][0]["expected_outputs"]["hn"]
    assert sign_and_verify(out, tmp_path, "x86-64-vnni").manifest.self_test


def test_masks_are_judged_by_iou(tmp_path: Path) -> None:
    model = segmentation_model(tmp_path / "seg.onnx")
    images = RNG.random((24, 1, 16, 16)).astype(np.float32)
    labels = (images > 0.5).astype(np.int64)[:, 0]
    data = save(tmp_path / "d.npz", eval_x=images, eval_y=labels)
    report = compress(model, [VNNI], tmp_path / "out", evaluation=data, options=FAST)
    assert report["metrics"] == {"mask": "iou"}
    quality = {c["name"]: c["quality"]["mask"] for c in report["candidates"]}
    assert 0 < quality["fp32"]["score"] < 100  # the random model is a poor segmenter...
    assert quality["fp32"]["score"] == quality["fp32"]["reference_score"]
    assert abs(quality["int8-static"]["drop"]) < 5  # ...and int8 is as poor as fp32


def test_a_candidate_that_cannot_be_built_is_rejected_and_the_run_goes_on(
        tmp_path: Path) -> None:
    # One MatMul: structured pruning has no layer pair to prune (its precondition fails).
    model = two_input_model(tmp_path / "enc.onnx")
    ids = RNG.integers(0, 50, size=(20, 6)).astype(np.int64)
    data = save(tmp_path / "d.npz", eval_x__ids=ids, eval_x__mask=np.ones_like(ids))
    options = CompressOptions(latency_rounds=1, latency_iterations=3, prune_channels=0.5)
    report = compress(model, [VNNI], tmp_path / "out", evaluation=data, options=options)
    failed = {f["name"]: f for f in report["failed"]}
    assert failed["prune-channels50"]["stage"] == "build"
    assert "no prunable layer pairs" in failed["prune-channels50"]["reason"]
    assert failed["prune-channels50+int8-dynamic"]["reason"] == "prune-channels50 did not build"
    rejected = {r["candidate"]: r["reason"] for r in report["decisions"][0]["rejected"]}
    assert rejected["prune-channels50"].startswith("build failed: ")
    assert report["variants"]  # the others competed


def test_an_old_opset_model_gets_int8_static(tmp_path: Path) -> None:
    model = old_opset_mlp(tmp_path / "old.onnx", opset=9)
    report = compress(model, [VNNI], tmp_path / "out", calibration=MODELS / "digits_data.npz",
                      evaluation=MODELS / "digits_data.npz", options=FAST)
    static = next(c for c in report["candidates"] if c["name"] == "int8-static")
    assert "opset 11 -> 13" in static["notes"]
    assert report["failed"] == []


def test_golden_cases_beyond_the_budget_go_to_an_npz(tmp_path: Path) -> None:
    model = segmentation_model(tmp_path / "seg.onnx", side=64)
    images = RNG.random((8, 1, 64, 64)).astype(np.float32)  # 16 KiB in + 16 KiB out a case
    data = save(tmp_path / "d.npz", eval_x=images)
    out = tmp_path / "out"
    options = CompressOptions(latency_rounds=1, latency_iterations=3,
                              self_test_budget_bytes=40_000, baseline_features=32)
    report = compress(model, [VNNI], out, evaluation=data, options=options)
    assert len(report["self_test"]) == 1
    assert report["self_test_file"] == "self_test.npz"
    with np.load(out / "self_test.npz") as cases:
        assert sorted(cases.files)[:2] == ["000000/expected/mask", "000000/image"]
        assert len(cases.files) == 8  # four cases, input and expected output each
        first = report["self_test"][0]
        assert tensor_json(cases["000000/image"]) == first["inputs"]["image"]
    assert report["baseline"]["features"] == 32
    assert report["baseline"]["elements_per_feature"] == 128
    assert (out / "report.json").stat().st_size < 150_000
    assert len(sign_and_verify(out, tmp_path, "x86-64-vnni").manifest.self_test) == 1


@pytest.mark.parametrize("metric", ["mask=relative:0.2", "python:{file}:score"])
def test_chosen_metrics_override_the_inferred_one(tmp_path: Path, metric: str) -> None:
    file = tmp_path / "metric.py"
    file.write_text("import numpy as np\n"
                    "def score(outputs, target):\n"
                    "    return float(np.mean(np.abs(outputs - target) < 0.1) * 100)\n")
    from compressor.metrics import parse_metric

    name, chosen = parse_metric(metric.format(file=file))
    model = segmentation_model(tmp_path / "seg.onnx")
    data = save(tmp_path / "d.npz", eval_x=RNG.random((8, 1, 16, 16)).astype(np.float32))
    options = CompressOptions(latency_rounds=1, latency_iterations=3, metrics={name: chosen})
    report = compress(model, [VNNI], tmp_path / "out", evaluation=data, options=options)
    assert report["metrics"] == {"mask": str(chosen)}


@pytest.mark.integration
@pytest.mark.parametrize(("model", "data", "metric"), [
    ("text_encoder.onnx", "text_encoder_data.npz", "sentence_embedding=embedding"),
    ("vad.onnx", "vad_data.npz", "prob=iou:0.5"),
])
def test_the_agent_passes_the_self_test_of_multi_input_and_stateful_models(
        tmp_path: Path, model: str, data: str, metric: str) -> None:
    """The signed bundle's golden cases, as the agent's session runs them, match."""
    from agent.sessions import open_session
    from agent.tensors import from_manifest_tensor
    from compressor.metrics import parse_metric

    out = tmp_path / "out"
    options = CompressOptions(latency_rounds=1, latency_iterations=3, calibration_samples=32,
                              metrics=dict([parse_metric(metric)]))
    compress(MODELS / model, [VNNI], out, calibration=MODELS / data, evaluation=MODELS / data,
             options=options)
    manifest = sign_and_verify(out, tmp_path, "x86-64-vnni").manifest
    assert manifest.self_test
    (artifact,) = manifest.artifacts
    session = open_session(out / Path(artifact.path).name, artifact.format)
    names = [o.name for o in session.outputs]
    for case in manifest.self_test:
        got = session.run({n: from_manifest_tensor(t) for n, t in case.inputs.items()})
        for name, tensor in case.expected_outputs.items():
            expected = from_manifest_tensor(tensor)
            assert np.allclose(got[names.index(name)], expected, atol=case.atol, rtol=0)

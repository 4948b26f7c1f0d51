"""compress() end to end on the digits model: artifacts, report, gate, bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from compressor.cli import main
from compressor.dataset import DatasetError
from compressor.errors import CompressorError
from compressor.pipeline import CompressOptions, NoArtifactError, UnsupportedTargetError, compress
from compressor.runner import ModelLoadError
from firmware_profiles import PROFILES_DIR, get_profile, load_profile
from tests.compressor.signing import sign_and_verify

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL, DATA = MODELS / "digits_cnn.onnx", MODELS / "digits_data.npz"
FAST = CompressOptions(latency_rounds=2, latency_iterations=5, calibration_samples=32)


def custom_profile(tmp_path: Path, name: str, **edits: str) -> Path:
    """A copy of x86-64-vnni under another name with some lines replaced."""
    text = (PROFILES_DIR / "x86-64-vnni.toml").read_text(encoding="utf-8")
    text = text.replace('name = "x86-64-vnni"', f'name = "{name}"')
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_compress_writes_artifacts_and_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps: list[str] = []
    report = compress(MODEL, [get_profile("x86-64-vnni"), get_profile("x86-64-avx2")], out,
                      calibration=DATA, evaluation=DATA, options=FAST,
                      progress=lambda step, total, what: steps.append(f"{step}/{total}"))
    assert steps[-1] == "8/8"
    assert json.loads((out / "report.json").read_text()) == report
    names = {c["name"] for c in report["candidates"]}
    assert names == {"fp32", "int8-dynamic", "int8-static", "int8-dynamic-rr", "int8-static-rr"}
    assert [d["profile"] for d in report["decisions"]] == ["x86-64-vnni", "x86-64-avx2"]
    for variant in report["variants"]:
        assert (out / variant["file"]).is_file()
        assert variant["accuracy_drop"] <= 1.0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(v["file"] for v in report["variants"]), "report.json"])
    assert report["inputs"] == [{"name": "input", "dtype": "float32",
                                 "shape": ["batch", 1, 8, 8]}]
    assert len(report["self_test"]) == 4
    assert report["baseline"]["features"] == 64
    assert len(report["baseline"]["histograms"]) == 64
    assert [b["input"] for b in report["baseline"]["inputs"]] == ["input"]
    (outputs,) = report["baseline"]["outputs"]
    assert outputs["output"] == "logits"
    assert outputs["kind"] == "classes"
    assert outputs["classes"] == 10
    assert sum(outputs["counts"]) == outputs["samples"]
    assert sum(outputs["confidence"]["counts"]) == outputs["samples"]
    assert 0.5 < outputs["confidence_mean"] <= 1.0
    assert report["metrics"] == {"logits": "top1"}
    assert report["failed"] == []
    assert "self_test_file" not in report
    assert report["tools"]["onnxruntime"] != "not installed"
    assert not list(tmp_path.glob(".out.*")), "scratch directory left behind"


def test_report_feeds_a_signed_bundle(tmp_path: Path) -> None:
    out = tmp_path / "out"
    compress(MODEL, [get_profile("x86-64-vnni")], out, calibration=DATA, evaluation=DATA,
             options=FAST)
    verified = sign_and_verify(out, tmp_path, "x86-64-vnni")
    assert verified.manifest.profiles == ("x86-64-vnni",)
    assert len(verified.manifest.self_test) == 4
    assert verified.manifest.artifacts[0].profile == "x86-64-vnni"


def test_budget_no_candidate_meets_gives_no_artifact_and_a_report(tmp_path: Path) -> None:
    # An int8-only profile and a budget below zero: no int8 candidate can qualify.
    profile = load_profile(custom_profile(tmp_path, "int8-only",
                                          **{'dtypes = ["int8", "fp32"]': 'dtypes = ["int8"]'}))
    out = tmp_path / "out"
    options = CompressOptions(max_accuracy_drop=-1.0, latency_rounds=1, latency_iterations=2,
                              calibration_samples=16)
    with pytest.raises(NoArtifactError, match="no artifact within the accuracy budget of -1 "
                       "for int8-only"):
        compress(MODEL, [profile], out, calibration=DATA, evaluation=DATA, options=options)
    report = json.loads((out / "report.json").read_text())
    assert report["variants"] == []
    decision = report["decisions"][0]
    assert decision["chosen"] is None
    reasons = {r["candidate"]: r["reason"] for r in decision["rejected"]}
    assert reasons["fp32"] == "fp32 is not among the profile's dtypes (int8)"
    assert "over the budget of -1" in reasons["int8-static"]
    assert [p.name for p in out.iterdir()] == ["report.json"]


@pytest.mark.parametrize("case", ["unreadable_model", "pytorch_model", "wrong_shape",
                                  "wrong_dtype", "no_data", "avoided_op", "tflite_only_profile",
                                  "out_not_empty"])
def test_bad_input_leaves_nothing(tmp_path: Path, case: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, calibration, profile = MODEL, DATA, get_profile("x86-64-vnni")
    out = tmp_path / "out"
    expected: type[Exception] = DatasetError
    message = ""
    if case == "unreadable_model":
        model = tmp_path / "m.onnx"
        model.write_bytes(b"\x08\x01garbage")
        expected, message = ModelLoadError, "not a readable ONNX model"
    elif case == "pytorch_model":
        model = tmp_path / "m.pt"
        model.write_bytes(b"torch")
        expected, message = ModelLoadError, "takes an ONNX (.onnx) or TFLite (.tflite) model"
    elif case in {"wrong_shape", "wrong_dtype"}:
        calibration = tmp_path / "c.npz"
        bad = (np.zeros((8, 8, 8), np.float32) if case == "wrong_shape"
               else np.zeros((8, 1, 8, 8), np.float64))
        np.savez(calibration, calib_x=bad)
        message = ("inputs have shape [8, 8, 8] but model input 'input' expects "
                   "['samples', 1, 8, 8]" if case == "wrong_shape" else "are float64")
    elif case == "no_data":
        calibration, message = None, "no data: pass --calibration"  # type: ignore[assignment]
    elif case == "avoided_op":
        profile = load_profile(custom_profile(tmp_path, "no-conv",
                                              **{"avoid_ops = []": 'avoid_ops = ["Conv"]'}))
        expected, message = UnsupportedTargetError, "uses Conv, which profile no-conv cannot run"
    elif case == "tflite_only_profile":
        # As on a machine without the tflite extra (test_tflite.py covers it installed).
        monkeypatch.setattr("compressor.pipeline.tflite_unavailable",
                            lambda: "install edgefleet[tflite] for TFLite artifacts")
        profile = get_profile("coral-edgetpu")
        expected, message = UnsupportedTargetError, ("runs only tflite artifacts, and the "
                                                     "TFLite converter is missing here")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected, message = CompressorError, "exists and is not empty"
    evaluation = calibration if case not in {"wrong_shape", "wrong_dtype"} else DATA
    with pytest.raises(expected, match=re.escape(message)):
        compress(model, [profile], out, calibration=calibration, evaluation=evaluation,
                 options=FAST)
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_cli_implicit_compress_and_one_line_errors(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main([str(MODEL), "--profile", "x86-64-vnni", "--calibration", str(DATA),
                 "--eval", str(DATA), "--out", str(out), "--json"])
    assert code == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["profiles"] == ["x86-64-vnni"]
    assert "6/6" in captured.err  # the progress line reached its end
    missing = tmp_path / "missing.onnx"
    assert main([str(missing), "--profile", "x86-64-vnni", "--eval", str(DATA),
                 "--out", str(tmp_path / "o2")]) == 1
    assert capsys.readouterr().err == (
        f"edge-compress: error: {missing}: not a readable ONNX model "
        f"([Errno 2] No such file or directory: '{missing}').\n")


def test_structured_pruning_candidates_go_through_the_gate(tmp_path: Path) -> None:
    options = CompressOptions(latency_rounds=1, latency_iterations=3, calibration_samples=16,
                              prune_channels=0.5)
    report = compress(MODEL, [get_profile("x86-64-vnni")], tmp_path / "out", calibration=DATA,
                      evaluation=DATA, options=options)
    by_name = {c["name"]: c for c in report["candidates"]}
    assert {"prune-channels50", "prune-channels50+int8-dynamic"} <= set(by_name)
    assert by_name["prune-channels50"]["notes"][0].startswith("removed 8 of 16")
    assert by_name["prune-channels50"]["size_bytes"] < by_name["fp32"]["size_bytes"]
    rejected = {r["candidate"] for r in report["decisions"][0]["rejected"]}
    assert rejected | {report["decisions"][0]["chosen"]} == set(by_name)


@pytest.mark.parametrize("argv", [
    ["MODEL", "--profile", "rpi9", "--out", "OUT"],
    ["--profile", "rpi9", "MODEL", "--out", "OUT"],
    ["-v", "MODEL", "--out", "OUT", "--profile", "rpi9"],
    ["compress", "MODEL", "--profile", "rpi9", "--out", "OUT"],
])
def test_cli_compress_word_is_optional_in_any_order(argv: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else str(MODEL) if a == "MODEL" else a
            for a in argv]
    assert main(argv) == 1  # parsed as compress; fails on the unknown profile, not on usage
    assert "no profile named 'rpi9'" in capsys.readouterr().err

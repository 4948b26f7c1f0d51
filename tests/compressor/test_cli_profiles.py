"""`edge-compress profiles` and `edge-compress evaluate` through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.cli import main
from firmware_profiles import PROFILES_DIR

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_profiles_lists_every_profile_and_marks_best(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    names = {p.stem for p in PROFILES_DIR.glob("*.toml")}
    listed = {line.split()[1] if line.startswith("*") else line.split()[0]
              for line in out.splitlines()[1:]}
    assert listed == names
    assert sum(line.startswith("*") for line in out.splitlines()) == 1


def test_profiles_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fits"] is True
    assert {row["profile"] for row in rows} >= {"rpi4", "coral-edgetpu"}


def test_check_valid_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "--check", str(PROFILES_DIR / "rpi5.toml")]) == 0
    assert capsys.readouterr().out.startswith("OK ")


def test_check_malformed_profile_is_one_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "rpi5.toml"
    bad.write_text((PROFILES_DIR / "rpi5.toml").read_text(encoding="utf-8")
                   .replace('"dotprod"', '"dotprd"'), encoding="utf-8")
    assert main(["profiles", "--check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"edge-compress: error: {bad}: key 'cpu.features[1]': unknown value")


def test_evaluate_reference_model(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(MODELS / "digits_cnn.onnx"), "--data",
                 str(MODELS / "digits_data.npz"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] >= 95.0
    assert result["samples"] == 540
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p99"]


def test_evaluate_bad_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.npz"
    assert main(["evaluate", str(MODELS / "digits_cnn.onnx"), "--data", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"edge-compress: error: {missing}: no such file; pass an existing .npz data file.\n")


def test_evaluate_a_two_input_model_by_its_own_measure(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(MODELS / "text_encoder.onnx"), "--data",
                 str(MODELS / "text_encoder_data.npz"), "--metric",
                 "sentence_embedding=embedding", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sentence_embedding embedding"] >= 95.0  # 1-NN topic accuracy
    assert result["accuracy"] == result["sentence_embedding embedding"]
    assert result["samples"] == 512

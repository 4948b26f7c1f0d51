"""The compressor's composite report on real onnxruntime members."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bundle.composite import composite_from_obj
from compressor.cli import main
from compressor.composite import composite_report
from compressor.runner import open_runner

ROOT = Path(__file__).resolve().parents[2]


def test_report_on_two_copies_of_the_digits_cnn() -> None:
    data = np.load(ROOT / "models" / "digits_data.npz")
    model = ROOT / "models" / "digits_cnn.onnx"
    members = {"cnn": open_runner(model), "same": open_runner(model)}
    report = composite_report(members, {"input": data["eval_x"]}, data["eval_y"], "logits",
                              timed_rows=20)
    cnn = report.members["cnn"]
    assert 97.0 < cnn.accuracy < 99.0
    # Identical members: the ensemble and the cascade answer as one member does, and the
    # cascade needs the "expensive" copy for no request to match its accuracy.
    assert report.ensemble.accuracy == cnn.accuracy
    assert report.cascade.accuracy == cnn.accuracy
    assert report.expensive_share == 0.0
    assert report.target_accuracy == cnn.accuracy
    assert report.to_json()["cascade"]["mean_ms"] > 0


def test_command_line_report_and_declaration(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    model = ROOT / "models" / "digits_cnn.onnx"
    copy = tmp_path / "again.onnx"
    copy.write_bytes(model.read_bytes())
    data = str(ROOT / "models" / "digits_data.npz")
    common = [str(model), str(copy), "--data", data, "--output", "logits", "--timed-rows", "5"]
    assert main(["composite", *common]) == 0
    assert "cascade threshold 0.0000: 0.0% of requests" in capsys.readouterr().out
    assert main(["composite", *common, "--declare", "cascade"]) == 0
    decl = composite_from_obj(json.loads(capsys.readouterr().out))
    assert decl.members == ("artifacts/digits_cnn.onnx", "artifacts/again.onnx")
    assert decl.threshold == 0.0
    assert main(["composite", str(model), "--data", data, "--output", "logits"]) == 1

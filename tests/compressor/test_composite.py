"""The compressor's composite report on real onnxruntime members."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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

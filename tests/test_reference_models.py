"""The committed reference models and data are what docs/models.md says they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.metrics import Metric
from compressor.runner import open_runner

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_data_file_arrays() -> None:
    with np.load(MODELS / "digits_data.npz") as data:
        assert sorted(data.files) == ["calib_x", "eval_x", "eval_y"]
        assert data["calib_x"].shape == (189, 1, 8, 8)
        assert data["eval_x"].shape == (540, 1, 8, 8)
        assert data["eval_x"].dtype == np.float32
        assert data["eval_x"].min() >= 0.0
        assert data["eval_x"].max() <= 1.0
        assert sorted(set(data["eval_y"].tolist())) == list(range(10))


def test_onnx_and_tflite_agree_and_are_accurate() -> None:
    with np.load(MODELS / "digits_data.npz") as data:
        x, y = data["eval_x"], data["eval_y"]
    onnx_out, tflite_out = (next(iter(open_runner(MODELS / m).run({"input": x}).values()))
                            for m in ("digits_cnn.onnx", "digits_cnn.tflite"))
    top1 = Metric("top1")
    assert top1.score(onnx_out, y, labelled=True)[0] >= 95.0
    assert top1.score(tflite_out, y, labelled=True)[0] >= 95.0
    assert top1.score(tflite_out, onnx_out, labelled=False)[0] >= 99.0
    assert float(np.max(np.abs(tflite_out - onnx_out))) < 1e-3

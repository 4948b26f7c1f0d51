"""The committed reference models and data are what docs/models.md says they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compressor.evaluate import accuracy, agreement, load_eval_data, open_runner, predict

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
    data = load_eval_data(MODELS / "digits_data.npz")
    assert data.y is not None
    onnx_out = predict(open_runner(MODELS / "digits_cnn.onnx"), data.x)
    tflite_out = predict(open_runner(MODELS / "digits_cnn.tflite"), data.x)
    assert accuracy(onnx_out, data.y) >= 95.0
    assert accuracy(tflite_out, data.y) >= 95.0
    same = agreement(tflite_out, onnx_out)
    assert same.top1 >= 0.99
    assert same.max_abs_diff < 1e-3

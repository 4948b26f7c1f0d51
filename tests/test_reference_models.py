"""The committed reference models and data are what docs/models.md says they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.dataset import bind, load_dataset
from compressor.evaluate import run_dataset
from compressor.job import resolve_labels
from compressor.metrics import Metric, parse_metric
from compressor.runner import open_runner, read_signature

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


@pytest.mark.parametrize(("model", "data", "metric", "floor"), [
    ("text_encoder.onnx", "text_encoder_data.npz", "embedding", 95.0),
    ("crnn.onnx", "crnn_data.npz", "ctc", 70.0),
    ("vad.onnx", "vad_data.npz", "iou:0.5", 90.0),
])
def test_the_realistic_models_are_as_good_as_docs_say(model: str, data: str, metric: str,
                                                      floor: float) -> None:
    """Each committed model scores at least ``floor`` on its own labelled evaluation data,
    run as the compressor runs it (several inputs, dynamic widths, carried state)."""
    signature = read_signature(MODELS / model)
    evaluation = load_dataset(MODELS / data, "eval")
    calibration = load_dataset(MODELS / data, "calib")
    assert evaluation is not None
    assert calibration is not None
    binding = bind(signature, evaluation)
    bind(signature, calibration, binding.state, infer_state=False)
    outputs = run_dataset(open_runner(MODELS / model), binding, evaluation)
    (name, labels), = resolve_labels(evaluation, binding, {
        o.name: Metric("none") if o.name in {p.output for p in binding.state}
        else parse_metric(metric)[1] for o in signature.outputs}).items()
    score, _ = parse_metric(metric)[1].score(outputs[name], labels, labelled=True)
    assert score >= floor
    assert (MODELS / model).stat().st_size < 4 * 2**20  # committed files stay small


def test_the_recogniser_takes_any_width_and_the_detector_carries_state() -> None:
    crnn = read_signature(MODELS / "crnn.onnx")
    assert isinstance(crnn.inputs[0].shape[3], str)  # a dynamic width
    with np.load(MODELS / "crnn_data.npz") as data:
        assert data["calib_x/image"].shape[3] != data["eval_x/image"].shape[3]
    vad = read_signature(MODELS / "vad.onnx")
    dataset = load_dataset(MODELS / "vad_data.npz", "eval")
    assert dataset is not None
    assert [(p.output, p.input) for p in bind(vad, dataset).state] == [("stateN", "state")]
    encoder = read_signature(MODELS / "text_encoder.onnx")
    assert [(i.name, i.dtype) for i in encoder.inputs] == [("input_ids", "int64"),
                                                           ("attention_mask", "int64")]

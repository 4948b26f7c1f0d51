"""compressor.evaluate: the pure measurements, and the runners on real runtimes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.evaluate import (
    DatasetError,
    ModelLoadError,
    accuracy,
    agreement,
    load_eval_data,
    measure_latency,
    open_runner,
    predict,
    quantize,
    summarize_latency,
)

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_accuracy_counts_argmax_hits() -> None:
    outputs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(outputs, np.array([0, 1, 1, 1])) == 75.0


def test_accuracy_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 outputs for 2 labels"):
        accuracy(np.zeros((3, 2)), np.zeros(2))


def test_agreement_identical_and_scaled() -> None:
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]])
    same = agreement(ref, ref)
    assert same.top1 == 1.0
    assert same.cosine_mean == pytest.approx(1.0)
    assert same.max_abs_diff == 0.0
    flipped = agreement(ref[:, ::-1], ref)
    assert flipped.top1 == 0.0
    assert flipped.cosine_mean < 0.8
    assert flipped.max_abs_diff == 3.0


def test_agreement_zero_vectors_count_as_agreeing() -> None:
    zeros = np.zeros((2, 3))
    assert agreement(zeros, zeros).cosine_mean == 1.0


def test_summarize_latency_percentiles_in_ms() -> None:
    stats = summarize_latency([0.001] * 98 + [0.010, 0.020])
    assert stats.p50_ms == pytest.approx(1.0)
    assert stats.p99_ms > 9.0
    assert stats.iterations == 100
    with pytest.raises(ValueError, match="no latency samples"):
        summarize_latency([])


def test_load_eval_data_named_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, eval_x=np.zeros((4, 3), np.float32), eval_y=np.arange(4))
    data = load_eval_data(path)
    assert data.x.shape == (4, 3)
    assert data.y is not None
    assert list(data.y) == [0, 1, 2, 3]


def test_load_eval_data_unlabelled_fallback_names(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 3), np.float32))
    assert load_eval_data(path).y is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"inputs": np.zeros(3)}, "no 'eval_x'"),
        ({"eval_x": np.zeros((4, 2)), "eval_y": np.zeros(3)}, "one class index per input"),
    ],
)
def test_load_eval_data_bad_content(tmp_path: Path, arrays: dict[str, np.ndarray],
                                    message: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match=message):
        load_eval_data(path)


def test_load_eval_data_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        load_eval_data(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_eval_data(tmp_path / "missing.npz")


def test_open_runner_rejects_unknown_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model format '\.pt'"):
        open_runner(tmp_path / "m.pt")
    with pytest.raises(ModelLoadError, match="no such model file"):
        open_runner(tmp_path / "m.onnx")
    for name in ("m.onnx", "m.tflite"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ModelLoadError, match="cannot load it"):
            open_runner(tmp_path / name)


@pytest.mark.parametrize("model", ["digits_cnn.onnx", "digits_cnn.tflite"])
def test_runners_on_reference_model(model: str) -> None:
    data = load_eval_data(MODELS / "digits_data.npz")
    assert data.y is not None
    runner = open_runner(MODELS / model)
    outputs = predict(runner, data.x, batch_size=50)
    assert outputs.shape == (len(data.x), 10)
    assert accuracy(outputs, data.y) >= 95.0
    latency = measure_latency(runner, data.x[:1], warmup=2, iterations=10)
    assert 0 < latency.p50_ms <= latency.p99_ms


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.0, 0.25, 0.75, 1.0, -1.0, 100.0, -100.0], np.float32)
    # scale 0.5, zero point 3: x / 0.5 = 0, 0.5, 1.5, 2, -2, 200, -200 -> ties to even, + 3.
    q = quantize(x, 0.5, 3, "int8")
    assert q.dtype == np.int8
    assert q.tolist() == [3, 3, 5, 5, 1, 127, -128]
    assert quantize(x, 0.5, 3, "uint8").tolist() == [3, 3, 5, 5, 1, 203, 0]
    with pytest.raises(ValueError, match="cannot quantize to float32"):
        quantize(x, 0.5, 0, "float32")

"""compressor.runner: signatures and named-I/O runners on real onnxruntime and LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.runner import (
    ModelLoadError,
    ModelRunError,
    TensorInfo,
    open_runner,
    quantize,
    read_signature,
)
from tests.compressor.onnx_models import stateful_model, two_input_model

MODELS = Path(__file__).resolve().parents[2] / "models"


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
def test_signature_of_both_formats(model: str) -> None:
    signature = read_signature(MODELS / model)
    (inp,), (out,) = signature.inputs, signature.outputs
    assert (inp.name, inp.dtype, inp.shape[1:]) == ("input", "float32", (1, 8, 8))
    assert out.shape[1:] == (10,)  # named "Identity" in the committed .tflite
    assert inp.fixed_batch is None  # dynamic batch in both
    assert open_runner(MODELS / model).signature.inputs[0].name == "input"


@pytest.mark.parametrize("model", ["digits_cnn.onnx", "digits_cnn.tflite"])
def test_runners_take_and_return_named_tensors(model: str) -> None:
    with np.load(MODELS / "digits_data.npz") as data:
        x = data["eval_x"][:5]
    runner = open_runner(MODELS / model)
    outputs = runner.run({"input": x})
    assert list(outputs) == [runner.signature.outputs[0].name]
    assert next(iter(outputs.values())).shape == (5, 10)


def test_multi_input_int64_and_scalar_inputs(tmp_path: Path) -> None:
    encoder = open_runner(two_input_model(tmp_path / "enc.onnx"))
    assert [(i.name, i.dtype) for i in encoder.signature.inputs] == [("ids", "int64"),
                                                                      ("mask", "int64")]
    ids = np.array([[1, 2, 3], [4, 5, 0]], np.int64)
    full = encoder.run({"ids": ids, "mask": np.ones_like(ids)})["embedding"]
    masked = encoder.run({"ids": ids, "mask": np.array([[1, 1, 1], [1, 1, 0]])})["embedding"]
    np.testing.assert_allclose(full[0], masked[0])
    assert not np.allclose(full[1], masked[1])
    step = open_runner(stateful_model(tmp_path / "rnn.onnx"))
    assert step.signature.input("gain") == TensorInfo("gain", "float32", ())
    out = step.run({"x": np.ones((1, 3), np.float32), "h": np.zeros((1, 4), np.float32),
                    "gain": np.array(2.0, np.float32)})
    assert set(out) == {"y", "hn"}


def test_run_errors_are_translated(tmp_path: Path) -> None:
    runner = open_runner(two_input_model(tmp_path / "enc.onnx"))
    with pytest.raises(ModelRunError, match=r"enc\.onnx: onnxruntime failed running it"):
        runner.run({"ids": np.zeros((1, 3), np.float32), "mask": np.ones((1, 3), np.int64)})


def test_output_batch_axis_follows_the_symbolic_batch() -> None:
    signature = read_signature(MODELS / "digits_cnn.onnx")
    time_major = TensorInfo("seq", "float32", (7, signature.inputs[0].shape[0], 10))
    assert signature.output_batch_axis(time_major) == 1
    assert signature.output_batch_axis(signature.outputs[0]) == 0


def test_quantize_rounds_half_to_even_and_saturates() -> None:
    x = np.array([0.0, 0.25, 0.75, 1.0, -1.0, 100.0, -100.0], np.float32)
    # scale 0.5, zero point 3: x / 0.5 = 0, 0.5, 1.5, 2, -2, 200, -200 -> ties to even, + 3.
    q = quantize(x, 0.5, 3, "int8")
    assert q.dtype == np.int8
    assert q.tolist() == [3, 3, 5, 5, 1, 127, -128]
    assert quantize(x, 0.5, 3, "uint8").tolist() == [3, 3, 5, 5, 1, 203, 0]
    with pytest.raises(ValueError, match="cannot quantize to float32"):
        quantize(x, 0.5, 0, "float32")

"""compressor.evaluate: running bound datasets (batches, fixed batch, sequences) and timing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from compressor.dataset import Dataset, StatePair, bind
from compressor.evaluate import (
    calibration_calls,
    first_call,
    measure_latency,
    measure_latency_interleaved,
    run_dataset,
    summarize_latency,
)
from compressor.runner import ModelRunError, ModelRunner, open_runner
from tests.compressor.onnx_models import fixed_batch_model, stateful_model, two_input_model

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_fixed_batch_model_is_fed_its_own_batch_and_padding_is_dropped(tmp_path: Path) -> None:
    runner = open_runner(fixed_batch_model(tmp_path / "fixed.onnx", batch=4))
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)  # 4 + 4 + 2 rows
    data = Dataset("test", {"x": x})
    binding = bind(runner.signature, data)
    outputs = run_dataset(runner, binding, data)
    assert outputs["y"].shape == (10, 3)
    expected = np.concatenate([runner.run({"x": x[i:i + 4]})["y"] for i in (0, 4)])
    np.testing.assert_allclose(outputs["y"][:8], expected, rtol=1e-6)
    calls = calibration_calls(runner, binding, data, limit=2)
    assert [c["x"].shape for c in calls] == [(4, 6), (4, 6)]
    assert first_call(binding, data)["x"].shape == (4, 6)


def test_multi_input_batches_match_single_calls(tmp_path: Path) -> None:
    runner = open_runner(two_input_model(tmp_path / "enc.onnx"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(70, 5)).astype(np.int64)  # two chunks: 64 + 6
    mask = (rng.random((70, 5)) > 0.3).astype(np.int64)
    data = Dataset("test", {"ids": ids, "mask": mask})
    outputs = run_dataset(runner, bind(runner.signature, data), data)
    one = runner.run({"ids": ids[66:67], "mask": mask[66:67]})["embedding"]
    np.testing.assert_allclose(outputs["embedding"][66:67], one, rtol=1e-5)
    assert outputs["embedding"].shape == (70, 4)


def test_sequences_carry_state_from_call_to_call(tmp_path: Path) -> None:
    runner = open_runner(stateful_model(tmp_path / "rnn.onnx"))
    x = np.ones((2, 3, 1, 3), np.float32)  # 2 sequences of 3 steps of [1, 3]
    x[1] *= 2
    data = Dataset("test", {"x": x}, constants={"gain": np.array(1.0, np.float32)})
    binding = bind(runner.signature, data)
    assert binding.state == (StatePair("hn", "h"),)  # inferred: hn starts with h
    outputs = run_dataset(runner, binding, data)
    assert outputs["y"].shape == (6, 1, 1)
    # x @ W sums to 6.6 for a row of ones; h' = 0.5 h + xw, so sum(h) = 6.6, 9.9, 11.55.
    np.testing.assert_allclose(outputs["y"][:3, 0, 0], [6.6, 9.9, 11.55], rtol=1e-5)
    np.testing.assert_allclose(outputs["y"][3:, 0, 0], [13.2, 19.8, 23.1], rtol=1e-5)
    calls = calibration_calls(runner, binding, data, limit=4)
    assert len(calls) == 4
    np.testing.assert_allclose(calls[1]["h"], outputs["hn"][0], rtol=1e-6)  # carried
    assert np.all(calls[3]["h"] == 0)  # a new sequence starts from the initial state


def test_a_dynamic_batch_the_graph_cannot_take_falls_back_to_one_per_call(
        tmp_path: Path) -> None:
    # Declared [batch, 4] but reshaped to [1, 4] inside, as some exports do.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])
    onnx.save(helper.make_model(graph), str(tmp_path / "one.onnx"))
    runner = open_runner(tmp_path / "one.onnx")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = Dataset("test", {"x": x})
    outputs = run_dataset(runner, bind(runner.signature, data), data)
    np.testing.assert_array_equal(outputs["y"], x)


class _Failing:
    """A runner whose every call fails, with the signature of ``inner``."""

    def __init__(self, inner: ModelRunner) -> None:
        self.signature = inner.signature
        self.calls: list[int] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(len(next(iter(feeds.values()))))
        raise ModelRunError("broken")


@pytest.mark.parametrize(("fixed", "expected_calls"), [(True, [4]), (False, [10, 1])])
def test_a_failure_is_retried_one_sample_per_call_only_for_dynamic_batches(
        tmp_path: Path, fixed: bool, expected_calls: list[int]) -> None:
    model = (fixed_batch_model(tmp_path / "m.onnx", batch=4) if fixed
             else fixed_batch_model(tmp_path / "m.onnx", batch=0))
    failing = _Failing(open_runner(model))
    data = Dataset("test", {"x": np.ones((10, 6), np.float32)})
    with pytest.raises(ModelRunError, match="broken"):
        run_dataset(failing, bind(failing.signature, data), data)
    assert failing.calls == expected_calls


def test_summarize_latency_percentiles_in_ms() -> None:
    stats = summarize_latency([0.001] * 98 + [0.010, 0.020])
    assert stats.p50_ms == pytest.approx(1.0)
    assert stats.p99_ms > 9.0
    assert stats.iterations == 100
    with pytest.raises(ValueError, match="no latency samples"):
        summarize_latency([])


def test_slow_models_get_fewer_timed_calls_within_the_budget(tmp_path: Path) -> None:
    runner = open_runner(MODELS / "digits_cnn.onnx")
    with np.load(MODELS / "digits_data.npz") as data:
        feeds = {"input": data["eval_x"][:1]}
    # A budget far below one call's time: the floor of 3 calls a round.
    stats = measure_latency_interleaved({"a": runner}, feeds, rounds=2, iterations=50,
                                        budget_s=1e-9)
    assert stats["a"].iterations == 6
    stats = measure_latency_interleaved({"a": runner}, feeds, rounds=2, iterations=50,
                                        budget_s=100.0)
    assert stats["a"].iterations == 100


def test_measure_latency_on_the_reference_model() -> None:
    runner = open_runner(MODELS / "digits_cnn.onnx")
    with np.load(MODELS / "digits_data.npz") as data:
        feeds = {"input": data["eval_x"][:1]}
    latency = measure_latency(runner, feeds, warmup=2, iterations=10)
    assert 0 < latency.p50_ms <= latency.p99_ms
    assert latency.iterations == 10

"""Each compression pass alone, on the real digits model and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.evaluate import accuracy, load_eval_data, open_runner, predict
from compressor.passes import (
    ConvertFp16,
    MagnitudePrune,
    OptimizeGraph,
    PassContext,
    PassError,
    PruneChannels,
    QuantizeDynamic,
    QuantizeStatic,
)
from compressor.passes.channel_prune import unit_scores
from compressor.passes.prune import prune_array

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "digits_cnn.onnx"
DATA = load_eval_data(MODELS / "digits_data.npz")


@pytest.fixture
def ctx(tmp_path: Path) -> PassContext:
    with np.load(MODELS / "digits_data.npz") as data:
        calib = data["calib_x"][:64]
    return PassContext(workdir=tmp_path, input_name="input", calibration=calib)


def outputs(model: Path) -> np.ndarray:
    return predict(open_runner(model), DATA.x)


def ops(model: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(model)).graph.node}


def test_optimize_keeps_outputs(ctx: PassContext) -> None:
    result = OptimizeGraph().run(MODEL, ctx)
    assert result.model.is_file()
    np.testing.assert_allclose(outputs(result.model), outputs(MODEL), atol=1e-5)
    assert result.notes[0].startswith("graph nodes ")


def test_optimize_reports_unloadable_model(ctx: PassContext, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nonsense")
    with pytest.raises(PassError, match="cannot load it for optimisation"):
        OptimizeGraph().run(bad, ctx)


def test_dynamic_quantization(ctx: PassContext) -> None:
    result = QuantizeDynamic().run(MODEL, ctx)
    assert result.modified
    assert "DynamicQuantizeLinear" in ops(result.model)
    assert result.model.stat().st_size < MODEL.stat().st_size / 3
    assert DATA.y is not None
    assert accuracy(outputs(result.model), DATA.y) >= 95.0
    assert "reduce_range=False" in result.notes


def test_static_qdq_quantization_and_reduce_range(ctx: PassContext) -> None:
    from dataclasses import replace

    result = QuantizeStatic(method="percentile").run(MODEL, replace(ctx, fast_int8=False))
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(result.model)
    assert "reduce_range=True" in result.notes
    assert "calibration=percentile on 64 samples" in result.notes
    assert DATA.y is not None
    assert accuracy(outputs(result.model), DATA.y) >= 95.0


def test_static_quantization_keeps_excluded_nodes_in_float(ctx: PassContext) -> None:
    graph = onnx.load(str(MODEL)).graph
    first_conv = next(n.name for n in graph.node if n.op_type == "Conv")
    result = QuantizeStatic(exclude=(first_conv,)).run(MODEL, ctx)
    quantized = onnx.load(str(result.model)).graph
    producers = {out: n.op_type for n in quantized.node for out in n.output}
    node = next(n for n in quantized.node if n.name == first_conv)
    # A quantized Conv reads its weight through DequantizeLinear; a float one reads it directly.
    assert producers.get(node.input[1]) != "DequantizeLinear"
    assert f"kept in float: {first_conv}" in result.notes


@pytest.mark.parametrize(("calibration", "message"),
                         [(None, "needs calibration data"),
                          (np.zeros((0, 1, 8, 8), np.float32), "needs calibration data")])
def test_static_quantization_needs_calibration(ctx: PassContext, calibration: np.ndarray | None,
                                               message: str) -> None:
    from dataclasses import replace

    with pytest.raises(PassError, match=message):
        QuantizeStatic().run(MODEL, replace(ctx, calibration=calibration))
    with pytest.raises(PassError, match="unknown calibration method 'mse'"):
        QuantizeStatic(method="mse").run(MODEL, ctx)


def test_fp16_keeps_io_float32(ctx: PassContext) -> None:
    result = ConvertFp16().run(MODEL, ctx)
    proto = onnx.load(str(result.model))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    assert result.model.stat().st_size < MODEL.stat().st_size * 0.6
    np.testing.assert_allclose(outputs(result.model), outputs(MODEL), atol=0.05)


def test_prune_array_exact_sparsity() -> None:
    weights = np.arange(1, 101, dtype=np.float32).reshape(10, 10) * np.where(
        np.arange(100).reshape(10, 10) % 2, 1, -1)
    pruned = prune_array(weights, 0.3)
    assert np.count_nonzero(pruned == 0) == 30
    assert np.all(np.abs(pruned[pruned != 0]) > 30)
    with pytest.raises(PassError, match=r"sparsity must be in \[0, 1\)"):
        prune_array(weights, 1.0)


def test_magnitude_pruning_zeros_weights_and_model_still_works(ctx: PassContext) -> None:
    result = MagnitudePrune(sparsity=0.5).run(MODEL, ctx)
    proto = onnx.load(str(result.model))
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith(
        "weight")]
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    assert zeros / sum(w.size for w in weights) == pytest.approx(0.5, abs=0.01)
    assert result.notes[0].startswith("sparsity 50.0% over 4 weight tensors")
    assert DATA.y is not None
    assert accuracy(outputs(result.model), DATA.y) >= 90.0


def test_unit_scores_rank_by_signal_through_each_unit() -> None:
    w1 = np.array([[1.0, 0.0, 2.0], [1.0, 0.1, 2.0]]).T  # 3 units, 2 inputs each
    w2 = np.array([[1.0], [5.0], [0.4]])  # scores: 2 * 1, 0.1 * 5, 4 * 0.4
    assert list(np.argsort(unit_scores(w1, w2))) == [1, 2, 0]


def test_channel_pruning_really_removes_conv_channels(ctx: PassContext) -> None:
    result = PruneChannels(ratio=0.5).run(MODEL, ctx)
    assert result.notes == ("removed 8 of 16 hidden units/channels in 1 layer pairs",)
    graph = onnx.load(str(result.model)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert weights[convs[0].input[1]].shape == (8, 1, 3, 3)
    assert weights[convs[0].input[2]].shape == (8,)
    assert weights[convs[1].input[1]].shape == (32, 8, 3, 3)
    assert DATA.y is not None
    assert accuracy(outputs(result.model), DATA.y) >= 90.0


def test_channel_pruning_needs_a_pair_and_a_sane_ratio(ctx: PassContext, tmp_path: Path) -> None:
    with pytest.raises(PassError, match=r"ratio must be in \(0, 1\)"):
        PruneChannels(ratio=1.0).run(MODEL, ctx)
    single = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")]))
    path = tmp_path / "single.onnx"
    onnx.save(single, str(path))
    with pytest.raises(PassError, match="no prunable layer pairs"):
        PruneChannels().run(path, ctx)


def test_channel_pruning_through_a_gelu_dag(ctx: PassContext, tmp_path: Path) -> None:
    # MatMul -> Add(bias) -> GELU as exported (x * 0.5 * (1 + erf(x / sqrt2))) -> MatMul
    h = onnx.helper
    rng = np.random.default_rng(0)
    consts = {"w1": rng.normal(size=(4, 8)), "b1": rng.normal(size=8), "w2": rng.normal(
        size=(8, 3)), "s2": np.array(1.4142135), "one": np.array(1.0), "half": np.array(0.5)}
    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]), h.make_node("Add", ["a", "b1"], ["z"]),
             h.make_node("Div", ["z", "s2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
             h.make_node("Add", ["e", "one"], ["f"]), h.make_node("Mul", ["z", "f"], ["g"]),
             h.make_node("Mul", ["g", "half"], ["act"]), h.make_node("MatMul", ["act", "w2"],
                                                                      ["y"])]
    model = h.make_model(h.make_graph(
        nodes, "ffn", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()]))
    path = tmp_path / "ffn.onnx"
    onnx.save(model, str(path))
    result = PruneChannels(ratio=0.25).run(path, ctx)
    graph = onnx.load(str(result.model)).graph
    pruned = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert pruned["w1"].shape == (4, 6)
    assert pruned["b1"].shape == (6,)
    assert pruned["w2"].shape == (6, 3)
    out = open_runner(result.model).run(np.ones((2, 4), np.float32))
    assert out.shape == (2, 3)

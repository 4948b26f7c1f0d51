"""Each compression pass alone, on the real digits model and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.dataset import load_dataset
from compressor.passes import (
    ConvertFp16,
    MagnitudePrune,
    ModelPass,
    OptimizeGraph,
    PassContext,
    PassError,
    PassResult,
    PostconditionError,
    PreconditionError,
    PruneChannels,
    QuantizeDynamic,
    QuantizeStatic,
    UpgradeOpset,
)
from compressor.passes.channel_prune import unit_scores
from compressor.passes.prune import prune_array
from compressor.runner import open_runner
from tests.compressor.onnx_models import old_opset_mlp

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "digits_cnn.onnx"
with np.load(MODELS / "digits_data.npz") as _data:
    EVAL_X, EVAL_Y = _data["eval_x"], _data["eval_y"]


@pytest.fixture
def ctx(tmp_path: Path) -> PassContext:
    calib = load_dataset(MODELS / "digits_data.npz", "calib")
    assert calib is not None
    calls = [{"input": x[None]} for x in calib.inputs[""][:64]]
    return PassContext(workdir=tmp_path, calibration=calls)


def outputs(model: Path) -> np.ndarray:
    return open_runner(model).run({"input": EVAL_X})["logits"]


def accuracy(model: Path) -> float:
    return float(np.mean(np.argmax(outputs(model), axis=1) == EVAL_Y) * 100)


def ops(model: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(model)).graph.node}


def test_optimize_keeps_outputs(ctx: PassContext) -> None:
    result = OptimizeGraph()(MODEL, ctx)
    assert result.model.is_file()
    np.testing.assert_allclose(outputs(result.model), outputs(MODEL), atol=1e-5)
    assert result.notes[0].startswith("graph nodes ")


def test_optimize_reports_unloadable_model(ctx: PassContext, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nonsense")
    with pytest.raises(PreconditionError, match="not a readable ONNX model"):
        OptimizeGraph()(bad, ctx)


def test_optimize_says_which_step_did_what(ctx: PassContext) -> None:
    assert "shapes: symbolic shape inference (auto_merge)" in OptimizeGraph()(MODEL, ctx).notes


def test_optimize_falls_back_step_by_step(ctx: PassContext, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # An op from a domain nothing here knows: symbolic shape inference and onnxruntime fail
    # on it, ONNX shape inference skips it; the pass still prepares what it can, and says so.
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Relu", ["x"], ["r"]), h.make_node("Foo", ["r"], ["y"],
                                                        domain="com.example")], "custom",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    path = tmp_path / "custom.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17),
                                                 h.make_opsetid("com.example", 1)]), str(path))
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    monkeypatch.chdir(user_dir)
    notes = OptimizeGraph()(path, ctx).notes
    assert list(user_dir.iterdir()) == []  # onnxruntime's partial-model dump stays in scratch
    assert notes[1] == ("shapes: ONNX shape inference (symbolic shape inference failed: "
                        "Incomplete symbolic shape inference)")
    assert notes[2].startswith("onnxruntime's offline optimisation failed (")
    assert notes[2].endswith("the graph is used unoptimised")


def test_low_opsets_are_upgraded_for_the_passes_that_need_it(ctx: PassContext,
                                                             tmp_path: Path) -> None:
    old = old_opset_mlp(tmp_path / "old.onnx", opset=9)
    with pytest.raises(PreconditionError, match=r"int8-static needs opset 13 or later, the "
                       r"model has opset 9; upgrade it first \(passes.UpgradeOpset\)"):
        QuantizeStatic()(old, ctx)
    upgraded = UpgradeOpset(13)(old, ctx)
    assert upgraded.modified
    assert upgraded.notes == ("opset 9 -> 13",)
    assert not UpgradeOpset(13)(upgraded.model, ctx).modified
    quantized = QuantizeStatic()(upgraded.model, ctx).model
    agree = np.argmax(outputs(quantized), axis=1) == np.argmax(outputs(old), axis=1)
    assert agree.mean() >= 0.9
    prepared = OptimizeGraph()(old, ctx)  # the preparation lifts opset 9 to 11 itself
    assert prepared.notes[1] == "opset 9 -> 11"


def test_postcondition_catches_a_pass_that_changes_the_interface(ctx: PassContext) -> None:
    class Renames(ModelPass):
        name = "renames"

        def call(self, model: Path, c: PassContext) -> PassResult:
            proto = onnx.load(str(model))
            proto.graph.output[0].name = "other"
            proto.graph.node[-1].output[0] = "other"
            out = c.workdir / "renamed.onnx"
            onnx.save(proto, str(out))
            return PassResult(out, modified=True)

    with pytest.raises(PostconditionError, match="renames changed the model's outputs"):
        Renames()(MODEL, ctx)


def test_passes_declare_what_the_pipeline_asks(ctx: PassContext) -> None:
    assert (QuantizeDynamic().dtype, QuantizeStatic().dtype, ConvertFp16().dtype) == (
        "int8", "int8", "fp16")
    assert QuantizeDynamic().fallbacks(MODEL) == ()
    weights = [n.name for n in onnx.load(str(MODEL)).graph.node
               if n.op_type in {"Conv", "Gemm", "MatMul"}]
    fallbacks = QuantizeStatic().fallbacks(MODEL)
    # Four weight layers: keeping two at each end would keep everything in float.
    assert [f.exclude for f in fallbacks] == [  # type: ignore[attr-defined]
        (weights[0], weights[-1])]


def test_dynamic_quantization(ctx: PassContext) -> None:
    result = QuantizeDynamic()(MODEL, ctx)
    assert result.modified
    assert "DynamicQuantizeLinear" in ops(result.model)
    assert result.model.stat().st_size < MODEL.stat().st_size / 3
    assert accuracy(result.model) >= 95.0
    assert "reduce_range=False" in result.notes


def test_static_qdq_quantization_and_reduce_range(ctx: PassContext) -> None:
    from dataclasses import replace

    result = QuantizeStatic(method="percentile")(MODEL, replace(ctx, fast_int8=False))
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(result.model)
    assert "reduce_range=True" in result.notes
    assert "calibration=percentile on 64 calls" in result.notes
    assert accuracy(result.model) >= 95.0


def test_static_quantization_keeps_excluded_nodes_in_float(ctx: PassContext) -> None:
    graph = onnx.load(str(MODEL)).graph
    first_conv = next(n.name for n in graph.node if n.op_type == "Conv")
    result = QuantizeStatic(exclude=(first_conv,))(MODEL, ctx)
    quantized = onnx.load(str(result.model)).graph
    producers = {out: n.op_type for n in quantized.node for out in n.output}
    node = next(n for n in quantized.node if n.name == first_conv)
    # A quantized Conv reads its weight through DequantizeLinear; a float one reads it directly.
    assert producers.get(node.input[1]) != "DequantizeLinear"
    assert f"kept in float: {first_conv}" in result.notes


@pytest.mark.parametrize("calibration", [None, []])
def test_static_quantization_needs_calibration(ctx: PassContext,
                                               calibration: list[dict[str, np.ndarray]] | None,
                                               ) -> None:
    from dataclasses import replace

    with pytest.raises(PreconditionError, match="needs calibration data"):
        QuantizeStatic()(MODEL, replace(ctx, calibration=calibration))
    with pytest.raises(PassError, match="unknown calibration method 'mse'"):
        QuantizeStatic(method="mse")(MODEL, ctx)


def test_fp16_keeps_io_float32(ctx: PassContext) -> None:
    result = ConvertFp16()(MODEL, ctx)
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
    result = MagnitudePrune(sparsity=0.5)(MODEL, ctx)
    proto = onnx.load(str(result.model))
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith(
        "weight")]
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    assert zeros / sum(w.size for w in weights) == pytest.approx(0.5, abs=0.01)
    assert result.notes[0].startswith("sparsity 50.0% over 4 weight tensors")
    assert accuracy(result.model) >= 90.0


def test_unit_scores_rank_by_signal_through_each_unit() -> None:
    w1 = np.array([[1.0, 0.0, 2.0], [1.0, 0.1, 2.0]]).T  # 3 units, 2 inputs each
    w2 = np.array([[1.0], [5.0], [0.4]])  # scores: 2 * 1, 0.1 * 5, 4 * 0.4
    assert list(np.argsort(unit_scores(w1, w2))) == [1, 2, 0]


def test_channel_pruning_really_removes_conv_channels(ctx: PassContext) -> None:
    result = PruneChannels(ratio=0.5)(MODEL, ctx)
    assert result.notes == ("removed 8 of 16 hidden units/channels in 1 layer pairs",)
    graph = onnx.load(str(result.model)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert weights[convs[0].input[1]].shape == (8, 1, 3, 3)
    assert weights[convs[0].input[2]].shape == (8,)
    assert weights[convs[1].input[1]].shape == (32, 8, 3, 3)
    assert accuracy(result.model) >= 90.0


def test_channel_pruning_needs_a_pair_and_a_sane_ratio(ctx: PassContext, tmp_path: Path) -> None:
    with pytest.raises(PassError, match=r"ratio must be in \(0, 1\)"):
        PruneChannels(ratio=1.0)(MODEL, ctx)
    single = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w")]))
    path = tmp_path / "single.onnx"
    onnx.save(single, str(path))
    with pytest.raises(PassError, match="no prunable layer pairs"):
        PruneChannels()(path, ctx)


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
    result = PruneChannels(ratio=0.25)(path, ctx)
    graph = onnx.load(str(result.model)).graph
    pruned = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert pruned["w1"].shape == (4, 6)
    assert pruned["b1"].shape == (6,)
    assert pruned["w2"].shape == (6, 3)
    out = open_runner(result.model).run({"x": np.ones((2, 4), np.float32)})
    assert out["y"].shape == (2, 3)

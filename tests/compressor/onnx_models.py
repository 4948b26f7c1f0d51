"""Tiny ONNX models built in the test process, for shapes the reference models lack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["fixed_batch_model", "old_opset_mlp", "segmentation_model", "stateful_model",
           "two_input_model"]


def _save(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fixed_batch_model(path: Path, batch: int = 4) -> Path:
    """``y = x @ W`` with a batch of exactly ``batch`` rows (as some exports declare); 0 makes
    the batch dynamic."""
    w = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch or "batch", 3])],
        [numpy_helper.from_array(w, "w")])
    return _save(graph, path)


def two_input_model(path: Path) -> Path:
    """Token ids (int64) and a mask in, a pooled embedding out: ``[batch, seq]`` -> ``[batch, 4]``.

    ``emb = sum_t(E[ids[t]] * mask[t]) @ W``: an embedding table gathered by int64 ids, masked
    and summed, then a dense layer, the shape of a transformer encoder's interface.
    """
    rng = np.random.default_rng(1)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["tok"]),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
             helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
             helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["embedding"], name="proj")]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(np.array([2], np.int64), "axis2")])
    return _save(graph, path)


def stateful_model(path: Path) -> Path:
    """One step of a leaky accumulator: ``h' = 0.5 h + x @ W``, ``y = sum(h') * gain``.

    Inputs ``x [1, 3]``, ``h [1, 4]`` (state) and ``gain`` (a scalar constant); outputs
    ``y [1, 1]`` and ``hn [1, 4]``, the next state.
    """
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"], name="in_proj"),
             helper.make_node("Mul", ["h", "half"], ["hh"]),
             helper.make_node("Add", ["hh", "xw"], ["hn"]),
             helper.make_node("ReduceSum", ["hn", "axis1"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "gain"], ["y"])]
    graph = helper.make_graph(
        nodes, "accumulator",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return _save(graph, path)


def old_opset_mlp(path: Path, opset: int = 9) -> Path:
    """The digits' interface (``input [batch, 1, 8, 8]`` -> ``logits [batch, 10]``) as a small
    random MLP saved at an old opset, as old exporters wrote."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                     ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.zeros(32, np.float32), "b1"),
         numpy_helper.from_array(rng.normal(size=(32, 10)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.zeros(10, np.float32), "b2")])
    return _save(graph, path, opset)


def segmentation_model(path: Path, side: int = 16) -> Path:
    """A two-layer convolutional mask predictor: ``image [batch, 1, side, side]`` ->
    ``mask [batch, 1, side, side]`` probabilities (sigmoid), random weights."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1],
                              name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1],
                              name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["mask"])]
    graph = helper.make_graph(
        nodes, "segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, side, side])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, side, side])],
        [numpy_helper.from_array(rng.normal(size=(8, 1, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
         numpy_helper.from_array(rng.normal(size=(1, 8, 3, 3)).astype(np.float32) / 3, "w2"),
         numpy_helper.from_array(np.array([-0.5], np.float32), "b2")])
    return _save(graph, path)

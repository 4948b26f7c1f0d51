"""compressor.dataset: the .npz format (old and new), binding to a model, state inference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressor.dataset import (
    Dataset,
    DatasetError,
    StatePair,
    bind,
    dataset_from_arrays,
    infer_state_pairs,
    load_dataset,
    parse_state_pair,
)
from compressor.runner import Signature, TensorInfo, read_signature
from tests.compressor.onnx_models import stateful_model, two_input_model

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS = read_signature(MODELS / "digits_cnn.onnx")


def test_single_input_format_still_works() -> None:
    data = load_dataset(MODELS / "digits_data.npz", "eval")
    assert data is not None
    assert list(data.inputs) == [""]
    assert list(data.labels) == [""]
    binding = bind(DIGITS, data)
    assert binding.single == "input"
    assert binding.varying(data)["input"].shape == (540, 1, 8, 8)
    calib = load_dataset(MODELS / "digits_data.npz", "calib")
    assert calib is not None
    assert len(calib) == 189
    assert not calib.labels


def test_named_inputs_constants_state_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    arrays: dict[str, Any] = {"eval_x/ids": np.zeros((3, 5), np.int64),
                      "eval_x/mask": np.ones((3, 5), np.int64),
                      "const/rate": np.array(16000, np.int64),
                      "state0/h": np.zeros((1, 4), np.float32),
                      "eval_y/embedding": np.zeros((3, 4)), "eval_y": np.arange(3)}
    np.savez(path, **arrays)
    data = load_dataset(path, "eval")
    assert data is not None
    assert sorted(data.inputs) == ["ids", "mask"]
    assert list(data.constants) == ["rate"]
    assert list(data.initial_state) == ["h"]
    assert sorted(data.labels) == ["", "embedding"]
    assert load_dataset(path, "calib") is None
    assert len(data.head(2)) == 2
    assert len(data.head(2).labels[""]) == 2


@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 25))
def test_head_keeps_inputs_and_labels_aligned(samples: int, labels: int, count: int) -> None:
    arrays = {"eval_x/a": np.zeros((samples, 2)), "eval_x/b": np.zeros((samples,)),
              "eval_y": np.zeros((labels, 3))}
    if samples != labels:
        with pytest.raises(DatasetError, match="disagree on the number of samples"):
            dataset_from_arrays(arrays, "eval", "d.npz")
        return
    data = dataset_from_arrays(arrays, "eval", "d.npz")
    assert data is not None
    head = data.head(count)
    assert len(head) == min(count, samples) or count == 0
    assert {len(v) for v in [*head.inputs.values(), *head.labels.values()]} == {
        min(count, samples)}


@pytest.mark.parametrize(("arrays", "message"), [
    ({"eval_x/ids": np.zeros((2, 5), np.int64)},
     "nothing feeds mask (add eval_x/<name> and calib_x/<name>, const/<name>"),
    ({"eval_x/ids": np.zeros((2, 5), np.int64), "eval_x/mask": np.zeros((2, 5), np.int64),
      "eval_x/extra": np.zeros((2, 5), np.int64)}, "no model input named extra"),
    ({"eval_x/ids": np.zeros((2, 5), np.int32), "eval_x/mask": np.zeros((2, 5), np.int64)},
     "inputs are int32, model input 'ids' expects int64; convert with astype"),
    ({"eval_x/ids": np.zeros((2, 5, 1), np.int64), "eval_x/mask": np.zeros((2, 5), np.int64)},
     "inputs have shape [2, 5, 1] but model input 'ids' expects ['samples', 'any']"),
    ({"eval_x": np.zeros((2, 5), np.int64)},
     "the data is in the single-input format (x / calib_x / eval_x) but the model has 2 "
     "inputs (ids, mask)"),
])
def test_binding_errors_say_what_to_change(tmp_path: Path, arrays: dict[str, np.ndarray],
                                           message: str) -> None:
    signature = read_signature(two_input_model(tmp_path / "enc.onnx"))
    data = dataset_from_arrays(arrays, "eval", "d.npz")
    assert data is not None
    with pytest.raises(DatasetError, match=re.escape(message)):
        bind(signature, data)


def test_state_is_inferred_or_given_and_sequences_are_checked(tmp_path: Path) -> None:
    signature = read_signature(stateful_model(tmp_path / "rnn.onnx"))
    assert infer_state_pairs(signature, {"x", "gain"}) == (StatePair("hn", "h"),)
    assert infer_state_pairs(signature, {"x", "gain", "h"}) == ()  # the data feeds h itself
    gain = {"gain": np.array(1.0, np.float32)}
    sequences = Dataset("d", {"x": np.zeros((2, 5, 1, 3), np.float32)}, constants=gain)
    binding = bind(signature, sequences, [parse_state_pair("hn=h")], infer_state=False)
    assert binding.sequences
    assert binding.initial_state(sequences)["h"].shape == (1, 4)
    flat = Dataset("d", {"x": np.zeros((5, 3), np.float32)}, constants=gain)
    with pytest.raises(DatasetError, match=re.escape(
            "expects ['sequences', 'steps', 1, 3] ([sequences, steps, *one call's shape])")):
        bind(signature, flat)
    with pytest.raises(DatasetError, match="nothing feeds h"):
        bind(signature, sequences, infer_state=False)
    with pytest.raises(DatasetError, match="the model has no output of that name"):
        bind(signature, sequences, [StatePair("nope", "h")])


@pytest.mark.parametrize(("inputs", "outputs", "pairs"), [
    ([("h_in", [1, 8])], [("h_out", [1, 8])], [("h_out", "h_in")]),
    ([("c0", [2, 1, 8])], [("cn", [2, 1, 8])], [("cn", "c0")]),
    ([("state", [2, "b", 128])], [("output", ["b", 1]), ("stateN", [2, "b", 128])],
     [("stateN", "state")]),
    ([("input", ["b", 512])], [("output", ["b", 1])], []),  # names match, shapes do not
])
def test_state_pairs_from_names_and_shapes(inputs: list[tuple[str, list[object]]],
                                           outputs: list[tuple[str, list[object]]],
                                           pairs: list[tuple[str, str]]) -> None:
    def infos(specs: list[tuple[str, list[object]]]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(n, "float32", tuple(s)) for n, s in specs)  # type: ignore[arg-type]

    signature = Signature(infos(inputs), infos(outputs))
    assert [(p.output, p.input) for p in infer_state_pairs(signature, ())] == pairs


@pytest.mark.parametrize("text", ["hn", "=h", "hn="])
def test_state_option_needs_output_equals_input(text: str) -> None:
    with pytest.raises(DatasetError, match="expected OUTPUT=INPUT"):
        parse_state_pair(text)


def test_unreadable_missing_and_oversized_files(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        load_dataset(path, "eval")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.npz", "eval")
    monkeypatch.setattr("compressor.dataset.MAX_DATA_BYTES", 2**20)
    np.savez(path, x=np.zeros((1000, 1000), np.float32))
    with pytest.raises(DatasetError, match="4 MiB of arrays, more than 1 MiB; use fewer samples"):
        load_dataset(path, "eval")

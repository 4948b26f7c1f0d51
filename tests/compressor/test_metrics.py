"""compressor.metrics: each measure on outputs built to a known answer, and the inference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compressor.metrics import Metric, MetricError, infer_metric, judge, parse_metric

RNG = np.random.default_rng(0)


def score(kind: str, outputs: np.ndarray, target: np.ndarray, labelled: bool = False,
          param: float | None = None) -> float:
    return Metric(kind, param).score(outputs, target, labelled)[0]


def test_top1_against_reference_and_labels() -> None:
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    flipped = ref.copy()
    flipped[2] = [0.4, 0.6]
    assert score("top1", ref, ref) == 100.0
    assert score("top1", flipped, ref) == 75.0
    assert score("top1", ref, np.array([0, 1, 1, 1]), labelled=True) == 75.0
    # A call's batch axis of one ([N, 1, C]) is the same classifier.
    assert score("top1", flipped[:, None, :], ref[:, None, :]) == 75.0
    with pytest.raises(MetricError, match="top1 needs one score vector per sample"):
        score("top1", np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))


def test_sequence_agreement_is_per_position() -> None:
    ref = RNG.normal(size=(10, 20, 5))
    candidate = ref.copy()
    candidate[0, :4] = -ref[0, :4]  # four positions of one line change their argmax
    assert score("sequence", ref, ref) == 100.0
    points, details = Metric("sequence").score(candidate, ref, False)
    assert points == pytest.approx(100 * (200 - 4) / 200)
    assert details["sequences_equal"] == pytest.approx(90.0)
    labels = np.argmax(ref, axis=-1)
    labels[:, -5:] = -1  # padding is ignored
    assert score("sequence", ref, labels, labelled=True) == 100.0


def test_ctc_reads_the_same_line() -> None:
    # blank 0; "aab_b" and "ab__b" both read "a b b"... as class ids [1, 2, 2].
    def one_hot(ids: list[int]) -> np.ndarray:
        return np.eye(4)[ids]

    ref = np.stack([one_hot([1, 1, 2, 0, 2]), one_hot([3, 0, 0, 3, 3])])
    same_line = np.stack([one_hot([1, 2, 0, 0, 2]), one_hot([3, 3, 0, 3, 0])])
    other = np.stack([one_hot([1, 2, 2, 2, 2]), one_hot([3, 0, 0, 3, 3])])
    assert score("ctc", same_line, ref) == 100.0  # positions differ, lines do not
    assert score("sequence", same_line, ref) < 100.0
    assert score("ctc", other, ref) == 50.0
    labels = np.array([[1, 2, 2], [3, 3, -1]])
    assert score("ctc", ref, labels, labelled=True) == 100.0


def test_embedding_nearest_neighbours_and_cosine() -> None:
    centres = RNG.normal(size=(10, 32))
    ref = np.repeat(centres, 3, axis=0) + 0.01 * RNG.normal(size=(30, 32))
    noisy = ref + 0.002 * RNG.normal(size=ref.shape)
    points, details = Metric("embedding").score(noisy, ref, False)
    assert points == 100.0
    assert details["cosine_mean"] > 0.999
    shuffled = ref[RNG.permutation(30)]
    assert score("embedding", shuffled, ref) < 50.0
    labels = np.repeat(np.arange(10), 3)
    assert score("embedding", ref, labels, labelled=True) == 100.0
    assert score("cosine", noisy, ref) == pytest.approx(100.0, abs=0.01)
    assert score("cosine", -ref, ref) == pytest.approx(-100.0)


def test_iou_for_masks_and_multi_class_maps() -> None:
    ref = np.zeros((2, 1, 8, 8))
    ref[:, :, 2:6, 2:6] = 0.9  # a 16-pixel square per sample
    shifted = np.zeros_like(ref)
    shifted[:, :, 2:6, 3:7] = 0.9  # overlap 12, union 20
    assert score("iou", ref, ref) == 100.0
    assert score("iou", shifted, ref) == pytest.approx(60.0)
    empty = np.zeros((2, 1, 8, 8))
    assert score("iou", empty, empty) == 100.0
    classes = np.zeros((1, 3, 4, 4))
    classes[0, 1, :2] = 1.0  # class 1 on the top half, class 2 below
    classes[0, 2, 2:] = 1.0
    labels = np.array([[[1] * 4] * 2 + [[2] * 4] * 2])
    assert score("iou", classes, labels, labelled=True) == 100.0
    assert score("iou", ref * 10 - 5, ref * 10 - 5) == 100.0  # logits: threshold 0
    # One probability per call ([N, 1, 1]) against 0/1 labels [N]: frames on the same side.
    probs = np.array([0.9, 0.2, 0.7, 0.4]).reshape(4, 1, 1)
    assert score("iou", probs, np.array([1, 0, 0, 0]), labelled=True, param=0.5) == 75.0


def test_relative_error_with_tolerance() -> None:
    ref = np.linspace(1, 2, 100).reshape(100, 1)
    assert score("relative", ref * 1.01, ref) == 100.0
    assert score("relative", ref * 1.10, ref) == 0.0
    assert score("relative", ref * 1.10, ref, param=0.2) == 100.0
    assert score("exact", np.array([1, 2, 3]), np.array([1, 2, 4])) == pytest.approx(200 / 3)


def test_judge_takes_the_worst_output_and_skips_none() -> None:
    logits = RNG.normal(size=(20, 5))
    state = RNG.normal(size=(20, 8))
    reference = {"logits": logits, "state": state}
    outputs = {"logits": logits, "state": state + 10}
    quality = judge(outputs, reference, {"logits": Metric("top1"), "state": Metric("none")}, {})
    assert quality.drop == 0.0
    assert list(quality.outputs) == ["logits"]
    quality = judge(outputs, reference, {"logits": Metric("top1"),
                                         "state": Metric("relative")}, {})
    assert quality.drop == 100.0
    labels = {"logits": np.argmax(logits, axis=1)}
    labelled = judge({"logits": -logits}, {"logits": logits}, {"logits": Metric("top1")},
                     labels)
    assert labelled.outputs["logits"].reference_score == 100.0
    assert labelled.drop == 100.0
    assert labelled.outputs["logits"].details == {"agreement": 0.0}


@pytest.mark.parametrize(("name", "shape", "dtype", "kind"), [
    ("logits", (10,), "float32", "top1"),
    ("logits", (1, 10), "float32", "top1"),
    ("sentence_embedding", (384,), "float32", "embedding"),
    ("last_hidden_state", (16, 64), "float32", "embedding"),
    ("logits", (40, 37), "float32", "sequence"),
    ("mask", (64, 64), "float32", "iou"),
    ("out", (1, 64, 64), "float32", "iou"),  # [1, H, W]: a one-channel map
    ("seg", (3, 32, 32), "float32", "iou"),
    ("probability", (1,), "float32", "relative"),
    ("boxes", (100, 4), "float32", "relative"),
    ("scores", (100, 4), "float32", "sequence"),
    ("labels", (100,), "int64", "exact"),
])
def test_inference_from_name_shape_and_dtype(name: str, shape: tuple[int, ...], dtype: str,
                                             kind: str) -> None:
    assert infer_metric(name, shape, np.dtype(dtype)).kind == kind


def test_parse_metric_and_a_python_escape_hatch(tmp_path: Path) -> None:
    assert parse_metric("iou:0.3") == ("*", Metric("iou", 0.3))
    assert parse_metric("logits=top1") == ("logits", Metric("top1"))
    file = tmp_path / "mine.py"
    file.write_text("import numpy as np\n"
                    "def agree(outputs, target):\n"
                    "    return float(np.mean(np.sign(outputs) == np.sign(target)) * 100)\n")
    name, metric = parse_metric(f"y=python:{file}:agree")
    assert name == "y"
    assert str(metric) == f"python:{file}:agree"
    assert metric.score(np.array([1.0, -1.0]), np.array([2.0, 3.0]), False)[0] == 50.0
    for text, message in [("bogus", "unknown measure 'bogus'"),
                          ("iou:high", "must be a number"),
                          (f"python:{file}", "expected python:FILE.py:FUNCTION"),
                          (f"python:{file}:missing", "has no function missing"),
                          ("python:/nope.py:f", "no Python file /nope.py")]:
        with pytest.raises(MetricError, match=re.escape(message)):
            parse_metric(text)
    broken = Metric("python", function=lambda a, b: 1 / 0, source="python:x.py:f")
    with pytest.raises(MetricError, match=re.escape("python:x.py:f raised ZeroDivisionError")):
        broken.score(np.zeros(2), np.zeros(2), False)

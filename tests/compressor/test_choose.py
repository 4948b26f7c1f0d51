"""The pure choice rules: accuracy gate, never slower than fp32, smallest then fastest."""

from __future__ import annotations

from compressor.choose import Measured, choose

FP32 = Measured("fp32", "fp32", 4_000_000, 8.0, 9.0, drop=0.0)


def cand(name: str, size: int, p50: float, drop: float = 0.0) -> Measured:
    return Measured(name, "int8", size, p50, p50 * 1.2, drop)


def test_smallest_within_budget_and_faster_wins() -> None:
    dyn = cand("int8-dynamic", 1_000_000, 3.0)
    static = cand("int8-static", 1_020_000, 2.5, drop=0.5)
    decision = choose([FP32, dyn, static], FP32, max_drop=1.0)
    assert decision.chosen is static  # within 10% of the smallest size, and faster
    reasons = {r.name: r.reason for r in decision.rejected}
    assert reasons["int8-dynamic"].startswith("slower than int8-static")
    assert reasons["fp32"].startswith("larger")


def test_over_budget_is_rejected_with_the_numbers() -> None:
    bad = cand("int8-static", 1_000_000, 2.0, drop=2.5)
    decision = choose([bad], FP32, max_drop=1.0)
    assert decision.chosen is FP32
    assert decision.rejected[0].reason == "quality drop 2.50 points is over the budget of 1"


def test_int8_slower_than_fp32_is_never_chosen_silently() -> None:
    slow = cand("int8-dynamic", 1_000_000, 9.5)
    decision = choose([slow], FP32, max_drop=1.0)
    assert decision.chosen is FP32
    assert decision.rejected[0].reason.startswith("slower than fp32: p50 9.500 ms vs 8.000 ms")


def test_latency_within_tolerance_still_counts_as_not_slower() -> None:
    same = cand("int8-dynamic", 1_000_000, 8.3)
    assert choose([same], FP32, max_drop=1.0, latency_tolerance=0.05).chosen is same


def test_clearly_smaller_beats_faster() -> None:
    fp16 = Measured("fp16", "fp16", 2_000_000, 1.0, 1.1, 0.0)
    int8 = cand("int8-dynamic", 1_000_000, 3.0)
    assert choose([fp16, int8], FP32, max_drop=1.0).chosen is int8


def test_the_budget_is_inclusive_and_a_gain_counts_as_no_drop() -> None:
    at_budget = cand("a", 1_000_000, 3.0, drop=1.0)
    better = cand("b", 1_000_000, 2.0, drop=-0.5)  # scores above the reference
    over = cand("c", 1_000_000, 1.0, drop=1.0001)
    decision = choose([at_budget, better, over], FP32, max_drop=1.0)
    assert decision.chosen is better
    reasons = {r.name: r.reason for r in decision.rejected}
    assert reasons["c"] == "quality drop 1.00 points is over the budget of 1"
    assert reasons["a"].startswith("slower than b")


def test_impossible_budget_leaves_only_the_reference() -> None:
    decision = choose([cand("x", 1, 1.0, drop=0.01)], FP32, max_drop=0.0)
    assert decision.chosen is FP32


def test_int8_only_profile_with_unmet_budget_gets_no_artifact() -> None:
    decision = choose([FP32, cand("int8-static", 1_000_000, 2.0, drop=4.0)], FP32,
                      max_drop=1.0, dtypes=("int8",))
    assert decision.chosen is None
    assert [r.name for r in decision.rejected] == ["fp32", "int8-static"]
    assert decision.rejected[0].reason == "fp32 is not among the profile's dtypes (int8)"
    assert "over the budget" in decision.rejected[1].reason


def test_dtype_outside_profile_is_rejected() -> None:
    fp16 = Measured("fp16", "fp16", 2_000_000, 1.0, 1.1, 0.0)
    decision = choose([fp16], FP32, max_drop=1.0, dtypes=("int8", "fp32"))
    assert decision.chosen is FP32
    assert decision.rejected[0].reason.startswith("fp16 is not among")


def tfl(name: str, dtype: str, size: int, p50: float, drop: float = 0.0) -> Measured:
    return Measured(name, dtype, size, p50, p50 * 1.2, drop, format="tflite")


TFL_FP32 = tfl("tflite-fp32", "fp32", 4_000_000, 6.0)


def test_preferred_format_wins_even_when_the_other_is_smaller_and_faster() -> None:
    onnx_int8 = cand("int8-static", 1_000_000, 1.0)
    tfl_int8 = tfl("tflite-int8-dynamic", "int8", 1_100_000, 4.0)
    decision = choose([FP32, onnx_int8, TFL_FP32, tfl_int8], FP32, max_drop=1.0,
                      formats=("tflite", "onnx"), baselines={"tflite": TFL_FP32})
    assert decision.chosen is tfl_int8
    reasons = {r.name: r.reason for r in decision.rejected}
    assert reasons["int8-static"] == ("onnx: the profile prefers tflite (formats tflite, onnx) "
                                      "and tflite-int8-dynamic qualifies")
    assert reasons["tflite-fp32"].startswith("larger")


def test_next_format_when_the_preferred_has_no_qualifying_candidate() -> None:
    lossy = tfl("tflite-fp32", "fp32", 4_000_000, 6.0, drop=4.0)
    decision = choose([FP32, lossy], FP32, max_drop=1.0, formats=("tflite", "onnx"),
                      baselines={"tflite": lossy})
    assert decision.chosen is FP32  # the conversion lost accuracy: ONNX fp32 is the fallback
    assert decision.rejected[0].reason == "quality drop 4.00 points is over the budget of 1"


def test_format_outside_profile_is_rejected() -> None:
    decision = choose([FP32, TFL_FP32], FP32, max_drop=1.0, formats=("onnx",))
    assert decision.chosen is FP32
    assert decision.rejected[0].reason == "tflite is not among the profile's formats (onnx)"


def test_latency_bar_is_the_fp32_of_the_same_format() -> None:
    # 7.0 ms beats ONNX fp32 (8.0) but not tflite-fp32 (6.0): int8 must beat its own runtime.
    slow = tfl("tflite-int8-dynamic", "int8", 1_000_000, 7.0)
    decision = choose([TFL_FP32, slow], FP32, max_drop=1.0, formats=("tflite",),
                      baselines={"tflite": TFL_FP32})
    assert decision.chosen is TFL_FP32
    reasons = {r.name: r.reason for r in decision.rejected}
    assert reasons["tflite-int8-dynamic"] == ("slower than tflite-fp32: p50 7.000 ms vs "
                                              "6.000 ms on this CPU")


def test_profile_without_fp32_keeps_a_slower_candidate_and_says_so() -> None:
    full = tfl("tflite-int8-full", "int8-full", 1_000_000, 7.0)
    decision = choose([FP32, TFL_FP32, full], FP32, max_drop=1.0, dtypes=("int8-full",),
                      formats=("tflite",), baselines={"tflite": TFL_FP32})
    assert decision.chosen is full
    assert decision.notes == ("tflite-int8-full is slower than tflite-fp32 (p50 7.000 ms vs "
                              "6.000 ms on this CPU) but qualifies: the profile runs no fp32 "
                              "artifact",)
    assert {r.name for r in decision.rejected} == {"fp32", "tflite-fp32"}

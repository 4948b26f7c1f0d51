"""Which candidate artifact a profile gets, and why the others lost. Pure.

Rules, in order:

0. **The profile runs it**: a candidate whose dtype is not in the profile's dtypes is
   rejected; the fp32 reference only competes when the profile lists fp32.
1. **Accuracy gate**: a candidate whose accuracy drop against the fp32 reference exceeds the
   budget is rejected. With labels the drop is in top-1 accuracy points; without labels it
   is the share of samples whose top-1 differs from the reference's, in points.
2. **Never slower than fp32**: a candidate whose median latency exceeds the reference's by
   more than the measurement tolerance is rejected (int8 on CPUs without VNNI, fp16 on CPUs).
3. **Smallest, then fastest**: among the rest, those within 10% of the smallest size count as
   equally small, and the fastest of them wins. When nothing is left (say an int8-only
   profile and a budget no int8 candidate meets) there is no artifact, never one over budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SIZE_TIE", "Decision", "Measured", "Rejection", "accuracy_drop", "choose"]

SIZE_TIE = 1.10


@dataclass(frozen=True)
class Measured:
    """One candidate artifact with its measured size, quality and latency."""

    name: str
    dtype: str
    size_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    accuracy: float | None  # top-1 %, when the evaluation data has labels
    agreement: float  # share of samples whose top-1 matches the fp32 reference (0..1)


@dataclass(frozen=True)
class Rejection:
    """A candidate that was not chosen, and the reason in words."""

    name: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """The chosen candidate for one profile (None if none qualifies) and every rejection."""

    chosen: Measured | None
    rejected: tuple[Rejection, ...]


def accuracy_drop(candidate: Measured, reference: Measured) -> float:
    """Points lost against the reference: accuracy when labelled, else top-1 disagreement."""
    if candidate.accuracy is not None and reference.accuracy is not None:
        return reference.accuracy - candidate.accuracy
    return (1.0 - candidate.agreement) * 100.0


def choose(candidates: Sequence[Measured], reference: Measured, max_drop: float,
           dtypes: Sequence[str] = ("fp32", "fp16", "int8"),
           latency_tolerance: float = 0.05) -> Decision:
    """Apply the module's rules for a profile running ``dtypes`` to ``candidates``."""
    rejected: list[Rejection] = []
    eligible: list[Measured] = []
    slowest_allowed = reference.latency_p50_ms * (1.0 + latency_tolerance)
    others = [c for c in candidates if c.name != reference.name]
    for candidate in [reference, *others]:
        drop = accuracy_drop(candidate, reference)
        if candidate.dtype not in dtypes:
            rejected.append(Rejection(candidate.name, f"{candidate.dtype} is not among the "
                                      f"profile's dtypes ({', '.join(dtypes)})"))
        elif candidate is reference:
            eligible.append(candidate)
        elif drop > max_drop:
            rejected.append(Rejection(candidate.name, f"accuracy drop {drop:.2f} points is over "
                                      f"the budget of {max_drop:g}"))
        elif candidate.latency_p50_ms > slowest_allowed:
            rejected.append(Rejection(candidate.name, (
                f"slower than fp32: p50 {candidate.latency_p50_ms:.3f} ms vs "
                f"{reference.latency_p50_ms:.3f} ms on this CPU")))
        else:
            eligible.append(candidate)
    if not eligible:
        return Decision(chosen=None, rejected=tuple(rejected))
    smallest = min(c.size_bytes for c in eligible)
    small = [c for c in eligible if c.size_bytes <= smallest * SIZE_TIE]
    chosen = min(small, key=lambda c: (c.latency_p50_ms, c.size_bytes, c.name))
    for candidate in eligible:
        if candidate is chosen:
            continue
        if candidate.size_bytes > smallest * SIZE_TIE:
            reason = (f"larger: {candidate.size_bytes} bytes vs {chosen.size_bytes} for "
                      f"{chosen.name}")
        else:
            reason = (f"slower than {chosen.name}: p50 {candidate.latency_p50_ms:.3f} ms vs "
                      f"{chosen.latency_p50_ms:.3f} ms at a similar size")
        rejected.append(Rejection(candidate.name, reason))
    return Decision(chosen=chosen, rejected=tuple(rejected))

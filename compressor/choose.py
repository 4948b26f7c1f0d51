"""Which candidate artifact a profile gets, and why the others lost. Pure.

Rules, in order:

0. **The profile runs it**: a candidate whose format or dtype is not in the profile's formats
   or dtypes is rejected; the fp32 reference only competes when the profile lists fp32 (and
   its format).
1. **Quality gate**: a candidate whose quality drop against the fp32 reference exceeds the
   budget is rejected. The drop is in points of the measure that fits each output
   (``compressor.metrics``: top-1 agreement or accuracy, per-position agreement, nearest-
   neighbour agreement, IoU...), the worst output counting. Every format is gated against
   the same reference, so a lossy conversion counts as a drop.
2. **Never slower than fp32**: a candidate whose median latency exceeds its format's fp32
   artifact's (``baselines``; the reference for ONNX) by more than the measurement tolerance
   is rejected (int8 on CPUs without VNNI, fp16 on CPUs). The rule protects the fp32 artifact
   the profile would otherwise get, so it applies when the profile lists fp32; for a profile
   that runs no fp32 (``coral-edgetpu``: int8-full only, for an accelerator the build host
   does not have) a slower candidate is kept and the decision says so in ``notes``.
3. **Preferred format**: of the rest, only those of the profile's most preferred format that
   has any stay (``rpi4`` lists tflite before onnx: LiteRT is its runtime, whatever the build
   host's CPU measures across runtimes).
4. **Smallest, then fastest**: among those, the ones within 10% of the smallest size count as
   equally small, and the fastest of them wins. When nothing is left (say an int8-only
   profile and a budget no int8 candidate meets) there is no artifact, never one over budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SIZE_TIE", "Decision", "Measured", "Rejection", "choose"]

SIZE_TIE = 1.10


@dataclass(frozen=True)
class Measured:
    """One candidate artifact with its measured size, quality and latency."""

    name: str
    dtype: str
    size_bytes: int
    latency_p50_ms: float
    latency_p99_ms: float
    drop: float  # quality points lost against the fp32 reference (compressor.metrics)
    format: str = "onnx"  # artifact format: onnx or tflite


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
    notes: tuple[str, ...] = ()  # what a reader of the choice should know (rule 2 waived)


def choose(candidates: Sequence[Measured], reference: Measured, max_drop: float,
           dtypes: Sequence[str] = ("fp32", "fp16", "int8"),
           latency_tolerance: float = 0.05, *, formats: Sequence[str] = ("onnx", "tflite"),
           baselines: Mapping[str, Measured] | None = None) -> Decision:
    """Apply the module's rules for a profile running ``formats`` and ``dtypes``.

    ``baselines`` maps a format to its fp32 artifact, the latency bar for that format's
    candidates (default: the reference, for every format).
    """
    rules = _Rules(reference, max_drop, tuple(dtypes), tuple(formats), latency_tolerance,
                   dict(baselines or {}))
    rejected: list[Rejection] = []
    eligible: list[Measured] = []
    notes: list[str] = []
    others = [c for c in candidates if c.name != reference.name]
    for candidate in [reference, *others]:
        reason, note = rules.screen(candidate)
        if reason is not None:
            rejected.append(Rejection(candidate.name, reason))
        else:
            eligible.append(candidate)
            notes += [note] if note else []
    if not eligible:
        return Decision(chosen=None, rejected=tuple(rejected), notes=tuple(notes))
    preferred = next(f for f in [*formats, *(c.format for c in eligible)]
                     if any(c.format == f for c in eligible))
    in_format = [c for c in eligible if c.format == preferred]
    smallest = min(c.size_bytes for c in in_format)
    small = [c for c in in_format if c.size_bytes <= smallest * SIZE_TIE]
    chosen = min(small, key=lambda c: (c.latency_p50_ms, c.size_bytes, c.name))
    for candidate in eligible:
        if candidate is chosen:
            continue
        if candidate.format != preferred:
            reason = (f"{candidate.format}: the profile prefers {preferred} (formats "
                      f"{', '.join(formats)}) and {chosen.name} qualifies")
        elif candidate.size_bytes > smallest * SIZE_TIE:
            reason = (f"larger: {candidate.size_bytes} bytes vs {chosen.size_bytes} for "
                      f"{chosen.name}")
        else:
            reason = (f"slower than {chosen.name}: p50 {candidate.latency_p50_ms:.3f} ms vs "
                      f"{chosen.latency_p50_ms:.3f} ms at a similar size")
        rejected.append(Rejection(candidate.name, reason))
    notes = [n for n in notes if n.startswith(f"{chosen.name} ")]
    return Decision(chosen=chosen, rejected=tuple(rejected), notes=tuple(notes))


@dataclass(frozen=True)
class _Rules:
    """Rules 0-2 for one profile."""

    reference: Measured
    max_drop: float
    dtypes: tuple[str, ...]
    formats: tuple[str, ...]
    tolerance: float
    baselines: dict[str, Measured]

    def screen(self, candidate: Measured) -> tuple[str | None, str | None]:
        """(why ``candidate`` is rejected, or None; a note when it is kept regardless)."""
        if candidate.format not in self.formats:
            return (f"{candidate.format} is not among the profile's formats "
                    f"({', '.join(self.formats)})"), None
        if candidate.dtype not in self.dtypes:
            return (f"{candidate.dtype} is not among the profile's dtypes "
                    f"({', '.join(self.dtypes)})"), None
        if candidate is not self.reference and candidate.drop > self.max_drop:
            return (f"quality drop {candidate.drop:.2f} points is over the budget of "
                    f"{self.max_drop:g}"), None
        return self._latency(candidate)

    def _latency(self, candidate: Measured) -> tuple[str | None, str | None]:
        bar = self.baselines.get(candidate.format, self.reference)
        if candidate is bar or candidate.latency_p50_ms <= bar.latency_p50_ms * (
                1.0 + self.tolerance):
            return None, None
        speed = (f"p50 {candidate.latency_p50_ms:.3f} ms vs {bar.latency_p50_ms:.3f} ms on "
                 "this CPU")
        if "fp32" in self.dtypes:
            return f"slower than {bar.name}: {speed}", None
        return None, (f"{candidate.name} is slower than {bar.name} ({speed}) but qualifies: "
                      "the profile runs no fp32 artifact")

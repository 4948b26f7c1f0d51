"""Health gates: what a rollout step must show before it advances, judged with a bound.

A gate is ``METRIC OP THRESHOLD`` (``agreement>=0.98``, ``error_rate<=0.01``). Each metric
is one of two kinds:

- a **rate** (``install_failures``, ``error_rate``, ``crash_rate``, ``agreement``): events
  out of trials pooled over the step's devices, judged with a one-sided Wilson bound
  (:mod:`stats.bounds`);
- a **per-device value** (``p99_ratio``, ``confidence_shift``, ``drift``): one number per
  device, judged on its median with a sign test: the share of devices on the wrong side of
  the threshold, bounded by Wilson, must be confidently above one half to fail.

A gate **fails** only when the bound says the threshold is crossed with the gate's
confidence (so 1 failed install of 3 devices is weak evidence, 3 of 3 is not); it
**passes** once it has at least ``min_n`` observations and does not fail; otherwise it is
**waiting**. Steps are judged at every tick: a failing gate halts at once, a step advances
only when its bake time is over and every gate passes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleet_server.errors import RolloutError
from stats.bounds import wilson_lower, wilson_upper

__all__ = ["DEFAULT_GATES", "METRICS", "Gate", "GateResult", "Metric", "judge",
           "merge_gates", "parse_gate"]

#: Confidence of every bound: a gate fails only when this sure.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Metric:
    """What a gate measures: ``kind`` is ``rate`` or ``median``; ``unit`` says what ``n``
    counts (devices, requests, pairs)."""

    name: str
    kind: str
    unit: str
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("install_failures", "rate", "devices",
           "share of devices whose install failed or rolled back on the device"),
    Metric("error_rate", "rate", "requests", "failed inference requests per request"),
    Metric("crash_rate", "rate", "devices",
           "share of devices whose agent restarted (a sample with interval_s null)"),
    Metric("agreement", "rate", "pairs",
           "share of live inputs on which the new and the previous version agree"),
    Metric("p99_ratio", "median", "devices",
           "p99 latency of the new version over the previous one's on the same device"),
    Metric("confidence_shift", "median", "devices",
           "absolute change of the mean top-1 confidence, new vs previous, same inputs"),
    Metric("drift", "median", "devices",
           "PSI of the inputs and outputs against the bundle's baseline (worst of them)"),
)}

_GATE = re.compile(r"\s*([a-z_0-9]+)\s*(<=|>=|<|>|=)\s*([^\s].*?)\s*")


@dataclass(frozen=True)
class Gate:
    """``metric op threshold``; ``min_n`` observations (in the metric's unit) are needed
    before it can pass."""

    metric: str
    op: str
    threshold: float
    min_n: int = 0

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        """Whether ``value`` is on the good side of the threshold."""
        t = self.threshold
        return {"<=": value <= t, "<": value < t, ">=": value >= t, ">": value > t}[self.op]

    @property
    def upper(self) -> bool:
        """Whether the threshold is an upper limit (``<=``, ``<``)."""
        return self.op in ("<=", "<")


#: What a cautious operator would pick: any sign of trouble halts; agreement must be shown
#: on at least 200 compared requests before a step passes.
DEFAULT_GATES: tuple[Gate, ...] = (
    Gate("install_failures", "<=", 0.05),
    Gate("error_rate", "<=", 0.01),
    Gate("crash_rate", "<=", 0.05),
    Gate("p99_ratio", "<=", 1.5),
    Gate("agreement", ">=", 0.98, min_n=200),
    Gate("confidence_shift", "<=", 0.1),
    Gate("drift", "<=", 0.25),
)
_DEFAULT_MIN_N = {g.metric: g.min_n for g in DEFAULT_GATES}


def parse_gate(text: str) -> Gate | str:
    """Parse ``METRIC OP NUMBER`` (OP one of ``<= < >= >``), or ``METRIC=off``: then the
    metric's name is returned, meaning "drop its gate". RolloutError says what is wrong."""
    match = _GATE.fullmatch(text)
    if match is None:
        raise RolloutError(f"gate {text!r} is not METRIC OP NUMBER (e.g. agreement>=0.98, "
                           "error_rate<=0.01) or METRIC=off")
    metric, op, value = match.groups()
    if metric not in METRICS:
        raise RolloutError(f"gate {text!r}: unknown metric {metric!r}; use one of "
                           f"{', '.join(METRICS)}")
    if op == "=":
        if value != "off":
            raise RolloutError(f"gate {text!r}: '=' only turns a gate off ({metric}=off)")
        return metric
    try:
        threshold = float(value)
    except ValueError:
        raise RolloutError(f"gate {text!r}: threshold {value!r} is not a number") from None
    if not math.isfinite(threshold) or not -1e9 < threshold < 1e9:
        raise RolloutError(f"gate {text!r}: threshold must be a finite number")
    if METRICS[metric].kind == "rate" and not 0.0 <= threshold <= 1.0:
        raise RolloutError(f"gate {text!r}: {metric} is a rate; its threshold must be "
                           "between 0 and 1")
    return Gate(metric, op, threshold, _DEFAULT_MIN_N.get(metric, 0))


def merge_gates(expressions: Iterable[str]) -> tuple[Gate, ...]:
    """The default gates with ``expressions`` applied: a gate replaces the default of its
    metric, ``METRIC=off`` drops it."""
    gates = {g.metric: g for g in DEFAULT_GATES}
    for text in expressions:
        parsed = parse_gate(text)
        if isinstance(parsed, str):
            gates.pop(parsed, None)
        else:
            gates[parsed.metric] = parsed
    return tuple(gates[m] for m in METRICS if m in gates)


@dataclass(frozen=True)
class GateResult:
    """A gate judged: ``value`` is the point estimate (rate or median; None without data),
    ``bound`` the one-sided bound it was judged by, ``n`` the sample size; ``status`` is
    ``pass``, ``fail`` or ``waiting``."""

    gate: Gate
    value: float | None
    bound: float | None
    n: int
    status: str


def judge(gate: Gate, *, events: int = 0, trials: int = 0,
          values: Sequence[float] = ()) -> GateResult:
    """Judge ``gate`` on a rate (``events`` of ``trials``) or per-device ``values``."""
    if METRICS[gate.metric].kind == "rate":
        return _judge_rate(gate, events, trials)
    return _judge_median(gate, values)


def _judge_rate(gate: Gate, events: int, trials: int) -> GateResult:
    if trials == 0:
        return GateResult(gate, None, None, 0, "pass" if gate.min_n == 0 else "waiting")
    value = events / trials
    # The bound on the side that would make the gate fail: for an upper limit, how low the
    # true rate could be; if even that is above the limit, the rate is too high.
    if gate.upper:
        bound = wilson_lower(events, trials, CONFIDENCE)
    else:
        bound = wilson_upper(events, trials, CONFIDENCE)
    status = "fail" if not gate.holds(bound) else (
        "pass" if trials >= gate.min_n else "waiting")
    return GateResult(gate, value, bound, trials, status)


def _judge_median(gate: Gate, values: Sequence[float]) -> GateResult:
    n = len(values)
    if n == 0:
        return GateResult(gate, None, None, 0, "pass" if gate.min_n == 0 else "waiting")
    ordered = sorted(values)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    # Sign test: the median is past the threshold when most devices are. ``bad`` devices
    # are on the wrong side; the gate fails when even the lower bound of their share is
    # above one half.
    bad = sum(1 for v in values if not gate.holds(v))
    bound = wilson_lower(bad, n, CONFIDENCE)
    status = "fail" if bound > 0.5 else ("pass" if n >= gate.min_n else "waiting")
    return GateResult(gate, median, bound, n, status)

"""What monitoring takes from one telemetry sample, read defensively (pure).

A device is untrusted input: every field read here is optional, type-checked and bounded,
and a field that fails its check is left out (the sample itself is already stored as
sent). :func:`observations` turns one sample's ``metrics`` into one
:class:`Observation` per served model and version: requests, errors, the latency histogram
re-binned onto the server's fixed edges (:data:`LATENCY_EDGES_MS`), and the drift scores of
the agent's ``monitor`` block (MONITOR_CONTRACT.md, docs/telemetry.md).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.names import is_valid_name

__all__ = ["LATENCY_EDGES_MS", "MAX_COUNT", "MAX_MODELS", "MAX_SCORE", "MIN_OUTPUT_SAMPLED",
           "MIN_SAMPLED",
           "Observation", "observations", "rebin"]

#: The server's latency buckets (upper edges, ms): the agent's default buckets, so a
#: default agent's histogram is stored exactly. ``hist[i]`` counts latencies in
#: ``(edge[i-1], edge[i]]``; one more bucket counts those above the last edge.
LATENCY_EDGES_MS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0,
                                       100.0, 250.0, 1000.0)
#: Models read from one sample, at most (the rest are ignored).
MAX_MODELS = 32
#: Histogram buckets a device may send, at most (the contract's bound).
MAX_BUCKETS = 64
#: A per-interval counter above this is not believed (a billion requests in one interval).
MAX_COUNT = 10**9
#: Drift scores are clipped to this: PSI of disjoint distributions is large but finite.
MAX_SCORE = 1000.0
#: A ``worst`` label longer than this is cut.
_MAX_LABEL = 80
#: Inputs of one model read, at most (the contract's bound).
MAX_INPUTS = 16
#: Below this many sampled requests in an interval, its drift is not counted at all: with
#: 2 sampled digits the inputs' PSI of unshifted data reached 0.38 in the same measurement
#: (below), with 4 and more it stayed under 0.05.
MIN_SAMPLED = 10
#: Below this many sampled requests in an interval, the outputs' PSI is mostly sampling
#: noise and only the inputs' drift counts. Measured with agents on unshifted digits
#: (`fleet demo --drift`, 5% sampling, 2 s intervals): 2 to 16 sampled requests gave an
#: output PSI of 0.8 to 6.8 (10 classes), while the inputs' PSI over the same requests
#: (64 pixels each) stayed at 0.01 to 0.05. Sampling noise alone puts PSI near
#: (classes - 1) / sampled, under 0.05 from 200 on.
MIN_OUTPUT_SAMPLED = 200


@dataclass(frozen=True)
class Observation:
    """One model version's figures in one sample. ``version`` 0: served without a bundle."""

    model: str
    version: int
    requests: int = 0
    errors: int = 0
    #: Counts on :data:`LATENCY_EDGES_MS` (+ overflow); empty if the sample had none.
    latency_hist: tuple[int, ...] = ()
    drift_psi: float | None = None
    drift_ks: float | None = None
    #: ``input:NAME`` or ``output:NAME``: where the drift is largest.
    drift_worst: str | None = None


def observations(metrics: Mapping[str, Any]) -> list[Observation]:
    """The observations in one sample's ``metrics`` (never raises on bad input)."""
    models = metrics.get("models")
    if not isinstance(models, Mapping):
        return []
    edges = _edges(metrics.get("latency_buckets_ms"))
    found: list[Observation] = []
    for name, entry in list(models.items())[:MAX_MODELS]:
        if not is_valid_name(name) or not isinstance(entry, Mapping):
            continue
        found.extend(_model(str(name), entry, edges))
    return found


def _model(name: str, entry: Mapping[str, Any], edges: tuple[float, ...] | None,
           ) -> list[Observation]:
    version = _version(entry.get("version"))
    hist = _hist(entry.get("latency_hist"), edges)
    served = Observation(name, version, requests=_count(entry.get("requests")),
                         errors=_count(entry.get("errors")), latency_hist=hist)
    monitor = entry.get("monitor")
    if not isinstance(monitor, Mapping):
        return [served]
    psi, ks, label = _drift(monitor)
    if psi is None and ks is None:
        return [served]
    # The statistics name the version they were gathered on; a swap inside the interval
    # can make that the previous one.
    stats_version = _version(monitor.get("version", entry.get("version")))
    if stats_version == version:
        return [Observation(name, version, served.requests, served.errors, hist, psi, ks,
                            label)]
    return [served, Observation(name, stats_version, drift_psi=psi, drift_ks=ks,
                                drift_worst=label)]


def _drift(monitor: Mapping[str, Any]) -> tuple[float | None, float | None, str | None]:
    """The interval's drift: the agent's ``drift`` (largest over inputs and outputs), or
    over the inputs only when too few requests were sampled for the outputs' PSI to mean
    anything; nothing for an interval that sampled fewer than :data:`MIN_SAMPLED` requests
    (too little data is not "no drift" either)."""
    sampled = monitor.get("sampled")
    if isinstance(sampled, int) and sampled < MIN_SAMPLED:
        return None, None, None
    inputs = monitor.get("inputs")
    if (isinstance(sampled, int) and sampled < MIN_OUTPUT_SAMPLED
            and isinstance(inputs, Mapping) and inputs):
        scores = [(_score(v.get("psi")), _score(v.get("ks")), f"input:{k}")
                  for k, v in list(inputs.items())[:MAX_INPUTS]
                  if isinstance(k, str) and isinstance(v, Mapping)]
        psis = [(p, label) for p, _, label in scores if p is not None]
        kss = [k for _, k, _ in scores if k is not None]
        if not psis and not kss:
            return None, None, None
        psi, worst = max(psis) if psis else (None, None)
        return psi, max(kss) if kss else None, _label(worst)
    drift = monitor.get("drift")
    if not isinstance(drift, Mapping):
        return None, None, None
    return _score(drift.get("psi")), _score(drift.get("ks")), _label(drift.get("worst"))


def _label(value: object) -> str | None:
    return value[:_MAX_LABEL] if isinstance(value, str) and value.isprintable() else None


def rebin(counts: Sequence[int], edges: Sequence[float]) -> tuple[int, ...]:
    """Counts on ``edges`` (+ overflow) moved onto :data:`LATENCY_EDGES_MS` (+ overflow).

    Each bucket goes to the first server bucket whose upper edge is at or above its own, so
    a quantile read from the result is never below the true one."""
    out = [0] * (len(LATENCY_EDGES_MS) + 1)
    for i, count in enumerate(counts):
        if i >= len(edges):
            out[-1] += count
            continue
        out[bisect.bisect_left(LATENCY_EDGES_MS, edges[i] * (1 - 1e-9))] += count
    return tuple(out)


def _edges(value: object) -> tuple[float, ...] | None:
    """The sample's bucket edges: ascending positive finite numbers, at most MAX_BUCKETS."""
    if value is None:
        return LATENCY_EDGES_MS
    if not isinstance(value, list) or not 0 < len(value) < MAX_BUCKETS:
        return None
    edges = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return None
        edges.append(float(item))
    if any(not math.isfinite(e) or e <= 0 for e in edges) or any(
            b <= a for a, b in itertools.pairwise(edges)):
        return None
    return tuple(edges)


def _hist(value: object, edges: tuple[float, ...] | None) -> tuple[int, ...]:
    if edges is None or not isinstance(value, list) or len(value) != len(edges) + 1:
        return ()
    counts = [_count(v, strict=True) for v in value]
    if any(c < 0 for c in counts):
        return ()
    if edges == LATENCY_EDGES_MS:
        return tuple(counts)
    return rebin(counts, edges)


def _count(value: object, *, strict: bool = False) -> int:
    """A per-interval counter; 0 (or -1 with ``strict``) for anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return -1 if strict else 0
    return value


def _version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        return 0
    return value


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    score = float(value)
    if not math.isfinite(score) or score < 0:
        return None
    return min(score, MAX_SCORE)

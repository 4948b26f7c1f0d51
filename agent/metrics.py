"""The arithmetic of telemetry: pure functions from readings to a sample's metrics.

No I/O and no clocks: the collector (:mod:`agent.telemetry`) reads the runtime and the
system (:mod:`agent.system_probe`) and hands the readings here. Counters are cumulative
where they are read and per interval in a sample, so the functions below turn two readings
into a delta (:func:`counter_delta`, :func:`new_latencies`), bucket latencies
(:func:`latency_histogram`) and format one model's and the system's part of a sample
(:func:`model_metrics`, :func:`system_metrics`). docs/telemetry.md lists the fields.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_BUCKETS_MS",
    "Counts",
    "ModelReading",
    "SystemReading",
    "counter_delta",
    "latency_histogram",
    "model_metrics",
    "new_latencies",
    "system_metrics",
]

#: Upper edges (ms) of the latency histogram's buckets; one more bucket counts the rest.
DEFAULT_BUCKETS_MS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100,
                                          250, 1000)


@dataclass(frozen=True)
class Counts:
    """A model's cumulative request and error counters at one moment."""

    requests: int = 0
    errors: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors)


def counter_delta(before: Counts | None, now: Counts) -> Counts:
    """Requests and errors counted between two readings of the same counters.

    ``before`` None (counters never read) or a counter lower than before (they restarted
    from zero) means everything ``now`` counts is new.
    """
    if before is None or now.requests < before.requests or now.errors < before.errors:
        return now
    return Counts(now.requests - before.requests, now.errors - before.errors)


def new_latencies(before: Counts | None, now: Counts,
                  recent: Sequence[float]) -> Sequence[float]:
    """The latencies of the successful requests between two readings.

    ``recent`` is the counters' latency record at ``now`` (oldest first, bounded): every
    successful request appends one, a failed one none. If more requests succeeded than
    ``recent`` holds, only the newest ``len(recent)`` are known.
    """
    delta = counter_delta(before, now)
    succeeded = delta.requests - delta.errors
    return recent[len(recent) - min(succeeded, len(recent)):] if succeeded > 0 else ()


def latency_histogram(latencies_ms: Sequence[float],
                      edges_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> list[int]:
    """Counts per bucket: ``(edges[i-1], edges[i]]`` for each edge, then ``> edges[-1]``."""
    counts = [0] * (len(edges_ms) + 1)
    for value in latencies_ms:
        counts[bisect.bisect_left(edges_ms, value)] += 1
    return counts


@dataclass(frozen=True)
class ModelReading:
    """What the runtime says about one served model, besides its counters."""

    version: int | None
    state: str  # "serving", "probation", or "unloaded" (gone since the previous sample)
    backend: str
    fallback: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    device: str | None = None  # what actually runs it (cpu, NPU, cuda:0...)


def model_metrics(reading: ModelReading, delta: Counts, latencies_s: Sequence[float],
                  edges_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> dict[str, Any]:
    """One model's entry in a sample: identity, counts since the previous sample, latency.

    ``p50_ms``/``p99_ms`` are the runtime's figures (its recent requests, the same the
    probation judge uses); ``latency_hist`` counts this interval's successful requests.
    """
    entry: dict[str, Any] = {
        "version": reading.version, "state": reading.state, "backend": reading.backend,
        "requests": delta.requests, "errors": delta.errors,
        "p50_ms": _round(reading.p50_ms, 3), "p99_ms": _round(reading.p99_ms, 3),
        "latency_hist": latency_histogram([s * 1e3 for s in latencies_s], edges_ms),
    }
    if reading.device is not None:
        entry["device"] = reading.device
    if reading.fallback is not None:
        entry["fallback"] = reading.fallback
    return entry


@dataclass(frozen=True)
class SystemReading:
    """Raw system figures; None (or empty) for whatever this platform cannot tell."""

    cpu_percent: float | None = None  # whole system, since the previous reading
    process_cpu_percent: float | None = None  # this process; 100 = one core
    rss_bytes: int | None = None
    memory_percent: float | None = None  # system memory in use
    load_avg: tuple[float, float, float] | None = None
    temperatures_c: Mapping[str, float] | None = None  # sensor -> current reading


def system_metrics(reading: SystemReading) -> dict[str, Any]:
    """The ``system`` part of a sample: rounded, with absent figures left out.

    ``temp_c`` is the hottest sensor's reading (and ``temp_sensor`` its name)."""
    out: dict[str, Any] = {}
    for key, value in (("cpu_percent", reading.cpu_percent),
                       ("process_cpu_percent", reading.process_cpu_percent),
                       ("memory_percent", reading.memory_percent)):
        if value is not None and math.isfinite(value):
            out[key] = round(value, 1)
    if reading.rss_bytes is not None:
        out["rss_bytes"] = int(reading.rss_bytes)
    if reading.load_avg is not None and all(math.isfinite(v) for v in reading.load_avg):
        out["load_avg"] = [round(v, 2) for v in reading.load_avg]
    temperatures = {name: value for name, value in (reading.temperatures_c or {}).items()
                    if math.isfinite(value)}
    if temperatures:
        sensor = max(temperatures, key=lambda name: temperatures[name])
        out["temp_c"] = round(temperatures[sensor], 1)
        out["temp_sensor"] = sensor
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)

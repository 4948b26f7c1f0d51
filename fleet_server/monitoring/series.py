"""Sums of observations and what is read from them (pure): error rates, latency quantiles.

The registry stores observations summed per device, model version and time bucket
(:mod:`fleet_server.registry.metric_series`) and sums them again per group, profile, model
or version when asked; a :class:`Totals` is one such sum, with the figures an operator reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .samples import LATENCY_EDGES_MS

__all__ = ["QUANTILES", "Totals", "quantile"]

#: The latency quantiles shown and exported.
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Totals:
    """Summed figures of one key (a device, group, profile, model or version) over a time
    range; ``key`` names what was summed (``{"group": "lab", "model": "digits"}``)."""

    key: dict[str, Any]
    samples: int
    requests: int
    errors: int
    #: Counts on :data:`~fleet_server.monitoring.samples.LATENCY_EDGES_MS` + overflow.
    latency_hist: tuple[int, ...]
    #: Largest drift PSI / KS any device reported in the range; None: no drift statistics.
    drift_psi_max: float | None
    drift_ks_max: float | None
    #: Mean of the PSIs reported (one per sample that had one).
    drift_psi_mean: float | None
    #: Devices that sent at least one sample in the range.
    devices: int
    #: Start of the first and last time bucket summed (Unix time).
    first: float | None = None
    last: float | None = None

    @property
    def error_rate(self) -> float | None:
        """Failed requests per request (None without requests); at most 1."""
        if self.requests <= 0:
            return None
        return min(1.0, self.errors / self.requests)

    def latency_ms(self, q: float) -> float | None:
        """The ``q`` quantile of latency, in ms (None without requests)."""
        return quantile(self.latency_hist, q)

    def to_json(self) -> dict[str, Any]:
        """The figures as the API shows them (schema ``MetricTotals``)."""
        return {**self.key, "samples": self.samples, "requests": self.requests,
                "errors": self.errors, "error_rate": _round(self.error_rate),
                "latency_ms": {f"p{round(q * 100)}": _round(self.latency_ms(q))
                               for q in QUANTILES},
                "latency_hist": list(self.latency_hist),
                "drift": {"psi_max": _round(self.drift_psi_max),
                          "ks_max": _round(self.drift_ks_max),
                          "psi_mean": _round(self.drift_psi_mean)},
                "devices": self.devices, "first": self.first, "last": self.last}


def quantile(hist: Sequence[int], q: float, edges: Sequence[float] = LATENCY_EDGES_MS,
             ) -> float | None:
    """The ``q`` quantile of a histogram on ``edges`` (+ overflow), interpolated linearly
    inside its bucket as Prometheus' ``histogram_quantile`` does: from 0 in the first
    bucket; a quantile in the overflow bucket is reported as the last edge (a lower bound).
    None for an empty histogram."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside 0..1")
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            if i >= len(edges):
                return float(edges[-1])
            low = 0.0 if i == 0 else float(edges[i - 1])
            return low + (float(edges[i]) - low) * max(0.0, rank - seen) / count
        seen += count
    return float(edges[-1])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)

"""What one device's telemetry says about a rollout's candidate: :class:`Health`, pure.

:func:`summarize` reads the device's samples (``protocol.messages.Telemetry`` metrics, as
docs/telemetry.md and the monitoring contract describe them) and adds up what the gates
need. Which block describes the candidate depends on the phase:

- ``shadow``: the candidate runs beside the served (previous) model: its requests, errors
  and latency are in ``models.{name}.shadow``, agreement and confidence shift too, and the
  served model's ``p99_ms`` in the same samples is the latency to compare with;
- ``steps``: the candidate is served: requests, errors, ``p99_ms`` and ``monitor.drift``
  are the model's own; agreement and confidence shift come from ``previous`` (the previous
  version kept loaded and run on a share of requests); the latency to compare with is the
  served ``p99_ms`` of samples taken before the rollout started on that version.

Malformed fields are skipped, not trusted: telemetry is input from outside.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleet_server.monitoring.samples import interval_drift
from protocol.messages import Telemetry

__all__ = ["Health", "summarize"]


@dataclass(frozen=True)
class Health:
    """One device's evidence about the candidate since it was exposed to it."""

    #: Samples that describe the candidate (served, or running in shadow).
    samples: int = 0
    requests: int = 0
    errors: int = 0
    #: Median over those samples of the candidate's p99 latency, and of the previous
    #: version's on this device (before the rollout, or beside the shadow).
    p99_ms: float | None = None
    baseline_p99_ms: float | None = None
    #: Samples with ``interval_s`` null after one that already ran the candidate: the agent
    #: started again while running it (a device that comes back online after being
    #: switched off before it got the candidate does not count).
    restarts: int = 0
    #: Compared requests and how many agreed (top-1, or cosine >= 0.99).
    pairs: int = 0
    agree: int = 0
    #: Mean absolute confidence shift (new vs previous) over samples that had one.
    confidence_shift: float | None = None
    #: The worst drift PSI the candidate showed.
    drift_psi: float | None = None

    @property
    def p99_ratio(self) -> float | None:
        """The candidate's p99 over the previous version's, when both are known."""
        if self.p99_ms is None or not self.baseline_p99_ms:
            return None
        return self.p99_ms / self.baseline_p99_ms


def summarize(samples: Iterable[Telemetry], *, model: str, candidate: int,
              previous: int | None, phase: str, exposed_at: float,
              started_at: float) -> Health:
    """Add up ``samples`` of one device (any order) for the candidate ``model`` version
    ``candidate`` (replacing ``previous``). ``exposed_at``: when the device was asked to
    run it (samples before do not count against it); ``started_at``: the rollout's start
    (samples before it give the baseline latency)."""
    shadow = phase == "shadow"
    n = requests = errors = restarts = pairs = agree = 0
    p99s: list[float] = []
    baseline: list[float] = []
    shifts: list[float] = []
    drift: float | None = None
    for sample in sorted(samples, key=lambda s: s.seq):
        metrics = sample.metrics
        entry = _dict(_dict(metrics, "models"), model)
        version = _int(entry.get("version"))
        served_p99 = _number(entry.get("p99_ms"))
        if sample.at < started_at:
            if version == previous and served_p99 is not None:
                baseline.append(served_p99)
            continue
        if sample.at < exposed_at:
            continue
        if n and "interval_s" in metrics and metrics["interval_s"] is None:
            restarts += 1
        block = _dict(entry, "shadow") if shadow else entry
        if shadow and _int(block.get("version")) != candidate:
            continue
        if not shadow and version != candidate:
            continue
        n += 1
        requests += _count(block.get("requests"))
        errors += _count(block.get("errors"))
        p99 = _number(block.get("p99_ms"))
        if p99 is not None:
            p99s.append(p99)
        if shadow and served_p99 is not None:
            baseline.append(served_p99)
        compared = block if shadow else _dict(entry, "previous")
        got_n, got_agree = _agreement(compared)
        pairs += got_n
        agree += got_agree
        shift = _number(compared.get("confidence_shift"))
        if shift is not None:
            shifts.append(abs(shift))
        if not shadow:
            # Read as monitoring reads it: an interval with too few sampled requests says
            # nothing, and a few more only through the inputs (the outputs' PSI is noise).
            psi, _, _ = interval_drift(_dict(entry, "monitor"))
            if psi is not None:
                drift = psi if drift is None else max(drift, psi)
    return Health(samples=n, requests=requests, errors=min(errors, requests),
                  p99_ms=statistics.median(p99s) if p99s else None,
                  baseline_p99_ms=statistics.median(baseline) if baseline else None,
                  restarts=restarts, pairs=pairs, agree=agree,
                  confidence_shift=sum(shifts) / len(shifts) if shifts else None,
                  drift_psi=drift)


def _agreement(compared: Mapping[str, Any]) -> tuple[int, int]:
    """(pairs, agreeing pairs) of a ``shadow``/``previous`` block; (0, 0) if inconsistent."""
    agreement = _dict(compared, "agreement")
    n, agree = _count(agreement.get("n")), _count(agreement.get("agree"))
    return (n, agree) if agree <= n else (0, 0)


def _dict(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int:
    """A non-negative count, bounded (a device cannot claim 2**62 requests per interval)."""
    got = _int(value)
    return 0 if got is None or got < 0 else min(got, 10**9)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0.0 <= abs(number) < 1e9 else None

"""The agent's optional ``GET /metrics``: its served models in the Prometheus text format.

Off by default (``[monitor] prometheus = true`` turns it on; the API's token guards it like
every other route). A :class:`RuntimeCollector` reads the runtime at each scrape, so
serving requests costs nothing extra: per model and version the request and error
counters, a latency histogram (seconds) and the drift the monitor measured in its last
reported interval. The histogram is built from the runtime's record of recent latencies
(the newest 4,096 per model): a scrape interval with more requests than that counts the
newest ones only, in ``_bucket`` and ``_count`` alike, while ``requests_total`` counts all.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ModelNotFoundError
from .metrics import Counts, new_latencies

if TYPE_CHECKING:
    from .runtime import RequestStats, Runtime

__all__ = ["LATENCY_BUCKETS_S", "RuntimeCollector", "exposition"]

#: Upper edges (seconds) of the latency histogram's buckets.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)


class _Latencies:
    """Cumulative bucket counts of one model's latencies, fed from its recent record."""

    def __init__(self) -> None:
        self.seen: Counts | None = None
        self.buckets = [0] * len(LATENCY_BUCKETS_S)
        self.count = 0
        self.total = 0.0

    def update(self, stats: RequestStats) -> None:
        requests, errors, recent = stats.read()
        now = Counts(requests, errors)
        for value in new_latencies(self.seen, now, recent):
            self.count += 1
            self.total += value
            for index, edge in enumerate(LATENCY_BUCKETS_S):
                if value <= edge:
                    self.buckets[index] += 1
        self.seen = now


class RuntimeCollector:
    """A prometheus_client collector over ``runtime`` (register it in a registry)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._lock = threading.Lock()
        self._latencies: weakref.WeakKeyDictionary[RequestStats, _Latencies] = (
            weakref.WeakKeyDictionary())

    def collect(self) -> Iterator[Any]:
        """The metric families of one scrape."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["model", "version"]
        requests = CounterMetricFamily("edgefleet_model_requests", "Requests served, per "
                                       "model version", labels=labels)
        errors = CounterMetricFamily("edgefleet_model_errors", "Failed requests, per model "
                                     "version", labels=labels)
        latency = HistogramMetricFamily("edgefleet_model_latency_seconds", "Inference "
                                        "latency of successful requests", labels=labels)
        psi = GaugeMetricFamily("edgefleet_model_drift_psi", "Largest PSI against the "
                                "bundle baseline in the last reported interval",
                                labels=labels)
        ks = GaugeMetricFamily("edgefleet_model_drift_ks", "Largest binned KS distance "
                               "against the bundle baseline in the last reported interval",
                               labels=labels)
        for info in self.runtime.models():
            try:
                served = self.runtime.served(info.name)
            except ModelNotFoundError:
                continue
            values = [info.name, str(info.version or 0)]
            count, failed, _ = served.stats.read()
            requests.add_metric(values, count)
            errors.add_metric(values, failed)
            with self._lock:
                record = self._latencies.get(served.stats)
                if record is None:
                    record = self._latencies[served.stats] = _Latencies()
                record.update(served.stats)
                buckets = [(str(edge), n) for edge, n in zip(LATENCY_BUCKETS_S, record.buckets,
                                                            strict=True)]
                latency.add_metric(values, [*buckets, ("+Inf", record.count)], record.total)
            drift = served.monitor.last_drift if served.monitor is not None else None
            if drift is not None:
                psi.add_metric(values, drift["psi"])
                ks.add_metric(values, drift["ks"])
        yield from (requests, errors, latency, psi, ks)


def exposition(collector: RuntimeCollector) -> tuple[bytes, str]:
    """One scrape's body and content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST

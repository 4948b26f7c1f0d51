"""``/metrics``: the fleet in Prometheus' text format (prometheus_client).

Everything is computed at scrape time from the registry (:class:`FleetCollector`), so every
server replica exports the same fleet-wide figures. Figures over a window are gauges over
the last :data:`WINDOW_S` seconds (the registry keeps sums, not device counters that
Prometheus could ``rate()``). Rollouts per status appear only where the database has the
rollout controller's ``rollouts`` table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import ALERT_KINDS
from .monitor import Monitor
from .series import QUANTILES

__all__ = ["CONTENT_TYPE", "WINDOW_S", "FleetCollector", "IngestFigures", "exposition"]

#: The Prometheus text format's media type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The window of the per-version figures: long enough to hold several agent samples (30 s).
WINDOW_S = 300.0


@dataclass(frozen=True)
class IngestFigures:
    """How far ingest is behind: messages waiting, and seconds from receipt to commit of
    the oldest message of the last batch."""

    depth: int
    lag_s: float


class FleetCollector(Collector):
    """Collects the fleet's figures from ``monitor`` at each scrape."""

    def __init__(self, monitor: Monitor, ingest: Callable[[], IngestFigures]) -> None:
        self._monitor = monitor
        self._ingest = ingest

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The metric families of one scrape."""
        yield from self._fleet()
        yield from self._versions()
        ingest = self._ingest()
        yield GaugeMetricFamily("edgefleet_ingest_queue_depth",
                                "Device messages received and waiting to be stored",
                                value=ingest.depth)
        yield GaugeMetricFamily("edgefleet_ingest_lag_seconds", "Seconds from receipt to "
                                "commit of the oldest message of the last stored batch",
                                value=ingest.lag_s)
        firing = GaugeMetricFamily("edgefleet_alerts_firing", "Alerts firing, per kind",
                                   labels=["kind"])
        # Every kind gets a sample, 0 when quiet: an absent series cannot be told from a
        # scrape that failed, and `edgefleet_alerts_firing > 0` alert rules need the zero.
        counts = dict.fromkeys(ALERT_KINDS, 0)
        for alert in self._monitor.registry.alerts(firing_only=True):
            counts[alert.kind] = counts.get(alert.kind, 0) + 1
        for kind, n in sorted(counts.items()):
            firing.add_metric([kind], n)
        yield firing
        notifier = self._monitor.notifier
        sent = CounterMetricFamily("edgefleet_alert_notifications", "Alert notices given "
                                   "to webhooks, by outcome", labels=["outcome"])
        for outcome, n in (("delivered", notifier.delivered), ("failed", notifier.failed),
                           ("dropped", notifier.dropped)):
            sent.add_metric([outcome], n)
        yield sent
        rollouts = GaugeMetricFamily("edgefleet_rollouts", "Rollouts per status",
                                     labels=["status"])
        for state, n in self._monitor.registry.rollout_states().items():
            rollouts.add_metric([state], n)
        yield rollouts

    def _fleet(self) -> Iterator[GaugeMetricFamily]:
        view = self._monitor.overview()
        devices = GaugeMetricFamily("edgefleet_devices", "Enrolled devices", labels=["group"])
        online = GaugeMetricFamily("edgefleet_devices_online", "Devices online now",
                                   labels=["group"])
        converged = GaugeMetricFamily("edgefleet_devices_converged", "Devices that run "
                                      "every model they are asked to, committed",
                                      labels=["group"])
        ratio = GaugeMetricFamily("edgefleet_convergence_ratio", "Share of the group's "
                                  "devices that are converged", labels=["group"])
        running = GaugeMetricFamily("edgefleet_model_version_devices", "Devices reporting "
                                    "a model version running", labels=["group", "model",
                                                                       "version"])
        for name, group in sorted(view.groups.items()):
            devices.add_metric([name], group.devices)
            online.add_metric([name], group.online)
            converged.add_metric([name], group.converged)
            if group.convergence is not None:
                ratio.add_metric([name], group.convergence)
            for model, versions in sorted(group.running.items()):
                for version, n in sorted(versions.items()):
                    running.add_metric([name, model, str(version)], n)
        yield from (devices, online, converged, ratio, running)

    def _versions(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "version"]
        window = f" over the last {WINDOW_S:.0f} s"
        requests = GaugeMetricFamily("edgefleet_model_requests", "Requests" + window, labels=labels)
        errors = GaugeMetricFamily("edgefleet_model_errors", "Failed requests" + window,
                                   labels=labels)
        ratio = GaugeMetricFamily("edgefleet_model_error_ratio", "Failed requests per "
                                  "request" + window, labels=labels)
        # A gauge per percentile, not a summary: the registry keeps bucket counts, not the
        # sum of latencies a summary needs (and "quantile" is a summary's label only).
        latency = GaugeMetricFamily("edgefleet_model_latency_seconds", "Latency percentiles"
                                    + window + " (from the devices' histograms)",
                                    labels=[*labels, "percentile"])
        psi = GaugeMetricFamily("edgefleet_model_drift_psi_max", "Largest input/output drift "
                                "PSI any device reported" + window, labels=labels)
        ks = GaugeMetricFamily("edgefleet_model_drift_ks_max", "Largest drift KS distance "
                               "any device reported" + window, labels=labels)
        reporting = GaugeMetricFamily("edgefleet_model_devices_reporting", "Devices that "
                                      "sent samples" + window, labels=labels)
        for t in self._monitor.totals(WINDOW_S, ("model", "version")):
            key = [str(t.key["model"]), str(t.key["version"])]
            requests.add_metric(key, t.requests)
            errors.add_metric(key, t.errors)
            reporting.add_metric(key, t.devices)
            if t.error_rate is not None:
                ratio.add_metric(key, t.error_rate)
            for q in QUANTILES:
                value = t.latency_ms(q)
                if value is not None:
                    latency.add_metric([*key, f"{q * 100:g}"], value / 1000)
            if t.drift_psi_max is not None:
                psi.add_metric(key, t.drift_psi_max)
            if t.drift_ks_max is not None:
                ks.add_metric(key, t.drift_ks_max)
        yield from (requests, errors, ratio, latency, psi, ks, reporting)


def exposition(monitor: Monitor, ingest: Callable[[], IngestFigures]) -> bytes:
    """One scrape's text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(monitor, ingest))
    return generate_latest(registry)

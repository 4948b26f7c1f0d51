"""The monitoring component of a fleet server: the I/O around the pure modules.

:class:`Monitor` is what the service holds. It

- folds each new telemetry sample into the registry's time series, inside the ingest
  thread's transaction (:meth:`observe`: parsing only, no waiting);
- on its own thread, every ``evaluate_every_s`` and only while this process leads
  (docs/scale.md): evaluates the alert rules
  (:func:`~.alerts.evaluate`), follows the event log for ``rollout.*`` events, and (every
  few minutes) compacts the time series (minute points into hour points, expired points
  out) and deletes stored samples past their retention;
- is the one way to raise an alert (:meth:`raise_alert`, for every component): the
  registry groups repeats, and notices go to the webhooks (:class:`~.notifier.Notifier`)
  after the transaction that logged them committed;
- answers the queries of the API, ``/metrics`` and the dashboard.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fleet_server.registry import Registry
from fleet_server.registry.metric_series import HOUR, MINUTE
from protocol.messages import Telemetry

from .alerts import Condition, DeviceSeen, FleetView, Notice, evaluate
from .config import MonitoringConfig
from .notifier import Notifier
from .overview import Overview, overview
from .samples import observations
from .series import Totals

__all__ = ["ROLLOUT_HALTED", "ROLLOUT_RESOLVING", "Monitor"]

log = logging.getLogger(__name__)

#: The event the rollout controller logs when it halts a rollout (MONITOR_CONTRACT.md).
ROLLOUT_HALTED = "rollout.halted"
#: Events after which a halted rollout's alert is resolved.
ROLLOUT_RESOLVING = ("rollout.resumed", "rollout.aborted", "rollout.succeeded",
                     "rollout.promoted")
#: A sample's own time is believed within this much in the future (device clocks drift).
_CLOCK_SLACK_S = 300.0
#: Events read per evaluation, at most.
_EVENTS_PER_ROUND = 1000
_COMPACT_EVERY_S = 300.0


class Monitor:
    """Time series, alerts and fleet figures of one server (module docstring)."""

    def __init__(self, registry: Registry, config: MonitoringConfig, *,
                 offline_after_s: float, clock: Callable[[], float] = time.time,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self.registry = registry
        #: Alerts are evaluated by the leader of several server processes only
        #: (docs/scale.md): the others would read the same fleet and raise the same alerts.
        self.is_leader = is_leader
        self.config = config
        self.offline_after_s = offline_after_s
        self._clock = clock
        self.notifier = Notifier(config.webhooks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_cursor = 0
        self._last_compact = 0.0
        #: Evaluations done (tests and the demo wait on it).
        self.evaluations = 0

    # --- life cycle ---

    def start(self) -> None:
        """Start the webhook threads and the evaluation thread."""
        newest = self.registry.events(limit=1, newest=True)
        # Only what happens from now on: a halt alerted before a restart is in the alerts
        # table already, and replaying history would notify it again.
        self._event_cursor = newest[0].id if newest else 0
        self.notifier.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fleet-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop evaluating and delivering. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.notifier.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.evaluate_every_s):
            try:
                if self.is_leader():
                    self.evaluate_once()
                else:
                    self._skip_events()
            except Exception:
                # The database is down, or a bug: log it and try again next round.
                log.exception("monitoring: evaluating the alert rules failed")

    # --- ingest ---

    def observe(self, samples: Sequence[tuple[str, Telemetry]]) -> None:
        """Fold new samples, each (device, sample), into the devices' time series (call in
        the ingest batch: one registry call for all of them)."""
        now = self._clock()
        points = []
        for device_id, sample in samples:
            found = observations(sample.metrics)
            if not found:
                continue
            at = sample.at
            # A device's clock is untrusted: a sample claiming a time outside what is kept
            # or far in the future is filed under its arrival.
            if not now - self.config.minute_retention_s <= at <= now + _CLOCK_SLACK_S:
                at = now
            points.append((device_id, at, found))
        if points:
            self.registry.record_metrics(points)

    # --- alerts ---

    def raise_alert(self, kind: str, key: str, summary: str,
                    detail: Mapping[str, Any] | None = None) -> None:
        """Raise alert (kind, key). The first raise notifies the webhooks and logs
        ``alert.firing``; repeats while it fires are counted, not sent."""
        self._deliver(self.registry.raise_alert(kind, key, summary, detail or {}))

    def resolve_alert(self, kind: str, key: str) -> None:
        """Resolve alert (kind, key): notifies and logs ``alert.resolved`` if it fired."""
        self._deliver(self.registry.resolve_alert(kind, key))

    def _deliver(self, notice: Notice | None) -> None:
        if notice is not None:
            log.info("alert %s: %s/%s: %s", notice.alert.state, notice.alert.kind,
                     notice.alert.key, notice.alert.summary)
            self.notifier.send(notice)

    def evaluate_once(self) -> None:
        """One round: the rules, the rollout events, and (every few minutes) compaction."""
        now = self._clock()
        self._follow_events()
        rules = self.config.rules
        conditions = evaluate(rules, self._view(now))
        for c in conditions:
            self.raise_alert(c.kind, c.key, c.summary, c.detail)
        self._resolve_cleared({r.kind for r in rules} - {"rollout_halted"}, conditions)
        if now - self._last_compact >= _COMPACT_EVERY_S:
            self._last_compact = now
            rolled, dropped = self.registry.compact_metrics(
                minutes_before=now - self.config.minute_retention_s,
                hours_before=now - self.config.hour_retention_s)
            pruned = self.registry.prune_telemetry(
                before=now - self.config.telemetry_retention_s)
            if rolled or dropped or pruned:
                log.debug("time series: %d minute point(s) rolled up, %d hour point(s) "
                          "expired; %d sample(s) past their retention deleted", rolled,
                          dropped, pruned)
        self.evaluations += 1

    def _resolve_cleared(self, kinds: set[str], conditions: list[Condition]) -> None:
        holding = {(c.kind, c.key) for c in conditions}
        for kind in sorted(kinds):
            for alert in self.registry.alerts(firing_only=True, kind=kind):
                if (alert.kind, alert.key) not in holding:
                    self.resolve_alert(alert.kind, alert.key)

    def _view(self, now: float) -> FleetView:
        devices = self.registry.device_presence()
        drift: dict[float, list[Totals]] = {}
        errors: dict[float, list[Totals]] = {}
        for rule in self.config.rules:
            # Points are whole minutes: the window starts at the minute holding
            # now - window_s, so a sample stays in it for at least window_s (a window cut at
            # now - window_s dropped a minute's point at the next minute boundary, and a
            # condition that held resolved and fired again every minute).
            since = math.floor((now - rule.window_s) / MINUTE) * MINUTE
            if rule.kind == "drift" and rule.window_s not in drift:
                drift[rule.window_s] = self.registry.metric_totals(
                    since=since, until=now + _CLOCK_SLACK_S, by=("device", "group", "model"))
            elif rule.kind == "error_rate" and rule.window_s not in errors:
                errors[rule.window_s] = self.registry.metric_totals(
                    since=since, until=now + _CLOCK_SLACK_S, by=("group", "model"))
        return FleetView(now, [DeviceSeen(*d) for d in devices],
                         drift, errors)

    def _skip_events(self) -> None:
        """Not leading: the leader follows the events; should this process take over, it
        goes on from here rather than alert what the old leader already did."""
        newest = self.registry.events(limit=1, newest=True)
        if newest:
            self._event_cursor = newest[0].id

    def _follow_events(self) -> None:
        if not any(r.kind == "rollout_halted" for r in self.config.rules):
            return
        events = self.registry.events(self._event_cursor, limit=_EVENTS_PER_ROUND)
        for event in events:
            self._event_cursor = event.id
            if not event.kind.startswith("rollout.") or event.device is not None:
                continue  # a device's events are stored as agent.*; only the server's count
            rollout = str(event.detail.get("rollout", event.detail.get("rollout_id", "?")))
            if event.kind == ROLLOUT_HALTED:
                d = event.detail
                # The controller's reason names the step, gate, value and bound.
                why = d.get("reason") or f"at step {d.get('step')}, no reason given"
                self.raise_alert("rollout_halted", rollout, f"rollout {rollout} halted: {why}",
                                 dict(d))
            elif event.kind in ROLLOUT_RESOLVING:
                self.resolve_alert("rollout_halted", rollout)

    # --- queries ---

    def overview(self) -> Overview:
        """Devices online, versions per group, convergence, now."""
        return overview(self.registry.list_devices(), self._clock(), self.offline_after_s)

    def totals(self, window_s: float, by: tuple[str, ...],
               where: Mapping[str, Any] | None = None) -> list[Totals]:
        """Totals over the last ``window_s`` seconds per ``by``."""
        now = self._clock()
        return self.registry.metric_totals(since=now - window_s, until=now + _CLOCK_SLACK_S,
                                           by=by, where=where)

    def series(self, window_s: float, step: int,
               where: Mapping[str, Any] | None = None) -> list[Totals]:
        """Totals per ``step`` seconds over the last ``window_s`` seconds."""
        now = self._clock()
        # Past the minute retention only hour points are left: a finer step would be gaps.
        if window_s > self.config.minute_retention_s:
            step = max(step, HOUR)
        return self.registry.metric_series(since=now - window_s, until=now + _CLOCK_SLACK_S,
                                           step=step, where=where)

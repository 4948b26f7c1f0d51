"""Alerts, pure: an alert's life (firing, raised again, resolved) and the rules' conditions.

An alert is named by (kind, key): ``("drift", "digits")``, ``("offline", "gw-7")``. While it
fires, raising it again only counts (``raised``) and refreshes its summary: one
notification when it starts firing and one when it resolves, never a stream of them
(:func:`fire`, :func:`resolve`). :func:`evaluate` turns the configured rules and what the
registry says now (:class:`FleetView`) into the conditions that hold; the monitor raises
those and resolves the alerts of the same rules that no longer hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .config import AlertRule
from .series import Totals

__all__ = ["FIRING", "RESOLVED", "Alert", "Condition", "DeviceSeen", "FleetView", "Notice",
           "evaluate", "fire", "resolve"]

FIRING = "firing"
RESOLVED = "resolved"
#: A summary or detail longer than this is cut (alerts go to webhooks and the event log).
MAX_SUMMARY = 500


@dataclass(frozen=True)
class Alert:
    """The stored state of one alert."""

    kind: str
    key: str
    state: str
    summary: str
    detail: Mapping[str, Any]
    first_at: float
    last_at: float
    #: Times it was raised since it started firing.
    raised: int
    resolved_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The alert as the API and webhooks show it (schema ``Alert``)."""
        return {"kind": self.kind, "key": self.key, "state": self.state,
                "summary": self.summary, "detail": dict(self.detail),
                "first_at": self.first_at, "last_at": self.last_at, "raised": self.raised,
                "resolved_at": self.resolved_at}


@dataclass(frozen=True)
class Notice:
    """A notification to send: the alert as it is after the change."""

    alert: Alert

    def to_json(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {"status": self.alert.state, **self.alert.to_json()}


def fire(current: Alert | None, kind: str, key: str, summary: str, *,
         detail: Mapping[str, Any], now: float) -> tuple[Alert, Notice | None]:
    """Raise (kind, key): a notice if it was not firing, else only counted."""
    summary = summary[:MAX_SUMMARY]
    if current is None or current.state != FIRING:
        alert = Alert(kind, key, FIRING, summary, dict(detail), now, now, 1)
        return alert, Notice(alert)
    return replace(current, summary=summary, detail=dict(detail), last_at=now,
                   raised=current.raised + 1), None


def resolve(current: Alert | None, now: float) -> tuple[Alert | None, Notice | None]:
    """Resolve an alert: a notice if it was firing; nothing otherwise."""
    if current is None or current.state != FIRING:
        return current, None
    alert = replace(current, state=RESOLVED, last_at=now, resolved_at=now)
    return alert, Notice(alert)


@dataclass(frozen=True)
class Condition:
    """An alert that should fire now."""

    kind: str
    key: str
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceSeen:
    """What the offline rule needs of a device."""

    id: str
    group: str
    last_seen: float | None


@dataclass(frozen=True)
class FleetView:
    """What the rules read, gathered by the monitor at ``now``.

    ``drift[window_s]``: totals by (device, model) over the last ``window_s`` seconds;
    ``errors[window_s]``: totals by (group, model) over that window."""

    now: float
    devices: Sequence[DeviceSeen]
    drift: Mapping[float, Sequence[Totals]]
    errors: Mapping[float, Sequence[Totals]]


def evaluate(rules: Sequence[AlertRule], view: FleetView) -> list[Condition]:
    """The conditions the rules find true in ``view`` (``rollout_halted`` is event-driven
    and finds none here)."""
    found: dict[tuple[str, str], Condition] = {}
    for rule in rules:
        if rule.kind == "drift":
            conditions = _drift(rule, view.drift.get(rule.window_s, ()))
        elif rule.kind == "error_rate":
            conditions = _error_rate(rule, view.errors.get(rule.window_s, ()))
        elif rule.kind == "offline":
            conditions = _offline(rule, view)
        else:
            conditions = []
        for c in conditions:
            found.setdefault((c.kind, c.key), c)  # the first rule that matches speaks
    return list(found.values())


def _drift(rule: AlertRule, totals: Sequence[Totals]) -> list[Condition]:
    by_model: dict[str, list[tuple[str, float]]] = {}
    for t in totals:
        model, psi = str(t.key["model"]), t.drift_psi_max
        if psi is None or psi <= rule.psi or rule.model not in (None, model):
            continue
        if rule.group is not None and t.key.get("group") != rule.group:
            continue
        by_model.setdefault(model, []).append((str(t.key["device"]), psi))
    out = []
    for model, devices in sorted(by_model.items()):
        if len(devices) < rule.devices:
            continue
        devices.sort(key=lambda d: -d[1])
        worst = ", ".join(f"{d} (PSI {p:.2f})" for d, p in devices[:5])
        out.append(Condition("drift", model, f"input drift on model {model}: {len(devices)} "
                             f"device(s) above PSI {rule.psi:g} in the last "
                             f"{rule.window_s:g} s: {worst}",
                             {"model": model, "threshold": rule.psi,
                              "window_s": rule.window_s, "devices": len(devices),
                              "worst": [{"device": d, "psi": round(p, 4)}
                                        for d, p in devices[:20]]}))
    return out


def _error_rate(rule: AlertRule, totals: Sequence[Totals]) -> list[Condition]:
    out = []
    for t in totals:
        group, model = str(t.key["group"]), str(t.key["model"])
        rate = t.error_rate
        if rule.group not in (None, group) or rule.model not in (None, model):
            continue
        if rate is None or t.requests < rule.min_requests or rate <= rule.rate:
            continue
        out.append(Condition("error_rate", f"{group}/{model}",
                             f"error rate {rate:.1%} of model {model} in group {group} "
                             f"({t.errors} of {t.requests} requests in {rule.window_s:g} s; "
                             f"threshold {rule.rate:.1%})",
                             {"group": group, "model": model, "errors": t.errors,
                              "requests": t.requests, "rate": round(rate, 4),
                              "threshold": rule.rate, "window_s": rule.window_s}))
    return out


def _offline(rule: AlertRule, view: FleetView) -> list[Condition]:
    out = []
    for d in view.devices:
        if d.last_seen is None or rule.group not in (None, d.group):
            continue  # never connected: not lost, just not installed yet
        silent = view.now - d.last_seen
        if silent > rule.after_s:
            out.append(Condition("offline", d.id, f"device {d.id} (group {d.group}) not "
                                 f"heard from for {silent:.0f} s (threshold "
                                 f"{rule.after_s:g} s)",
                                 {"device": d.id, "group": d.group, "last_seen": d.last_seen,
                                  "after_s": rule.after_s}))
    return out

"""What the operator API's monitoring routes answer, from their query parameters.

:mod:`fleet_server.api` routes ``/api/overview``, ``/api/metrics``, ``/api/metrics/series``,
``/api/alerts`` and ``/metrics`` here; each function takes the query (name -> last value),
checks it (MonitoringError, answered 400) and returns the JSON body (or, for ``/metrics``,
the content type and text).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from fleet_server.errors import MonitoringError
from fleet_server.registry.metric_series import KEYS, MINUTE

from .monitor import Monitor
from .prometheus import CONTENT_TYPE, IngestFigures, exposition

__all__ = ["DEFAULT_BY", "alerts", "overview", "prometheus", "series", "totals"]

#: What ``/api/metrics`` sums by when not told.
DEFAULT_BY = ("group", "model", "version")
_MAX_WINDOW_S = 90 * 86400
_MAX_POINTS = 1440


class IngestState(Protocol):
    """What is read of the ingest thread."""

    @property
    def depth(self) -> int: ...

    lag_s: float


def overview(monitor: Monitor, ingest: IngestState) -> dict[str, Any]:
    """``GET /api/overview``: devices online, versions per group, convergence, firing
    alerts and ingest."""
    firing = monitor.registry.alerts(firing_only=True)
    return {**monitor.overview().to_json(),
            "alerts_firing": [a.to_json() for a in firing],
            "ingest": {"queue_depth": ingest.depth, "lag_s": round(ingest.lag_s, 4)}}


def totals(monitor: Monitor, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /api/metrics``: sums over ``window`` seconds per ``by`` (comma-separated)."""
    _known(query, {"window", "by", *KEYS})
    window = _int(query, "window", 3600, MINUTE, _MAX_WINDOW_S)
    text = query.get("by")
    by = DEFAULT_BY if text is None else tuple(k for k in text.split(",") if k)
    for key in by:
        if key not in KEYS:
            raise MonitoringError(f"by={key!r}: metrics are summed by "
                                  f"{', '.join(KEYS)} (comma-separated)")
    found = monitor.totals(window, by, _where(query))
    return {"window_s": window, "by": list(by), "totals": [t.to_json() for t in found]}


def series(monitor: Monitor, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /api/metrics/series``: sums per ``step`` seconds over ``window`` seconds."""
    _known(query, {"window", "step", *KEYS})
    window = _int(query, "window", 3600, MINUTE, _MAX_WINDOW_S)
    step = _int(query, "step", MINUTE, MINUTE, 86400)
    if step % MINUTE:
        raise MonitoringError(f"step={step}: use a whole number of minutes (60, 300, ...)")
    if window // step > _MAX_POINTS:
        raise MonitoringError(f"window={window} with step={step} makes more than "
                              f"{_MAX_POINTS} points; take a larger step")
    points = monitor.series(window, step, _where(query))
    return {"window_s": window, "step_s": step, "points": [p.to_json() for p in points]}


def alerts(monitor: Monitor, query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /api/alerts``: the firing alerts, or with ``state=all`` every alert."""
    _known(query, {"state", "kind", "limit"})
    state = query.get("state", "firing")
    if state not in ("firing", "all"):
        raise MonitoringError(f"state={state!r}: use firing (default) or all")
    found = monitor.registry.alerts(firing_only=state == "firing", kind=query.get("kind"),
                                    limit=_int(query, "limit", 1000, 1, 10_000))
    return {"alerts": [a.to_json() for a in found]}


def prometheus(monitor: Monitor, ingest: IngestState) -> tuple[str, bytes]:
    """``GET /metrics``: the content type and the exposition text."""
    return CONTENT_TYPE, exposition(
        monitor, lambda: IngestFigures(ingest.depth, ingest.lag_s))


def _where(query: Mapping[str, str]) -> dict[str, Any]:
    where: dict[str, Any] = {k: v for k, v in query.items() if k in KEYS and k != "version"}
    if "version" in query:
        where["version"] = _int(query, "version", 0, 0, 2**63 - 1)
    return where


def _known(query: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise MonitoringError(f"unknown query parameter(s) {', '.join(unknown)}; this route "
                              f"takes {', '.join(sorted(allowed))}")


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise MonitoringError(f"{name}={text!r} is not an integer") from None
    if not low <= value <= high:
        raise MonitoringError(f"{name}={value} is outside {low}..{high}")
    return value

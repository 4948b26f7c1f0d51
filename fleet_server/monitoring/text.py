"""Monitoring figures as the ``fleet`` commands print them (pure: JSON in, text out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METRICS_HEADERS", "alert_lines", "device_lines", "metrics_rows"]

METRICS_HEADERS = ("GROUP", "MODEL", "VERSION", "DEVICES", "REQUESTS", "ERRORS", "P50 MS",
                   "P99 MS", "DRIFT PSI", "KS")


def metrics_rows(totals: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per (group, model, version) of ``GET /api/metrics``' totals."""
    return [[str(t.get("group", "*")), str(t.get("model", "*")), _v(t.get("version")),
             str(t["devices"]), str(t["requests"]), _errors(t), _ms(t, "p50"), _ms(t, "p99"),
             _num(t["drift"]["psi_max"]), _num(t["drift"]["ks_max"])] for t in totals]


def device_lines(totals: Sequence[Mapping[str, Any]], window_s: int) -> list[str]:
    """``fleet device show``'s lines for the device's totals per model version."""
    if not totals:
        return [f"metrics    no telemetry in the last {window_s // 60} min"]
    lines = [f"metrics    last {window_s // 60} min, per model version:"]
    for t in totals:
        drift = t["drift"]
        lines.append(f"  {t.get('model')} {_v(t.get('version'))}: {t['requests']} requests, "
                     f"errors {_errors(t)}, latency p50 {_ms(t, 'p50')} ms p99 "
                     f"{_ms(t, 'p99')} ms, drift PSI {_num(drift['psi_max'])} (max) "
                     f"KS {_num(drift['ks_max'])}")
    return lines


def alert_lines(alerts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The firing alerts, one line each."""
    if not alerts:
        return ["alerts     none firing"]
    return [f"ALERT {a['kind']} {a['key']}: {a['summary']} (x{a['raised']})" for a in alerts]


def _v(version: object) -> str:
    return "*" if version is None else "-" if version == 0 else f"v{version}"


def _errors(t: Mapping[str, Any]) -> str:
    rate = t.get("error_rate")
    return f"{t['errors']}" + ("" if rate is None else f" ({rate:.1%})")


def _ms(t: Mapping[str, Any], q: str) -> str:
    value = t["latency_ms"].get(q)
    return "-" if value is None else f"{value:.3g}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"

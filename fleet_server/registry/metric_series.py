"""Monitoring's time series: observations summed per device, model version and time bucket.

:func:`record` adds one sample's observations to their minute points (an upsert that adds,
so samples of one device handled by two server processes both count); :func:`totals` and
:func:`series` sum the points again per device, group, profile, model or version;
:func:`compact` rolls aged minute points into hour points and deletes what is past the
retention. Group and profile are the device's current ones (a device that moved counts
where it is now).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fleet_server.errors import RegistryError
from fleet_server.monitoring.samples import Observation
from fleet_server.monitoring.series import Totals

from .database import Tx
from .migrations.v5_monitoring import HIST_COLUMNS

__all__ = ["HOUR", "KEYS", "MINUTE", "compact", "record", "rollout_states", "series", "totals"]

MINUTE = 60
HOUR = 3600
#: What totals can be summed by, and the column each reads.
KEYS = {"device": "p.device_id", "group": "d.group_name", "profile": "d.profile",
        "model": "p.model", "version": "p.version"}
#: Rows a query may return, at most (a fleet-wide series by device would be unbounded).
MAX_ROWS = 10_000

_HIST = [f"h{i}" for i in range(HIST_COLUMNS)]
_COLUMNS = ["resolution", "bucket", "device_id", "model", "version", "samples", "requests",
            "errors", *_HIST, "psi_max", "ks_max", "psi_sum", "psi_n", "worst"]
_NEWER = ("excluded.psi_max IS NOT NULL AND (metric_points.psi_max IS NULL OR "
          "excluded.psi_max > metric_points.psi_max)")
_MERGE = ", ".join([
    *(f"{c} = metric_points.{c} + excluded.{c}"
      for c in ("samples", "requests", "errors", *_HIST, "psi_sum", "psi_n")),
    f"psi_max = CASE WHEN {_NEWER} THEN excluded.psi_max ELSE metric_points.psi_max END",
    f"worst = CASE WHEN {_NEWER} THEN excluded.worst ELSE metric_points.worst END",
    "ks_max = CASE WHEN excluded.ks_max IS NOT NULL AND (metric_points.ks_max IS NULL OR "
    "excluded.ks_max > metric_points.ks_max) THEN excluded.ks_max ELSE metric_points.ks_max "
    "END",
])
_CONFLICT = (" ON CONFLICT (resolution, bucket, device_id, model, version) DO UPDATE SET "
             + _MERGE)
_UPSERT = (f"INSERT INTO metric_points ({', '.join(_COLUMNS)}) VALUES "
           f"({', '.join('?' for _ in _COLUMNS)})" + _CONFLICT)
_SUMS = ", ".join(["SUM(p.samples)", "SUM(p.requests)", "SUM(p.errors)",
                   *(f"SUM(p.{h})" for h in _HIST), "MAX(p.psi_max)", "MAX(p.ks_max)",
                   "SUM(p.psi_sum)", "SUM(p.psi_n)", "COUNT(DISTINCT p.device_id)",
                   "MIN(p.bucket)", "MAX(p.bucket)"])


def record(tx: Tx, samples: Iterable[tuple[str, float, Iterable[Observation]]]) -> int:
    """Add each (device, time taken, observations) of ``samples`` to the device's minute
    points; returns how many upserts were made."""
    rows = []
    for device_id, at, observed in samples:
        bucket = int(at) - int(at) % MINUTE
        # One sample counts once per model version, whatever number of observations it gave.
        for obs in _merged(observed):
            hist = list(obs.latency_hist) or [0] * HIST_COLUMNS
            psi = obs.drift_psi
            rows.append((MINUTE, bucket, device_id, obs.model, obs.version, 1, obs.requests,
                         obs.errors, *hist, psi, obs.drift_ks, psi or 0.0,
                         0 if psi is None else 1,
                         obs.drift_worst if psi is not None else None))
    return tx.many(_UPSERT, rows)


def totals(tx: Tx, *, since: float, until: float, by: Sequence[str],
           where: dict[str, Any]) -> list[Totals]:
    """Points with a bucket in [since, until) summed per value of the ``by`` keys (any of
    :data:`KEYS`), only those matching ``where`` (key -> value), in key order."""
    group_sql = [_key(k) for k in by]
    rows = _select(tx, ", ".join([*group_sql, _SUMS]), since, until, where,
                   tail=f" GROUP BY {', '.join(group_sql)} ORDER BY {', '.join(group_sql)}"
                   if group_sql else "")
    return [_totals(dict(zip(by, row[:len(by)], strict=True)), row[len(by):])
            for row in rows if row[len(by)] is not None]


def series(tx: Tx, *, since: float, until: float, step: int,
           where: dict[str, Any]) -> list[Totals]:
    """Points with a bucket in [since, until) matching ``where``, summed per ``step``
    seconds (a multiple of a minute); each Totals' key is ``{"at": start of its step}``."""
    if step < MINUTE or step % MINUTE:
        raise RegistryError(f"step {step} s is not a whole number of minutes")
    # Integer division on both databases (bucket is an integer); "%" would clash with
    # psycopg's placeholders.
    at = f"p.bucket / {int(step)} * {int(step)}"
    rows = _select(tx, f"{at}, {_SUMS}", since, until, where,
                   tail=f" GROUP BY {at} ORDER BY {at}")
    return [_totals({"at": int(row[0])}, row[1:]) for row in rows]


def compact(tx: Tx, *, minutes_before: float, hours_before: float) -> tuple[int, int]:
    """Roll minute points older than ``minutes_before`` into hour points, delete hour points
    older than ``hours_before``; returns (minute points rolled up, hour points deleted).
    Hour points keep the largest drift but not which input it was in."""
    cutoff = int(minutes_before)
    sums = ", ".join([
        f"{HOUR}", f"bucket / {HOUR} * {HOUR}", "device_id", "model", "version",
        *(f"SUM({c})" for c in ("samples", "requests", "errors", *_HIST)),
        "MAX(psi_max)", "MAX(ks_max)", "SUM(psi_sum)", "SUM(psi_n)", "NULL"])
    tx.run(f"INSERT INTO metric_points ({', '.join(_COLUMNS)}) SELECT {sums} "
           f"FROM metric_points WHERE resolution = {MINUTE} AND bucket < ? "
           f"GROUP BY bucket / {HOUR} * {HOUR}, device_id, model, version" + _CONFLICT,
           (cutoff,))
    rolled = tx.run("DELETE FROM metric_points WHERE resolution = ? AND bucket < ?",
                    (MINUTE, cutoff))
    dropped = tx.run("DELETE FROM metric_points WHERE resolution = ? AND bucket < ?",
                     (HOUR, int(hours_before)))
    return rolled, dropped


def _merged(observed: Iterable[Observation]) -> list[Observation]:
    """One observation per (model, version): a sample names each model once, but two names
    could carry the same statistics version only through a device's mistake."""
    seen: dict[tuple[str, int], Observation] = {}
    for obs in observed:
        seen.setdefault((obs.model, obs.version), obs)
    return list(seen.values())


def _key(name: str) -> str:
    try:
        return KEYS[name]
    except KeyError:
        raise RegistryError(f"cannot sum metrics by {name!r}; use one of "
                            f"{', '.join(KEYS)}") from None


def _select(tx: Tx, columns: str, since: float, until: float, where: dict[str, Any], *,
            tail: str) -> list[tuple[Any, ...]]:
    conditions = ["p.bucket >= ?", "p.bucket < ?"]
    params: list[Any] = [float(since), float(until)]
    for name, value in sorted(where.items()):
        conditions.append(f"{_key(name)} = ?")
        params.append(value)
    return tx.all(f"SELECT {columns} FROM metric_points p JOIN devices d ON d.id = p.device_id "
                  f"WHERE {' AND '.join(conditions)}{tail} LIMIT {MAX_ROWS}", params)


def _totals(key: dict[str, Any], row: Sequence[Any]) -> Totals:
    samples, requests, errors = (int(v) for v in row[:3])
    hist = tuple(int(v) for v in row[3:3 + HIST_COLUMNS])
    psi_max, ks_max, psi_sum, psi_n, devices, first, last = row[3 + HIST_COLUMNS:]
    return Totals(key=key, samples=samples, requests=requests, errors=errors,
                  latency_hist=hist,
                  drift_psi_max=None if psi_max is None else float(psi_max),
                  drift_ks_max=None if ks_max is None else float(ks_max),
                  drift_psi_mean=float(psi_sum) / int(psi_n) if psi_n else None,
                  devices=int(devices), first=None if first is None else float(first),
                  last=None if last is None else float(last))


def rollout_states(tx: Tx) -> dict[str, int]:
    """Rollouts per status (schema v6's ``rollouts`` table)."""
    return {str(status): int(n) for status, n in
            tx.all("SELECT status, COUNT(*) FROM rollouts GROUP BY status ORDER BY status")}

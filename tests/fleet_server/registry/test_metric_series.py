"""Monitoring's time series and alert states in the registry, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from fleet_server.errors import RegistryError
from fleet_server.monitoring.samples import LATENCY_EDGES_MS, Observation
from fleet_server.registry import Registry
from tests.fleet_server.registry.helpers import Clock, enroll

T0 = 1_800_000_000  # a whole hour: 1_800_000_000 % 3600 == 0


def hist(**buckets: int) -> tuple[int, ...]:
    """A histogram with counts at the given bucket indexes (b0=.., b13=..)."""
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for name, count in buckets.items():
        counts[int(name[1:])] = count
    return tuple(counts)


def test_totals_sum_per_key_and_filter(reg: Registry) -> None:
    enroll(reg, "gw-1", group="lab")
    enroll(reg, "gw-2", group="lab")
    enroll(reg, "gw-3", group="field")
    reg.record_metrics([
        ("gw-1", T0 + 5, [Observation("digits", 2, 100, 1, hist(b4=100), 0.05, 0.02,
                                      "input:x")]),
        ("gw-1", T0 + 35, [Observation("digits", 2, 50, 4, hist(b5=50), 0.4, 0.3,
                                       "input:x")]),
        ("gw-2", T0 + 65, [Observation("digits", 1, 10, 0, hist(b8=10))]),
    ])
    reg.record_metrics([("gw-3", T0 + 65, [Observation("digits", 2, 30, 30, hist(b13=30),
                                                       0.1)])])
    (everything,) = reg.metric_totals(since=T0, until=T0 + 120)
    assert (everything.samples, everything.requests, everything.errors) == (4, 190, 35)
    assert everything.devices == 3
    assert everything.drift_psi_max == 0.4
    assert everything.drift_psi_mean == pytest.approx((0.05 + 0.4 + 0.1) / 3)
    by_group = {t.key["group"]: t for t in reg.metric_totals(since=T0, until=T0 + 120,
                                                             by=["group"])}
    assert by_group["lab"].requests == 160
    assert by_group["lab"].error_rate == pytest.approx(5 / 160)
    assert by_group["field"].error_rate == 1.0
    assert by_group["field"].latency_ms(0.5) == 1000.0  # overflow: the last edge
    by_version = reg.metric_totals(since=T0, until=T0 + 120, by=["model", "version"],
                                   where={"group": "lab"})
    assert [(t.key["version"], t.requests) for t in by_version] == [(1, 10), (2, 150)]
    # The first minute point of gw-1 holds both samples, merged.
    (minute,) = reg.metric_totals(since=T0, until=T0 + 60, by=["device"])
    assert minute.samples == 2
    assert minute.latency_hist == hist(b4=100, b5=50)
    assert minute.drift_ks_max == 0.3
    assert reg.metric_totals(since=T0 + 3600, until=T0 + 7200, by=["group"]) == []
    with pytest.raises(RegistryError, match="cannot sum metrics by 'color'"):
        reg.metric_totals(since=T0, until=T0 + 60, by=["color"])


def test_series_steps_and_compaction(reg: Registry) -> None:
    enroll(reg, "gw-1")
    for minute in range(180):  # three hours, one sample a minute, drift rising
        reg.record_metrics([("gw-1", T0 + minute * 60 + 1,
                             [Observation("digits", 1, 10, minute % 2, hist(b3=10),
                                          minute / 100)])])
    points = reg.metric_series(since=T0, until=T0 + 3 * 3600, step=600)
    assert len(points) == 18
    assert [p.requests for p in points] == [100] * 18
    assert points[0].key == {"at": T0}
    assert points[-1].drift_psi_max == pytest.approx(1.79)
    with pytest.raises(RegistryError, match="whole number of minutes"):
        reg.metric_series(since=T0, until=T0 + 60, step=90)
    before = reg.metric_totals(since=T0, until=T0 + 3 * 3600)[0]
    # Roll up the first two hours; nothing of the third.
    rolled, dropped = reg.compact_metrics(minutes_before=T0 + 7200, hours_before=T0 - 1)
    assert (rolled, dropped) == (120, 0)
    after = reg.metric_totals(since=T0, until=T0 + 3 * 3600)[0]
    assert (after.samples, after.requests, after.errors, after.latency_hist,
            after.drift_psi_max) == (before.samples, before.requests, before.errors,
                                     before.latency_hist, before.drift_psi_max)
    hourly = reg.metric_series(since=T0, until=T0 + 7200, step=3600)
    assert [p.requests for p in hourly] == [600, 600]
    # A late sample of an hour already rolled up merges into its hour point.
    reg.compact_metrics(minutes_before=T0 + 7200, hours_before=T0 - 1)
    assert reg.compact_metrics(minutes_before=T0 + 7200, hours_before=T0 + 3600) == (0, 1)
    assert reg.metric_totals(since=T0, until=T0 + 3 * 3600)[0].requests == 1200


def test_alerts_group_repeats_and_resolve(reg: Registry, clock: Clock) -> None:
    first = reg.raise_alert("drift", "digits", "drift on digits", {"devices": 1})
    assert first is not None
    assert first.alert.state == "firing"
    clock.now += 10
    assert reg.raise_alert("drift", "digits", "drift on digits (2)", {"devices": 2}) is None
    (alert,) = reg.alerts(firing_only=True)
    assert (alert.raised, alert.summary, alert.detail) == (2, "drift on digits (2)",
                                                           {"devices": 2})
    assert alert.first_at == clock.now - 10
    resolved = reg.resolve_alert("drift", "digits")
    assert resolved is not None
    assert resolved.alert.resolved_at == clock.now
    assert reg.resolve_alert("drift", "digits") is None
    assert reg.resolve_alert("offline", "never-fired") is None
    assert reg.alerts(firing_only=True) == []
    again = reg.raise_alert("drift", "digits", "back", {})
    assert again is not None
    assert again.alert.raised == 1
    kinds = [e.kind for e in reg.events() if e.kind.startswith("alert.")]
    assert kinds == ["alert.firing", "alert.resolved", "alert.firing"]
    assert [a.key for a in reg.alerts(kind="drift")] == ["digits"]


def test_rollout_states_count_rollouts_per_status(reg: Registry) -> None:
    assert reg.rollout_states() == {}
    with reg._tx(write=True) as tx:
        tx.many("INSERT INTO rollouts (id, model, status, created_at, updated_at, revision, "
                "state) VALUES (?, 'digits', ?, 0, 0, 1, '{}')",
                [("r1", "running"), ("r2", "halted"), ("r3", "running")])
    assert reg.rollout_states() == {"halted": 1, "running": 2}

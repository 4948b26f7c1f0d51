"""Alerts, pure: grouping while firing, resolving, and the rules' conditions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleet_server.monitoring.alerts import (
    FIRING,
    RESOLVED,
    Alert,
    DeviceSeen,
    FleetView,
    evaluate,
    fire,
    resolve,
)
from fleet_server.monitoring.config import AlertRule
from fleet_server.monitoring.series import Totals


def totals(key: dict[str, object], *, requests: int = 0, errors: int = 0,
           psi: float | None = None) -> Totals:
    return Totals(key, 1, requests, errors, (0,) * 14, psi, None, psi, 1)


@given(st.lists(st.sampled_from(["fire", "resolve"]), max_size=30))
def test_one_notice_per_change_of_state(actions: list[str]) -> None:
    alert: Alert | None = None
    notices = []
    now = 0.0
    for action in actions:
        now += 1
        if action == "fire":
            alert, notice = fire(alert, "drift", "digits", "s", detail={}, now=now)
        else:
            alert, notice = resolve(alert, now)
        if notice is not None:
            notices.append(notice.alert.state)
    # Notices alternate firing, resolved, firing... and start with firing.
    assert notices == [FIRING if i % 2 == 0 else RESOLVED for i in range(len(notices))]
    fires = [a for a in actions if a == "fire"]
    assert bool(notices) == bool(fires)
    if alert is not None and alert.state == FIRING:
        assert alert.raised >= 1


def test_rules() -> None:
    view = FleetView(
        now=1000.0,
        devices=[DeviceSeen("gw-1", "lab", 990.0), DeviceSeen("gw-2", "lab", 100.0),
                 DeviceSeen("gw-3", "lab", None)],
        drift={300.0: [totals({"device": "gw-1", "group": "lab", "model": "digits"}, psi=0.9),
                       totals({"device": "gw-2", "group": "lab", "model": "digits"}, psi=0.1),
                       totals({"device": "gw-1", "group": "lab", "model": "kws"}, psi=0.5)]},
        errors={300.0: [totals({"group": "lab", "model": "digits"}, requests=100, errors=10),
                        totals({"group": "lab", "model": "kws"}, requests=5, errors=5)]})
    rules = [AlertRule("drift", psi=0.25), AlertRule("drift", psi=0.25, devices=2),
             AlertRule("error_rate", rate=0.05, min_requests=20),
             AlertRule("offline", after_s=600), AlertRule("rollout_halted")]
    found = {(c.kind, c.key): c for c in evaluate(rules, view)}
    assert sorted(found) == [("drift", "digits"), ("drift", "kws"),
                             ("error_rate", "lab/digits"), ("offline", "gw-2")]
    assert found["drift", "digits"].detail["worst"] == [{"device": "gw-1", "psi": 0.9}]
    assert "10.0%" in found["error_rate", "lab/digits"].summary
    only_two = evaluate([AlertRule("drift", psi=0.25, devices=2)], view)
    assert only_two == []
    assert evaluate([AlertRule("drift", model="kws")], view)[0].key == "kws"

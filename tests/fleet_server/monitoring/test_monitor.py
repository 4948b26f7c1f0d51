"""The monitor over a real registry (SQLite and PostgreSQL) with a settable clock, and a
real webhook receiver: rules fire once, repeats are grouped, clearing resolves, rollout
halts become alerts, webhooks retry and never hold up the caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fleet_server.monitoring.config import AlertRule, MonitoringConfig, Webhook
from fleet_server.monitoring.monitor import Monitor
from fleet_server.registry import Registry
from protocol.messages import Telemetry
from tests.fleet_server.monitoring.receiver import Receiver, receiver
from tests.fleet_server.registry.helpers import Clock, enroll


def metrics(psi: float, requests: int = 10, errors: int = 0) -> dict[str, object]:
    return {"models": {"digits": {
        "version": 1, "requests": requests, "errors": errors,
        "latency_hist": [0, 0, 0, 0, requests] + [0] * 9,
        "monitor": {"version": 1, "drift": {"psi": psi, "ks": psi / 2,
                                            "worst": "input:x"}}}}}


def ingest(reg: Registry, monitor: Monitor, device: str, sample: Telemetry) -> None:
    """What the ingest thread does with a sample: store it, then fold it in."""
    assert reg.add_telemetry(device, [sample]) == 1
    monitor.observe([(device, sample)])


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with receiver() as r:
        yield r


def make_monitor(reg: Registry, clock: Clock, hook: Receiver, *rules: AlertRule) -> Monitor:
    config = MonitoringConfig(webhooks=(Webhook(hook.url, timeout_s=2, backoff_s=0.05),),
                              rules=rules)
    return Monitor(reg, config, offline_after_s=180, clock=clock)


def test_drift_fires_once_then_resolves(reg: Registry, clock: Clock, hook: Receiver) -> None:
    enroll(reg, "gw-1")
    enroll(reg, "gw-2")
    monitor = make_monitor(reg, clock, hook, AlertRule("drift", psi=0.25, devices=1,
                                                       window_s=300))
    monitor.start()
    try:
        ingest(reg, monitor, "gw-1", Telemetry(1, clock.now, metrics(0.05)))
        monitor.evaluate_once()
        assert reg.alerts() == []
        ingest(reg, monitor, "gw-2", Telemetry(1, clock.now, metrics(0.9)))
        for _ in range(3):  # raised three times while firing: one notice
            clock.now += 30
            monitor.evaluate_once()
        (firing,) = hook.wait_for(1)
        assert (firing["status"], firing["kind"], firing["key"]) == ("firing", "drift",
                                                                     "digits")
        assert firing["detail"]["worst"] == [{"device": "gw-2", "psi": 0.9}]
        (alert,) = reg.alerts(firing_only=True)
        assert alert.raised == 3
        clock.now += 400  # the window has passed: nothing drifts any more
        monitor.evaluate_once()
        _, resolved = hook.wait_for(2)
        assert resolved["status"] == "resolved"
        assert resolved["resolved_at"] == clock.now
        assert [e.kind for e in reg.events() if e.kind.startswith("alert.")] == [
            "alert.firing", "alert.resolved"]
    finally:
        monitor.stop()


def test_error_rate_offline_and_rollout_halted(reg: Registry, clock: Clock,
                                               hook: Receiver) -> None:
    enroll(reg, "gw-1", group="lab")
    monitor = make_monitor(reg, clock, hook, AlertRule("error_rate", rate=0.1,
                                                       min_requests=20),
                           AlertRule("offline", after_s=600), AlertRule("rollout_halted"))
    monitor.start()
    try:
        ingest(reg, monitor, "gw-1", Telemetry(1, clock.now, metrics(0.0, 50, 25)))
        reg.add_event("rollout.halted", detail={
            "rollout": "r-7", "step": 1, "gate": "agreement", "value": 0.6,
            "threshold": 0.95, "n": 200, "reason": "answers differ"})
        # A device cannot forge the server's rollout events (its own are agent.*).
        reg.add_event("rollout.halted", device="gw-1", detail={"rollout": "fake"})
        monitor.evaluate_once()
        got = {(b["kind"], b["key"]): b for b in hook.wait_for(2)}
        assert set(got) == {("error_rate", "lab/digits"), ("rollout_halted", "r-7")}
        assert got["rollout_halted", "r-7"]["summary"] == "rollout r-7 halted: answers differ"
        clock.now += 601
        monitor.evaluate_once()
        bodies = hook.wait_for(4)
        assert {(b["status"], b["kind"], b["key"]) for b in bodies[2:]} == {
            ("firing", "offline", "gw-1"), ("resolved", "error_rate", "lab/digits")}
        reg.add_event("rollout.resumed", detail={"rollout": "r-7"})
        monitor.evaluate_once()
        assert hook.wait_for(5)[-1]["status"] == "resolved"
        assert {a.kind for a in reg.alerts(firing_only=True)} == {"offline"}
    finally:
        monitor.stop()


def test_raise_alert_is_the_one_entry_for_other_components(reg: Registry, clock: Clock,
                                                           hook: Receiver) -> None:
    monitor = make_monitor(reg, clock, hook)
    monitor.start()
    try:
        for _ in range(5):
            monitor.raise_alert("rollout_halted", "r-1", "halted", {"step": 2})
        assert len(hook.wait_for(1)) == 1
        time.sleep(0.3)
        assert len(hook.bodies) == 1  # grouped, not spammed
        assert reg.alerts()[0].raised == 5
        monitor.resolve_alert("rollout_halted", "r-1")
        assert hook.wait_for(2)[-1]["status"] == "resolved"
    finally:
        monitor.stop()


def test_webhook_retries_with_backoff_and_never_blocks(reg: Registry, clock: Clock) -> None:
    with receiver(fail_first=2) as flaky:
        config = MonitoringConfig(
            # A time-out beyond the wait below: a caller that waited for this webhook
            # could not return before its held request is answered.
            webhooks=(Webhook(flaky.url, timeout_s=60, retries=3, backoff_s=0.05),
                      # Nothing listens there: every attempt fails.
                      Webhook("http://127.0.0.1:9/hook", timeout_s=0.5, retries=1,
                              backoff_s=0.05)),
            rules=())
        monitor = Monitor(reg, config, offline_after_s=180, clock=clock)
        monitor.start()
        try:
            # The webhook holds its first request unanswered: raise_alert returns all the
            # same (a DB write; delivery is the notifier thread's), which a caller waiting
            # for the webhook could not.
            flaky.answering.clear()
            returned = threading.Event()

            def raise_drift() -> None:
                monitor.raise_alert("drift", "digits", "drift", {})
                returned.set()

            raising = threading.Thread(target=raise_drift)
            raising.start()
            flaky.wait_arrived(1)
            assert returned.wait(30), "raise_alert waited for the webhook's answer"
            assert flaky.attempts == 0  # the request is still held
            flaky.answering.set()
            raising.join()
            (body,) = flaky.wait_for(1)
            assert flaky.attempts == 3
            assert body["key"] == "digits"
            deadline = time.monotonic() + 10
            notifier = monitor.notifier
            while not (notifier.failed and notifier.delivered) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (monitor.notifier.delivered, monitor.notifier.failed) == (1, 1)
        finally:
            monitor.stop()


def test_a_sample_time_outside_what_is_kept_is_filed_under_its_arrival(
        reg: Registry, clock: Clock, hook: Receiver) -> None:
    enroll(reg, "gw-1")
    monitor = make_monitor(reg, clock, hook)
    ingest(reg, monitor, "gw-1", Telemetry(1, 0.0, metrics(0.1)))  # 1970: a broken clock
    ingest(reg, monitor, "gw-1", Telemetry(2, clock.now + 10**6, metrics(0.1)))  # future
    ingest(reg, monitor, "gw-1", Telemetry(3, clock.now - 3600, metrics(0.1)))  # buffered
    (recent,) = reg.metric_totals(since=clock.now - 60, until=clock.now + 60)
    assert recent.samples == 2
    (hour_ago,) = reg.metric_totals(since=clock.now - 3700, until=clock.now - 3500)
    assert hour_ago.samples == 1


def test_compaction_prunes_samples_past_their_retention(reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-1")
    config = MonitoringConfig(rules=(), telemetry_retention_s=3600,
                              minute_retention_s=7200)
    monitor = Monitor(reg, config, offline_after_s=180, clock=clock)
    ingest(reg, monitor, "gw-1", Telemetry(1, clock.now - 5400, metrics(0.1)))
    ingest(reg, monitor, "gw-1", Telemetry(2, clock.now, metrics(0.1)))
    monitor.evaluate_once()
    assert [t.sample.seq for t in reg.telemetry("gw-1")] == [2]
    # The series still hold both samples' sums.
    assert reg.metric_totals(since=clock.now - 7200, until=clock.now + 60)[0].samples == 2


def test_a_sample_holds_its_alert_for_the_whole_window(reg: Registry, clock: Clock,
                                                       hook: Receiver) -> None:
    # Points are per minute; a window cut at now - window_s dropped a sample's minute at the
    # next minute boundary, resolving an alert seconds after it fired.
    enroll(reg, "gw-1")
    monitor = make_monitor(reg, clock, hook, AlertRule("drift", psi=0.25, devices=1,
                                                       window_s=60))
    monitor.start()
    try:
        clock.now = 60 * (clock.now // 60) + 56  # 4 s before a minute boundary
        ingest(reg, monitor, "gw-1", Telemetry(1, clock.now, metrics(0.9)))
        monitor.evaluate_once()
        fired_at = clock.now
        for later in (5.0, 30.0, 59.0):  # past the boundary, up to window_s after it
            clock.now = fired_at + later
            monitor.evaluate_once()
            assert [a.key for a in reg.alerts(firing_only=True)] == ["digits"], later
        clock.now = fired_at + 125  # two minutes on: resolved
        monitor.evaluate_once()
        assert reg.alerts(firing_only=True) == []
    finally:
        monitor.stop()


def test_only_the_leader_evaluates(reg: Registry, clock: Clock, hook: Receiver) -> None:
    # Several server processes share one registry (docs/scale.md): one evaluates the rules.
    enroll(reg, "gw-1")
    reg.set_online("gw-1", True)
    leading = [False]
    config = MonitoringConfig(webhooks=(Webhook(hook.url, timeout_s=2, backoff_s=0.05),),
                              rules=(AlertRule("offline", after_s=600),
                                     AlertRule("rollout_halted")),
                              evaluate_every_s=0.05)
    monitor = Monitor(reg, config, offline_after_s=180, clock=clock,
                      is_leader=lambda: leading[0])
    monitor.start()
    try:
        reg.add_event("rollout.halted", detail={"rollout": "r1", "reason": "gate"})
        clock.now += 3600  # gw-1 long offline
        time.sleep(0.5)
        assert (monitor.evaluations, reg.alerts()) == (0, [])
        # Taking over, it alerts the fleet as it is now, not the events the old leader
        # had already followed.
        leading[0] = True
        deadline = time.monotonic() + 10
        while monitor.evaluations == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [a.kind for a in reg.alerts(firing_only=True)] == ["offline"]
    finally:
        monitor.stop()


def test_device_presence_reads_what_the_offline_rule_needs(reg: Registry) -> None:
    enroll(reg, "gw-2", group="south")
    enroll(reg, "gw-1")
    reg.set_online("gw-2", True)
    (one, two) = reg.device_presence()
    assert one == ("gw-1", "lab", None)
    seen = reg.get_device("gw-2")
    assert seen is not None
    assert two == ("gw-2", "south", seen.last_seen)
    assert seen.last_seen is not None

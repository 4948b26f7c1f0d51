"""Monitoring end to end, every part a process: ``fleet serve`` with its embedded Mosquitto,
``edge-agent run`` with the default monitoring; the statistics reach the fleet server's
registry in the device's telemetry samples (models.digits.monitor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleet_server.registry import open_registry
from tests.agent.bundles import samples
from tests.fleet_server.live_fleet import DIGITS, GROUP, converged, live_fleet

pytestmark = pytest.mark.integration


def test_monitor_statistics_arrive_at_the_fleet_server(tmp_path: Path) -> None:
    with live_fleet(tmp_path) as fleet:
        state = fleet.state("gw-1")
        fleet.enroll("gw-1", fleet.token("--group", GROUP))
        fleet.run_agent("gw-1", state)
        bundle = fleet.build(1, DIGITS)
        fleet.fleet("publish", bundle, "--group", GROUP, "--data", fleet.data)
        fleet.wait(converged(fleet, ["gw-1"], 1), "v1 on gw-1")
        x = samples(40)
        for n in range(200):  # 5% sampled by default: about 10 requests
            fleet.infer(state, x[n % len(x):n % len(x) + 1])
        registry = open_registry(fleet.data / "fleet.db")

        def monitored() -> list[dict[str, Any]]:
            return [t.sample.metrics["models"]["digits"]["monitor"]
                    for t in registry.telemetry("gw-1")
                    if "monitor" in t.sample.metrics.get("models", {}).get("digits", {})]

        # Sampling is random: wait for an interval after the traffic (nothing sampled) so
        # that every sampled request has been reported.
        fleet.wait(lambda: (entries := monitored()) != [] and entries[-1]["sampled"] == 0
                   and sum(m["sampled"] for m in entries) > 0,
                   "telemetry with the sampled statistics, then an idle interval")
        entries = monitored()
        assert {m["version"] for m in entries} == {1}
        sampled = sum(m["sampled"] for m in entries)
        assert 1 <= sampled <= 40  # Binomial(200, 0.05): 10 +- 3
        logits = [m["outputs"]["logits"] for m in entries if m["sampled"]]
        assert all(o["kind"] == "classes" for o in logits)
        assert sum(sum(o["counts"]) for o in logits) == sampled
        assert all(0.0 < o["confidence_mean"] <= 1.0 for o in logits)
        # `fleet bundle build --model` carries no baseline: inputs are not binned, and
        # nothing has a drift score yet.
        assert all(m["inputs"] == {} and "drift" not in m for m in entries)

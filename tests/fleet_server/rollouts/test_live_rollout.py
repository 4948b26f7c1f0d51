"""Rollouts on a whole fleet of processes: ``fleet serve`` with its embedded Mosquitto and
real agents (``edge-agent run``). A version the agents cannot install (built for another
device kind) halts at the canary and nobody else is asked to run it; a good version goes
canary -> 100% and succeeds.

The agents on this branch do not yet report ``previous`` comparisons, so the agreement gate
is turned off here (``--gate agreement=off``); the gates on installs, errors, crashes and
latency are the defaults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet_server.live_fleet import DIGITS, GROUP, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration

DEVICES = ("gw-1", "gw-2", "gw-3")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as started:
        yield started


def test_a_bad_version_halts_at_the_canary_and_a_good_one_succeeds(fleet: LiveFleet) -> None:
    for device in DEVICES:
        fleet.enroll(device, fleet.token("--group", GROUP))
        fleet.run_agent(device, fleet.state(device))
    where = ("--data", fleet.data)
    fleet.fleet("publish", fleet.build(1, DIGITS), "--group", GROUP, *where)
    fleet.wait(converged(fleet, list(DEVICES), 1), "v1 everywhere")

    # v2 is for Raspberry Pis only: every agent here refuses it (another profile).
    v2 = fleet.home / "digits-2.efb"
    fleet.fleet("bundle", "build", "--name", "digits", "--version", "2", "--model", DIGITS,
                "--profile", "rpi5", "--keys", fleet.keys, "--out", v2)
    rollout = fleet.fleet("rollout", "start", v2, "--group", GROUP, "--steps", "30,100",
                          "--bake", "2s", "--gate", "agreement=off", *where).stdout.strip()
    done = fleet.fleet("rollout", "status", rollout, "--wait", *where, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "HALTED at 30%" in done.stdout
    assert "gate install_failures<=0.05 failed" in done.stdout
    view = fleet.api.get(f"/api/rollouts/{rollout}")
    canary = set(view["steps"][0]["devices"])
    assert len(canary) == 1
    fleet.wait(converged(fleet, list(DEVICES), 1), "every device desired at v1 again")
    for device in DEVICES:
        events = [e for e in fleet.api.get("/api/events", {"device": device})["events"]
                  if e["kind"] == "desired.set" and (e["detail"]["after"] or {}).get(
                      "version") == 2]
        assert bool(events) == (device in canary), (device, events)

    v3 = fleet.build(3, DIGITS)
    rollout = fleet.fleet("rollout", "start", v3, "--group", GROUP, "--steps", "30,100",
                          "--bake", "2s", "--gate", "agreement=off", *where).stdout.strip()
    done = fleet.fleet("rollout", "status", rollout, "--wait", *where, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCEEDED" in done.stdout
    fleet.wait(converged(fleet, list(DEVICES), 3), "v3 everywhere")
    assert fleet.fleet("audit", "verify", *where).returncode == 0

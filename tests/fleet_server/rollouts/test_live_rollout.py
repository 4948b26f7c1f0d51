"""Rollouts on a whole fleet of processes: ``fleet serve`` with its embedded Mosquitto and
real agents (``edge-agent run``). A version the agents cannot install (built for another
device kind) halts at the canary and nobody else is asked to run it; a good version goes
canary -> 100% and succeeds.

The agents on this branch do not yet report ``previous`` comparisons, so the agreement gate
is turned off here (``--gate agreement=off``); the gates on installs, errors, crashes and
latency are the defaults."""

from __future__ import annotations

import time
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


def _running(fleet: LiveFleet, device: str) -> int | None:
    """The digits version ``device`` reports serving."""
    model = fleet.devices()[device]["reported"].get("models", {}).get("digits") or {}
    version = model.get("version")
    return version if isinstance(version, int) else None


def test_a_device_restarted_mid_rollout_gets_its_previous_version_re_released(
        fleet: LiveFleet) -> None:
    """An agent killed and restarted while it runs the candidate no longer holds its
    previous version: the halt its crash causes asks it for v1, which it refuses as a
    downgrade, and the server re-releases v1 as v3 for it; the other device switches back
    to the v1 it kept loaded."""
    devices = ["gw-1", "gw-2"]
    for device in devices:
        fleet.enroll(device, fleet.token("--group", GROUP))
        fleet.run_agent(device, fleet.state(device))
    where = ("--data", fleet.data)
    fleet.fleet("publish", fleet.build(1, DIGITS), "--group", GROUP, *where)
    fleet.wait(converged(fleet, devices, 1), "v1 everywhere")
    rollout = fleet.fleet("rollout", "start", fleet.build(2, DIGITS), "--group", GROUP,
                          "--steps", "100", "--bake", "1h", "--gate", "agreement=off",
                          *where).stdout.strip()
    fleet.wait(lambda: all(_running(fleet, d) == 2 for d in devices), "v2 on both devices")
    time.sleep(5)  # a telemetry sample or two of v2 (interval 2 s) before the crash

    crashed = fleet.processes.pop("gw-1")
    crashed.kill()
    crashed.wait()
    fleet.run_agent("gw-1", fleet.state("gw-1"))
    fleet.wait(lambda: fleet.api.get(f"/api/rollouts/{rollout}")["state"] == "halted",
               "the rollout to halt on the crash", 90)
    view = fleet.api.get(f"/api/rollouts/{rollout}")
    assert view["reason"]["gate"].startswith("crash_rate"), view["reason"]

    fleet.wait(lambda: _running(fleet, "gw-2") == 1, "gw-2 back on its kept v1")
    fleet.wait(lambda: _running(fleet, "gw-1") == 3, "gw-1 on v1 re-released as v3", 120)
    fleet.wait(converged(fleet, ["gw-1"], 3), "gw-1 converged at v3")
    assert fleet.devices()["gw-2"]["desired"]["digits"]["version"] == 1
    events = [e for e in fleet.api.get("/api/events")["events"]
              if e["kind"] == "rollout.rereleased"]
    assert [(e["detail"]["devices"], e["detail"]["version"]) for e in events] == [
        (["gw-1"], 3)]
    assert fleet.api.get(f"/api/rollouts/{rollout}")["state"] == "halted"
    assert fleet.fleet("audit", "verify", *where).returncode == 0

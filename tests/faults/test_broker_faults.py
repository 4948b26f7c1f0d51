"""The embedded broker killed again and again, or frozen as a half-open link, in a live fleet.

Issue 10 item 1: a killed Mosquitto stayed dead while ``fleet devices`` showed every device
online and ``fleet publish`` exited 0 having delivered nothing. Now the server restarts it
with back-off; while it is down devices show online unknown and a publish says it was not
delivered (exit 1); once it is back the devices reconnect and the stored desired state
reaches them. A frozen broker (SIGSTOP: every TCP connection stays up and nothing answers,
as on a cut link) stalls the next rollout, which then completes. One device is enough for
all of it (``test_network_cut.py`` has a second, unaffected one). Each test ends with the fleet
converged, every install event and telemetry sample at the server or counted as dropped,
and nothing left on disk.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.bundles import samples
from tests.faults.fleet_faults import (
    check_events,
    check_nothing_leaked,
    check_telemetry,
    frozen,
    histories,
    join,
    kill_9,
    publish,
    running_broker,
)
from tests.fleet_server.live_fleet import DIGITS, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration
DEVICES = ["gw-1"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as started:
        yield started


def _status(fleet: LiveFleet) -> dict[str, object]:
    return fleet.api.get("/api/status")  # type: ignore[no-any-return]


def _end_state(fleet: LiveFleet, states: dict[str, Path], version: int, since: float) -> None:
    """Converged on ``version``; events complete; telemetry since ``since`` accounted for;
    nothing leaked."""
    fleet.wait(converged(fleet, DEVICES, version), f"v{version} on every device")
    for device, state in states.items():
        check_events(fleet, device, state)
        check_nothing_leaked(state)
        check_telemetry(fleet, device, since)


def test_a_broker_killed_again_and_again_then_frozen(
        fleet: LiveFleet) -> None:
    states = {d: join(fleet, d) for d in DEVICES}
    publish(fleet, fleet.build(1, DIGITS))
    fleet.wait(converged(fleet, DEVICES, 1), "v1")
    v2 = fleet.build(2, DIGITS)
    since = time.time()

    # Killed as soon as it is back, three times: the back-off doubles (1, 2, 4 s)...
    pid = running_broker(fleet)
    for restarts in range(1, 4):
        os.kill(pid, signal.SIGKILL)
        fleet.wait(lambda n=restarts: _status(fleet)["broker"]["restarts"] == n,  # type: ignore[misc, index]
                   f"restart {restarts} of the broker", timeout=30)
        pid = running_broker(fleet)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    # ...so the fourth kill leaves it down for 8 s: the server says so.
    fleet.wait(lambda: _status(fleet)["mqtt_connected"] is False, "the server to see it")
    listed = fleet.api.get("/api/devices")
    assert listed["broker_connected"] is False
    assert [d["online"] for d in listed["devices"]] == [None]  # unknown, not online
    refused = publish(fleet, v2, check=False)
    # The publish ended with the broker still down (a state, not a clock: under load the
    # publish's own process start can take seconds).
    restarts = _status(fleet)["broker"]["restarts"]  # type: ignore[index]
    assert restarts == 3, "the broker was back before the publish ended"
    assert refused.returncode == 1, refused.stdout
    assert "stored but not delivered" in refused.stderr
    # The agents serve on meanwhile.
    for state in states.values():
        assert fleet.infer(state, samples(1)).shape == (1, 10)

    fleet.wait(lambda: _status(fleet)["mqtt_connected"] is True, "the broker's 4th restart",
               timeout=30)
    assert _status(fleet)["broker"]["restarts"] == 4  # type: ignore[index]
    # The desired state stored while it was down reaches every device.
    fleet.wait(lambda: all(d["online"] for d in fleet.devices().values()),
               "the devices to reconnect")
    fleet.wait(converged(fleet, DEVICES, 2), "v2 on every device")

    # Frozen (SIGSTOP) for 6 s (longer than a chunk request's time-out) while the device
    # installs v3: a half-open link for every client. The local API answers throughout;
    # the fetch completes once the link is back.
    publish(fleet, fleet.build(3, DIGITS))
    fleet.wait(lambda: len(histories(states["gw-1"])) == 3, "gw-1 to start installing v3")
    with frozen(running_broker(fleet)):
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            for state in states.values():
                assert fleet.infer(state, samples(1)).shape == (1, 10)
            time.sleep(1.0)
    _end_state(fleet, states, 3, since)

    # The last will says when the connection it covers was made (item 9: it carried the
    # agent's start time), here after the broker's last restart.
    kill_9(fleet, "gw-1")
    fleet.wait(lambda: any(e["kind"] == "agent.offline" and "connected_at" in e["detail"]
                           for e in fleet.api.get("/api/events?device=gw-1")["events"]),
               "gw-1's last will")
    will = [e for e in fleet.api.get("/api/events?device=gw-1")["events"]
            if e["kind"] == "agent.offline" and "connected_at" in e["detail"]][-1]
    assert will["detail"]["connected_at"] > killed_at

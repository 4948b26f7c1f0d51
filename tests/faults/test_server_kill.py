"""``kill -9`` of ``fleet serve`` mid-rollout, in a live fleet.

Issue 10 item 1: after kill -9 of the server its Mosquitto was left orphaned, and the
restarted server adopted it (its own broker died with "address already in use") and ran on
an unmanaged one that even outlived a clean stop. Now the broker dies with its server, the
restarted server starts its own on the same port, the devices reconnect and the rollout
converges with every install event once and every telemetry sample stored or counted, and a
clean stop takes the broker along.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.fleet_faults import (
    check_events,
    check_nothing_leaked,
    check_telemetry,
    histories,
    join,
    kill_9,
    pid_alive,
    publish,
    running_broker,
)
from tests.fleet_server.live_fleet import DIGITS, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration
DEVICES = ["gw-1", "gw-2"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as started:
        yield started


def test_a_server_killed_mid_rollout_restarts_and_converges(fleet: LiveFleet) -> None:
    states = {d: join(fleet, d) for d in DEVICES}
    publish(fleet, fleet.build(1, DIGITS))
    fleet.wait(converged(fleet, DEVICES, 1), "v1")
    since = time.time()
    port = fleet.api.get("/api/status")["broker_url"]

    publish(fleet, fleet.build(2, DIGITS))
    fleet.wait(lambda: len(histories(states["gw-1"])) == 2, "gw-1 to start installing v2")
    broker = running_broker(fleet)
    kill_9(fleet, "server")
    fleet.wait(lambda: not pid_alive(broker), "the broker to die with its server", 15)

    (fleet.data / "server.json").unlink()  # written again once the new server is up
    fleet.serve()
    restarted = running_broker(fleet)
    assert restarted != broker
    assert fleet.api.get("/api/status")["broker_url"] == port  # the devices' address
    fleet.wait(converged(fleet, DEVICES, 2), "v2 after the server's restart")
    for device, state in states.items():
        check_events(fleet, device, state)
        check_telemetry(fleet, device, since)
        check_nothing_leaked(state)

    fleet.stop("server")
    assert not pid_alive(restarted)  # a clean stop takes its broker along

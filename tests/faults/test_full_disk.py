"""A device whose disk fills up (a real tmpfs under its state directory), in a live fleet.

Issue 10 item 2: a full disk during a fetch killed the agent's MQTT thread, an install that
failed on ENOSPC never reached ``failed`` (hundreds of tracebacks a minute), and the agent
could not start again. Now, on a disk without room for the bundle, the install fails
``disk_full`` before fetching, once, the device stays connected serving the old version,
and the install is retried once there is room. A disk that fills while a bundle is being
verified, with the agent killed there and started again on the full disk: the agent
serves the old version at once, the staging fails for want of space, and once space is
freed the install completes. Samples the full disk kept out of the outbox are counted as
dropped; every install transition reaches the server once; nothing is left on disk.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.installer import CRASH_ENV, RESERVE_BYTES
from tests.faults.fleet_faults import (
    check_events,
    check_nothing_leaked,
    check_telemetry,
    fill,
    join,
    kill_9,
    publish,
    run_agent_without_run_file,
    serving,
    small_disk,
    wait_exited,
)
from tests.fleet_server.live_fleet import DIGITS, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration
DEVICE = "gw-1"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as started:
        yield started


def _installs(fleet: LiveFleet, state: str) -> list[dict[str, Any]]:
    """The details of the device's ``agent.install.STATE`` events, oldest first."""
    events = fleet.api.get(f"/api/events?device={DEVICE}&limit=1000")["events"]
    return [e["detail"] for e in events if e["kind"] == f"agent.install.{state}"]


def _tracebacks(fleet: LiveFleet) -> int:
    return fleet.log(DEVICE).count("Traceback")


def test_a_full_disk_at_fetch_stage_and_start(fleet: LiveFleet) -> None:
    with small_disk(fleet.state(DEVICE), 3 * RESERVE_BYTES >> 20) as disk:
        state = join(fleet, DEVICE, disk)
        publish(fleet, fleet.build(1, DIGITS))
        fleet.wait(converged(fleet, [DEVICE], 1), "v1")
        since = time.time()

        # At fetch: less free than the bundle plus the reserve. Refused before fetching.
        filler = fill(disk, leave=RESERVE_BYTES // 2)
        publish(fleet, fleet.build(2, DIGITS))
        fleet.wait(lambda: [d["version"] for d in _installs(fleet, "failed")] == [2],
                   "v2 to fail for want of space")
        assert _installs(fleet, "failed")[0]["reason"] == "disk_full"
        time.sleep(2.5)  # over a telemetry interval: still failed once, still connected
        assert len(_installs(fleet, "failed")) == 1
        assert fleet.devices()[DEVICE]["online"] is True
        assert serving(state) == 1
        filler.unlink()  # room again: the install is retried
        fleet.wait(converged(fleet, [DEVICE], 2), "v2 once there is room")

        # At stage and at start: the agent is killed while verifying v3, the disk fills
        # up completely, and the agent starts again on it.
        kill_9(fleet, DEVICE)
        fleet.run_agent(DEVICE, state, env={CRASH_ENV: "verifying"})
        publish(fleet, fleet.build(3, DIGITS))
        assert wait_exited(fleet, DEVICE) == -signal.SIGKILL
        filler = fill(disk)
        # It serves without its run file (the other edge-agent commands cannot find it).
        client = run_agent_without_run_file(fleet, DEVICE, state)
        assert serving(state, client) == 2  # the old version at once, from a full disk
        fleet.wait(lambda: fleet.devices()[DEVICE]["online"] is True, "it to reconnect")
        time.sleep(2.5)
        assert serving(state, client) == 2
        assert _tracebacks(fleet) == 0, fleet.log(DEVICE)
        filler.unlink()
        fleet.wait(converged(fleet, [DEVICE], 3), "v3 once there is room")
        # The resumed install failed for want of space, and a new one made it.
        assert [d["reason"] for d in _installs(fleet, "failed")
                if d["version"] == 3] == ["disk_full"]

        assert _tracebacks(fleet) == 0, fleet.log(DEVICE)
        check_events(fleet, DEVICE, state)
        check_telemetry(fleet, DEVICE, since)
        check_nothing_leaked(state)
        fleet.stop(DEVICE)

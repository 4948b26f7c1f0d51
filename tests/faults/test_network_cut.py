"""One device's link cut mid-transfer, in a live fleet: the device in a network namespace
of its own, joined to the host by a veth pair whose rate ``tc tbf`` limits.

The link is slowed so the fetch takes seconds, then both ends go down for 8 s: every
packet is lost and the TCP connections stay established (a half-open link, shorter than
the MQTT keep-alive, so nobody notices but by silence; ``EDGEFLEET_FAULTS_LONG=1`` cuts
for 100 s, past the keep-alive, so the connection is given up and made again). A device
on the host installs meanwhile, unaffected; the cut device, whose one bundle chunk was on
the wire, gets it once the link is back (the TCP connection carries on, or the chunk is
asked for again). Both end converged, with every install event once, telemetry stored or
counted as dropped, nothing left on disk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.fleet_faults import (
    Link,
    can_make_links,
    check_events,
    check_nothing_leaked,
    check_telemetry,
    histories,
    long_run,
    own_link,
    publish,
    use_broker_at,
)
from tests.fleet_server.live_fleet import DIGITS, GROUP, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration
#: Longer than a chunk request's time-out; in the long run, longer than the MQTT keep-alive
#: (60 s, 90 s at the broker), so both ends give the connection up and the agent reconnects.
CUT_S = 100.0 if long_run() else 8.0


def _bundle_arrived(state: Path) -> bool:
    """Whether the newest install of the device in ``state`` got past its fetch."""
    return any(len(states) > 1 for states in histories(state).values()
               if "committed" not in states)


@pytest.fixture
def link() -> Iterator[Link]:
    reason = can_make_links()
    if reason is not None:
        pytest.skip(f"a device with its own link needs a network namespace: {reason}")
    with own_link() as made:
        yield made


@pytest.fixture
def fleet(tmp_path: Path, link: Link) -> Iterator[LiveFleet]:
    # The broker listens on every address and its certificate names the link's host side.
    with live_fleet(tmp_path, "--mqtt-bind", "0.0.0.0", "--broker-host", link.host_ip,
                    ) as started:
        yield started


def test_a_link_cut_mid_transfer(fleet: LiveFleet, link: Link) -> None:
    cut, near = fleet.state("gw-cut"), fleet.state("gw-near")
    for device, state in (("gw-cut", cut), ("gw-near", near)):
        fleet.enroll(device, fleet.token("--group", GROUP), state=state)
    use_broker_at(cut, link.host_ip)
    fleet.run_agent("gw-cut", cut, prefix=link.prefix)
    fleet.run_agent("gw-near", near)
    publish(fleet, fleet.build(1, DIGITS))
    fleet.wait(converged(fleet, ["gw-cut", "gw-near"], 1), "v1")
    since = time.time()

    link.limit("256kbit")  # the bundle (one 170 KB chunk) takes about 6 s
    publish(fleet, fleet.build(2, DIGITS))
    fleet.wait(lambda: len(histories(cut)) == 2, "gw-cut to start fetching v2")
    time.sleep(1.0)  # the chunk on the wire
    with link.cut():
        cut_at = time.monotonic()
        fleet.wait(converged(fleet, ["gw-near"], 2), "v2 on the device with its link")
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
        assert not _bundle_arrived(cut)  # nothing got through
        assert not converged(fleet, ["gw-cut"], 2)()
    fleet.wait(converged(fleet, ["gw-cut"], 2), "v2 on gw-cut once its link is back",
               CUT_S + 90)
    for device, state in (("gw-cut", cut), ("gw-near", near)):
        check_events(fleet, device, state)
        check_telemetry(fleet, device, since)
        check_nothing_leaked(state)

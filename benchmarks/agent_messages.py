"""What a real agent sends per install: the MQTT messages of one ``edge-agent run`` while
``fleet serve`` rolls a small model out to it (issue 16: the fleet simulator must send the
same, ``benchmarks/fleet_sim/device.py``).

A ``fleet serve`` (embedded Mosquitto) and one enrolled ``edge-agent run`` (probation 1 s,
telemetry every hour so that samples do not trigger reports here), started as separate
processes from this checkout's interpreter; the agent's interpreter logs every publish it
hands its MQTT client (a ``sitecustomize`` hook, :data:`_HOOK`). ``--installs`` times:
``fleet publish`` digits vN, wait until the registry shows the device converged and the
agent quiet for ``--settle`` seconds, and count the device's messages since the publish:
``events`` messages and the events they carry (a batch carries several), ``reported``
messages, chunk requests, with when each came (seconds after the publish).

Run::

    .venv/bin/python benchmarks/agent_messages.py --installs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol.messages import decode_events  # noqa: E402
from tests.fleet_server.live_fleet import (  # noqa: E402
    DIGITS,
    GROUP,
    PROFILE,
    converged,
    live_fleet,
)

DEVICE = "gw-1"


#: Imported by the agent's interpreter at start (``sitecustomize``, on PYTHONPATH): logs
#: each publish the agent hands its MQTT client, as JSON lines, to EDGEFLEET_PUBLISH_LOG.
#: (A monitoring subscriber cannot be used: the broker takes the certificate's CN as the
#: client id, so a second connection as the server would take over the server's.)
_HOOK = """
import json, os, time
from paho.mqtt.client import Client
_publish = Client.publish
def publish(self, topic, payload=None, *args, **kwargs):
    with open(os.environ["EDGEFLEET_PUBLISH_LOG"], "a") as log:
        log.write(json.dumps([time.time(), topic, (payload or b"").decode(errors="replace")])
                  + "\\n")
    return _publish(self, topic, payload, *args, **kwargs)
Client.publish = publish
"""


def read_log(path: Path) -> list[tuple[float, str, bytes]]:
    """(when, topic leaf, payload) of every publish logged by the hook."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        at, topic, payload = json.loads(line)
        found.append((at, topic.split(f"/devices/{DEVICE}/", 1)[1], payload.encode()))
    return found


def count(messages: list[tuple[float, str, bytes]], published: float) -> dict[str, Any]:
    """What the device sent since ``published``, per kind."""
    sent = [m for m in messages if m[0] >= published]
    events = [(at, decode_events(p)) for at, leaf, p in sent if leaf == "events"]
    return {
        "messages": dict(Counter(leaf for _, leaf, _ in sent)),
        "events": sum(len(e) for _, e in events),
        "event_messages": [[(round(at - published, 3), ev.kind) for ev in e]
                           for at, e in events],
        "reports_at": [round(at - published, 3) for at, leaf, _ in sent
                       if leaf == "reported"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds without a message from the device after converging")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, live_fleet(Path(tmp)) as fleet:
        state = fleet.state(DEVICE)
        fleet.agent("enroll", "--server", fleet.api.url,
                    f"--token={fleet.token('--group', GROUP)}", "--device-id", DEVICE,
                    "--state-dir", state, "--profile", PROFILE, "--port", "0",
                    "--probation", "1", "--telemetry-interval", "3600")
        hook = Path(tmp) / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_HOOK)
        log = Path(tmp) / "publishes.jsonl"
        fleet.run_agent(DEVICE, state, {"PYTHONPATH": str(hook),
                                        "EDGEFLEET_PUBLISH_LOG": str(log)})
        time.sleep(args.settle)  # the agent's start-up messages are not an install's
        totals: Counter[str] = Counter()
        for version in range(1, args.installs + 1):
            bundle = fleet.build(version, DIGITS)
            published = time.time()
            fleet.fleet("publish", bundle, "--group", GROUP, "--data", fleet.data)
            fleet.wait(converged(fleet, [DEVICE], version), f"v{version} converged")
            while time.time() - max(m[0] for m in read_log(log)) < args.settle:
                time.sleep(0.2)
            counted = count(read_log(log), published)
            print(f"install of v{version}: {json.dumps(counted)}")
            totals.update(counted["messages"])
            totals["events (carried)"] += counted["events"]
        print(f"per install, mean of {args.installs}: " + ", ".join(
            f"{k} {v / args.installs:.2f}" for k, v in sorted(totals.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

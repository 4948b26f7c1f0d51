"""Requests to the demo's agents from processes of their own, as apps on the devices would
send them: a closed loop through one agent while a step takes (:class:`Load`), or the
evaluation images, inverted for some, to several (:class:`Traffic`). Each runs the agent's
own client with numpy, which the server does not import."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .harness import Agent, Demo, DemoError

__all__ = ["Load", "Traffic"]


# A closed loop of requests through one agent's API, as an app on the device would send them,
# run with the agent's own client in its own process; it stops when the stop file appears
# and prints what it saw as JSON.
_LOAD_SCRIPT = """
import json, pathlib, sys, time
import numpy
from agent.daemon import find_running
state, x_file, stop = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
pause = float(sys.argv[4])
x = numpy.load(x_file)
ok = failed = 0
versions = []
with find_running(state).client(timeout=10) as client:
    while not stop.exists():
        try:
            client.infer("digits", {"input": x[(ok + failed) % len(x)][None]})
            ok += 1
        except Exception:
            failed += 1
        time.sleep(pause)
        if (ok + failed) % 50 == 0:
            version = client.model_metadata("digits")["versions"][0]
            if not versions or versions[-1] != version:
                versions.append(version)
print(json.dumps({"ok": ok, "failed": failed, "versions": versions}))
"""


class Load:
    """Requests to one agent for as long as a step takes."""

    def __init__(self, demo: Demo, agent: Agent, x: Path, pause_s: float = 0.0) -> None:
        """A closed loop of requests, ``pause_s`` apart (0: as fast as the agent answers)."""
        self.demo, self.agent = demo, agent
        self.stop = demo.workdir / f"load-{agent.device}.stop"
        self.stop.unlink(missing_ok=True)  # an earlier load's
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LOAD_SCRIPT, str(agent.state_dir), str(x), str(self.stop),
             str(pause_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self) -> None:
        """Stop the requests and show what the agent answered; DemoError if any failed."""
        self.stop.touch()
        out, _ = self.process.communicate(timeout=30)
        try:
            seen = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DemoError(f"the load on {self.agent.device} failed: {out[-2000:]}") from None
        print(f"    {self.agent.device} answered {seen['ok']} requests during the rollout, "
              f"{seen['failed']} failed; versions serving: "
              f"{' -> '.join('v' + v for v in seen['versions'])}")
        if seen["failed"]:
            raise DemoError(f"{seen['failed']} requests failed during the hot-swap")


# Requests of the evaluation images (inverted with "invert") through one agent's API, one
# at a time, until the stop file appears; prints how many as JSON.
_TRAFFIC_SCRIPT = """
import json, pathlib, sys, time
import numpy
from agent.daemon import find_running
state, data, invert, stop = (pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1",
                             pathlib.Path(sys.argv[4]))
x = numpy.load(data)["eval_x"]
if invert:
    x = (1.0 - x).astype(x.dtype)
sent = failed = 0
with find_running(state).client(timeout=10) as client:
    while not stop.exists():
        try:
            client.infer("digits", {"input": x[sent % len(x)][None]})
        except Exception:
            failed += 1
        sent += 1
print(json.dumps({"sent": sent, "failed": failed}))
"""


class Traffic:
    """Requests to several agents, each from its own process, until :meth:`finish`."""

    def __init__(self, demo: Demo, agents: list[Agent], data: Path, *,
                 inverted: tuple[str, ...] = ()) -> None:
        self.stop = demo.workdir / f"traffic-{time.monotonic_ns()}.stop"
        self.processes = {a.device: subprocess.Popen(
            [sys.executable, "-c", _TRAFFIC_SCRIPT, str(a.state_dir), str(data),
             "1" if a.device in inverted else "0", str(self.stop)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for a in agents}

    def finish(self) -> None:
        """Stop the requests and show how many each agent got."""
        self.stop.touch()
        for device, process in self.processes.items():
            out, _ = process.communicate(timeout=30)
            try:
                seen = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise DemoError(f"the traffic to {device} failed: {out[-2000:]}") from None
            print(f"    {device}: {seen['sent']} requests, {seen['failed']} failed")


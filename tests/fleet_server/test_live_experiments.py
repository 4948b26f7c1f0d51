"""An A/B experiment across the whole loop: `fleet serve` (embedded Mosquitto), `fleet
experiment` commands, and real agents (enrolled with `edge-agent enroll`, their fleet link,
runtime and experiments run in this process so that the test reads the device's learner):
the declaration reaches the devices and they serve by arm, the rewards they learn travel
as telemetry deltas to the server, the status shows n per arm, and the fleet's merged
posterior is pushed back to every device."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config_load import load_config
from agent.daemon import resolve_profile
from agent.experiments import DeviceExperiments
from agent.fleet_link import FleetLink
from agent.runtime import Runtime
from agent.telemetry import TelemetryCollector
from tests.fleet_server.live_fleet import DIGITS, GROUP, PROFILE, ROOT, LiveFleet, live_fleet

pytestmark = pytest.mark.integration

X = np.load(ROOT / "models" / "digits_data.npz")["eval_x"]
REWARD = {"a": 0.0, "b": 1.0}


class WithExperiments:
    """The agent's telemetry with the experiments block (what agent/telemetry.py does
    once it is given the device's experiments)."""

    def __init__(self, collector: TelemetryCollector, experiments: DeviceExperiments) -> None:
        self.collector = collector
        self.experiments = experiments

    def collect(self) -> Mapping[str, Any]:
        return {**self.collector.collect(), "experiments": self.experiments.report()}


@dataclass
class Device:
    name: str
    runtime: Runtime
    experiments: DeviceExperiments
    link: FleetLink


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as running:
        yield running


def _device(fleet: LiveFleet, name: str, stack: ExitStack) -> Device:
    state = fleet.state(name)
    fleet.enroll(name, fleet.token("--group", GROUP))
    config = load_config(state / "agent.toml")
    assert config.fleet is not None
    runtime = Runtime(config.state_dir, resolve_profile(PROFILE))
    experiments = DeviceExperiments(name, config.state_dir, rng=np.random.default_rng(1))
    link = FleetLink(runtime, config.fleet, experiments=experiments,
                     telemetry=WithExperiments(TelemetryCollector(runtime), experiments))
    link.start()
    stack.callback(runtime.close)
    stack.callback(link.stop)
    return Device(name, runtime, experiments, link)


def _build(fleet: LiveFleet, name: str) -> Path:
    out = fleet.home / f"{name}.efb"
    fleet.fleet("bundle", "build", "--name", name, "--version", "1", "--model", DIGITS,
                "--profile", PROFILE, "--keys", fleet.keys, "--out", out)
    return out


def _status(fleet: LiveFleet, name: str) -> dict[str, Any]:
    out = fleet.fleet("experiment", "status", name, "--json", "--data", fleet.data).stdout
    view: dict[str, Any] = json.loads(out)
    return view


def _serve(device: Device, requests: int) -> dict[str, int]:
    """Requests through the experiment, each rewarded by its arm; requests per arm."""
    before = {m: _requests(device, m) for m in ("digits", "digits-b")}
    for i in range(requests):
        _, rid = device.experiments.infer(device.runtime, "digits", {"input": X[i:i + 1]})
        served = next(m for m in ("digits", "digits-b") if _requests(device, m) > before[m])
        before[served] += 1
        arm = "a" if served == "digits" else "b"
        device.experiments.feedback("digits", json.dumps({"id": rid,
                                                          "reward": REWARD[arm]}).encode())
    return {"a": before["digits"], "b": before["digits-b"]}


def _requests(device: Device, model: str) -> int:
    return int(device.runtime.served(model).figures["requests"])


def test_an_ab_test_runs_through_the_fleet_and_the_devices_learn_together(
        fleet: LiveFleet) -> None:
    a, b = _build(fleet, "digits"), _build(fleet, "digits-b")
    with ExitStack() as stack:
        devices = [_device(fleet, name, stack) for name in ("gw-1", "gw-2")]
        out = fleet.fleet("experiment", "start", "--name", "ab1", "--group", GROUP,
                          "--variant", f"a={a}", "--variant", f"b={b}", "--split", "50,50",
                          "--unit", "request", "--data", fleet.data).stdout
        assert "experiment ab1 on digits: running (request units, split), 2 device(s)" in out

        def ready() -> bool:
            return all(_has(d, m) for d in devices for m in ("digits", "digits-b"))
        fleet.wait(ready, "both variants installed on both devices")
        fleet.wait(lambda: all(_in(d, "ab1") for d in devices), "the declaration")

        served = [_serve(d, 40) for d in devices]
        assert all(s["a"] > 5 and s["b"] > 5 for s in served), served  # by arm
        want = {arm: sum(s[arm] for s in served) for arm in ("a", "b")}

        def counted() -> bool:
            return {r["arm"]: r["n"] for r in _status(fleet, "ab1")["arms"]} == want
        fleet.wait(counted, f"the server counting {want} through telemetry")
        view = _status(fleet, "ab1")
        means = {r["arm"]: r["mean"] for r in view["arms"]}
        assert means == {"a": 0.0, "b": 1.0}
        assert view["verdict"] == "winner"
        assert view["winner"] == "b"
        text = fleet.fleet("experiment", "status", "ab1", "--data", fleet.data).stdout
        assert re.search(rf"\n  b +digits-b +{want['b']} +1\.0000 ", text), text
        assert "verdict: winner: b" in text

        # The merged posterior is pushed back: each device holds the whole fleet's counts,
        # its own once (nothing pending on top).
        def learnt_together() -> bool:
            return all({arm: s.n for arm, s in d.experiments.posterior("ab1").base.items()}
                       == want and not d.experiments.posterior("ab1").pending
                       for d in devices)
        fleet.wait(learnt_together, "the fleet's posterior on every device")

        out = fleet.fleet("experiment", "stop", "ab1", "--data", fleet.data).stdout
        assert "experiment ab1 on digits: stopped" in out
        fleet.wait(lambda: not any(_in(d, "ab1") for d in devices), "the experiment ending")
        assert all(set(d["desired"]) == {"digits"} for d in fleet.devices().values())
        assert "no experiment is named 'nope'" in fleet.fleet(
            "experiment", "status", "nope", "--data", fleet.data, check=False).stderr


def _has(device: Device, model: str) -> bool:
    return model in {m.name for m in device.runtime.models()}


def _in(device: Device, experiment: str) -> bool:
    try:
        device.experiments.posterior(experiment)
    except KeyError:
        return False
    return True

"""The server side of ``fleet demo --drift``, with a fake device: ``fleet serve`` in a child
process reads the config the demo writes (DATA/server.toml), a device publishes samples in
the contract's format over MQTT, and the drift alert reaches the demo's webhook within
DRIFT_ALERT_S, names the device, and shows in ``fleet metrics`` and the overview.

The whole demo with real agents (``fleet demo --drift``) runs in tests/fleet_server/demo/
test_demo.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_server.api_client import locate
from fleet_server.cli import main
from fleet_server.demo.drift import DRIFT_ALERT_S, DriftWatch
from protocol import messages
from tests.bundle.repo import Repo
from tests.fleet_server.monitoring.test_live_monitoring import drifting_metrics
from tests.fleet_server.server_env import wait_until, write_keys
from tests.fleet_server.test_cli_server import _device
from tests.mqtt_broker import require_mosquitto

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def watched(tmp_path: Path, repo: Repo) -> Iterator[tuple[Path, DriftWatch]]:
    require_mosquitto()
    data, keys = tmp_path / "server", write_keys(tmp_path / "keys", repo)
    watch = DriftWatch()
    watch.start()
    watch.write_config(data)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fleet_server", "serve", "--data", str(data), "--keys",
         str(keys), "--fleet", "demo", "--port", "0", "--mqtt-port", "0",
         "--mqtt-bind", "127.0.0.1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: (data / "server.json").exists() or process.poll() is not None,
                   "fleet serve to start", timeout=20)
        assert process.poll() is None, (tmp_path / "serve.log").read_text()
        yield data, watch
    finally:
        process.terminate()
        process.wait(timeout=30)
        watch.stop()


def test_drift_alert_within_the_stated_time(watched: tuple[Path, DriftWatch], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data, watch = watched
    api = locate(None, data)
    token = api.post("/api/enroll-tokens", {"group": "demo"})["token"]
    device, answer = _device(data, tmp_path, token)
    topic = f"edgefleet/{answer['fleet']}/devices/gw-1/telemetry"
    try:
        for seq in range(1, 4):
            device.publish(topic, messages.encode(messages.Telemetry(
                seq, time.time(), drifting_metrics(0.03))))
        wait_until(lambda: api.get("/api/metrics", {"window": 120})["totals"],
                   "the steady samples in the metrics")
        time.sleep(2)  # two evaluations: steady inputs fire nothing
        assert watch.alerts == []

        started = time.monotonic()
        device.publish(topic, messages.encode(messages.Telemetry(
            4, time.time(), drifting_metrics(0.7))))
        alert = watch.wait("drift", "digits", DRIFT_ALERT_S)
        assert alert is not None
        assert time.monotonic() - started < DRIFT_ALERT_S
        assert alert["detail"]["worst"][0]["device"] == "gw-1"
        firing = api.get("/api/overview")["alerts_firing"]
        assert [(a["kind"], a["key"]) for a in firing] == [("drift", "digits")]
        assert main(["metrics", "--data", str(data), "--window", "120"]) == 0
        out = capsys.readouterr().out
        assert "0.700" in out
        assert "ALERT drift digits" in out
    finally:
        device.close()

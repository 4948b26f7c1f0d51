"""benchmarks/scale_bench.py keeps working: 24 devices, two server processes on PostgreSQL,
a small bundle over MQTT chunks and over HTTP, telemetry with one and two processes.

The benchmark itself is run by hand and recorded in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.mqtt_broker import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_scale_bench_runs_small() -> None:
    require_mosquitto()
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / "scale_bench.py"),
         "--devices", "24", "--rollout", "4", "--bundle-bytes", "100000", "--idle", "1",
         "--timeout", "120"],
        capture_output=True, text=True, timeout=300, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    out = result.stdout
    assert "connected 24/24 devices" in out
    assert "rollout over MQTT chunks: 4/4 converged" in out
    assert "rollout over HTTP (the servers' bundle endpoints): 4/4 converged" in out
    assert "telemetry, 2 server processes: 48/48 samples stored" in out


def test_scale_bench_fleet_rollout_runs_small() -> None:
    require_mosquitto()
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / "scale_bench.py"),
         "--fleet-rollout", "--devices", "12", "--baseline", "4", "--bundle-bytes", "100000",
         "--telemetry", "0", "--idle", "0.5", "--timeout", "120"],
        capture_output=True, text=True, timeout=300, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    out = result.stdout
    assert "connected 16/16 devices" in out
    assert "rollout over HTTP, baseline group of 4: 4/4 converged" in out
    assert "rollout over HTTP, fleet of 12: 12/12 converged" in out
    assert "12/12 fetched over HTTP" in out
    assert "device errors 0" in out
    assert "not measured (fewer devices)" in out

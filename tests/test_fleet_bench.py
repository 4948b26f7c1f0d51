"""benchmarks/fleet_bench.py keeps working: a 5-device rollout through the real service.

The benchmark itself (1,000 devices, about a minute) is run by hand and recorded in
docs/benchmarks.md; this runs the same script small, so that it cannot rot.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet_server.registry import open_registry
from tests.mqtt_broker import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_fleet_bench_runs_a_small_rollout(tmp_path: Path) -> None:
    require_mosquitto()
    kept = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / "fleet_bench.py"),
         "--devices", "5", "--baseline", "1", "--timeout", "60", "--keep", str(kept)],
        capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    out = result.stdout
    assert "connected 6/6 devices (mutual TLS, subscribed)" in out
    assert "the broker counts 6 device connections" in out
    assert "base1: 1 device(s), converged 1;" in out
    assert "fleet: 5 device(s), converged 5;" in out
    assert "bundle bytes delivered 5.3 MB" in out
    assert "not measured (--devices 5 < 1,000)" in out
    # What the script measured is what the server's registry holds.
    with open_registry(kept / "server" / "fleet.db") as registry:
        devices = registry.list_devices()
        assert len(devices) == 6
        assert registry.unconverged() == []

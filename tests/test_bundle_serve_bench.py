"""benchmarks/bundle_serve_bench.py keeps working, and scale_bench.py's ``--mirror nginx``
(when nginx is installed): tiny runs of each.

The benchmarks themselves are run by hand and recorded in docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.mqtt_broker import require_mosquitto

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale_bench import nginx_binary  # noqa: E402


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-W", "error", *args], capture_output=True,
                            text=True, timeout=300, check=False, cwd=ROOT)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    return result.stdout


def test_bundle_serve_bench_runs_small() -> None:
    mirror = ["--mirror", "nginx"] if nginx_binary() else []
    out = _run(str(ROOT / "benchmarks" / "bundle_serve_bench.py"), "--devices", "6",
               "--downloads", "6", "--clients", "2", "--handshakes", "3", "--bundle-bytes",
               "100000", *mirror)
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert " 6/6 " in lines["endpoint GET"]
    assert lines["endpoint HEAD, resumed"].endswith("resumed 6")
    assert " 6/6 " in lines["floor GET (TLS only)"]
    assert "(9/9 resumed" in lines["handshake, 1 ticket (the endpoint)"]
    assert "(0/9 resumed" in lines["handshake, no ticket"]
    if mirror:
        assert " 6/6 " in lines["nginx GET (plain HTTP)"]


def test_scale_bench_rolls_out_through_an_nginx_mirror(tmp_path: Path) -> None:
    require_mosquitto()
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    out = _run(str(ROOT / "benchmarks" / "scale_bench.py"), "--fleet-rollout", "--devices",
               "8", "--baseline", "2", "--bundle-bytes", "100000", "--telemetry", "0",
               "--idle", "0.5", "--timeout", "120", "--mirror", "nginx", "--keep",
               str(tmp_path / "run"))
    assert "rollout over HTTP, fleet of 8: 8/8 converged" in out
    assert "device errors 0" in out
    assert ", nginx " in out  # its CPU is reported
    # Every device of both rollouts got the bundle whole from nginx, not the servers.
    served = [line for line in (tmp_path / "run" / "nginx" / "access.log").read_text()
              .splitlines() if '.efb HTTP/1.1" 200 ' in line]
    assert len(served) == 10

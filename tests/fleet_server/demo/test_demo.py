"""`fleet demo` runs the product's main job end to end and exits 0.

It runs once, with ``--drift``: the same acts plus the monitoring act (a drift alert at a
webhook), so the suite pays for one demo, not two."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleet_server.cli import main
from fleet_server.demo.drift import DRIFT_ALERT_S

pytestmark = pytest.mark.integration


def test_demo_passes_and_keeps_its_files(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--drift", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"demo passed: 1[67] steps", out)  # 15 (or 14) of the demo, 2 of drift
    # v1, then v2 hot-swapped under load without a failed request...
    assert re.search(r"gw-1 answered \d+ requests during the rollout, 0 failed; versions "
                     r"serving: v1 -> v2", out)
    # ...then every agent rejects the tampered v3 and keeps serving v2.
    for device in ("gw-1", "gw-2", "gw-3"):
        assert f"{device}: v3 failed: rejected:ChecksumError" in out
        assert re.search(rf"{device} +demo +x86-64-\w+ +yes +digits v3 +digits v2 committed "
                         r"\[v3 failed: rejected:ChecksumError\] +no", out)
    # Rollouts: a class-swapped v5 halted at the canary (or, with agents that report no
    # comparisons, the demo says so and aborts it), the audit log verified.
    assert ("canary" in out and "never received v5" in out) or (
        "the agents report no `previous` comparisons" in out)
    assert re.search(r"audit log verified: \d+ entries", out)
    # Monitoring: no alert on steady traffic; inverted images on gw-1 reach the webhook.
    assert "alerts     none firing" in out
    found = re.search(r"webhook \S+ got after ([\d.]+) s: input drift on model digits: "
                      r"1 device\(s\) above PSI 0.25 in the last 120 s: gw-1", out)
    assert found is not None, out[-3000:]
    assert float(found.group(1)) < DRIFT_ALERT_S
    assert (tmp_path / "keys" / "root.json").is_file()
    assert (tmp_path / "artifacts" / "report.json").is_file()
    assert (tmp_path / "server" / "fleet.db").is_file()
    assert not (tmp_path / "server" / "server.json").exists()  # the server was stopped
    assert not (tmp_path / "gw-1" / "agent.json").exists()  # and the agents

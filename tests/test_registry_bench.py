"""benchmarks/registry_bench.py keeps working: the smallest fleet it takes, on SQLite.

The benchmark itself (10,000 devices, both databases, SQLAlchemy beside it) is run by hand
and recorded in docs/benchmarks.md; this runs it small so that it cannot rot, including
its baseline, the v1 registry loaded from git history.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _has_v1_commit() -> bool:
    from benchmarks.registry_v1 import V1_COMMIT
    return subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{V1_COMMIT}^{{commit}}"],
                          capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _has_v1_commit(), reason="the baseline (v1 registry) is read from "
                    "git history, which this checkout lacks (a shallow clone)")
def test_registry_bench_runs_small() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / "registry_bench.py"),
         "--devices", "1000", "--repeat", "1", "--db", "sqlite"],
        capture_output=True, text=True, timeout=600, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout + result.stderr
    table = result.stdout.split("sqlite: best ms (ratio to v1)")[1].splitlines()
    assert table[1].split()[:3] == ["operation", "v1", "pool"]
    rows = {line.split()[0]: line for line in table[2:] if line.strip()}
    assert set(rows) >= {"ingest", "desired", "list"}
    assert "( 1.00x)" in rows["ingest"]  # v1 against itself

"""`fleet demo` runs the product's main job end to end and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.cli import main


def test_demo_passes_and_keeps_its_files(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo passed: 6 steps" in out
    assert "OK digits v1" in out
    assert "ChecksumError" in out
    assert (tmp_path / "keys" / "root.json").is_file()
    assert (tmp_path / "digits-1.efb").is_file()
    assert (tmp_path / "artifacts" / "report.json").is_file()

"""`edge-agent probe` on this real host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main


def test_probe_json_names_best_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["best_profile"] == result["matches"][0]["profile"]
    assert "CPUExecutionProvider" in result["host"]["onnxruntime_providers"]
    assert result["host"]["arch"] in {"x86_64", "aarch64", "armv7"}


def test_probe_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert "best profile: " in out
    assert "onnxruntime: " in out


def test_probe_with_no_profiles_is_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--profiles-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("edge-agent: error: ")

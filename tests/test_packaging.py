"""Packaging promises: console scripts answer --help, and the agent stays installable alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent

# Distributions the agent extra does not install; importing any of them from `agent` would
# break `pip install edgefleet[agent]` on a gateway.
NOT_IN_AGENT_EXTRA = ["compressor", "fleet_server", "onnx", "torch", "sklearn", "tensorflow",
                      "psycopg", "psycopg2", "tqdm"]


@pytest.mark.parametrize("script", ["edge-agent", "edge-compress", "fleet"])
def test_console_script_help(script: str) -> None:
    exe = Path(sys.executable).parent / script
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")
    assert "COMMAND" in result.stdout


def test_agent_imports_without_other_extras() -> None:
    # A meta-path finder that refuses the blocked top-level names stands in for a venv that
    # has only the agent extra; every agent module is imported under it.
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        BLOCKED = set({NOT_IN_AGENT_EXTRA!r})
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"agent imported {{name}}, which the agent extra lacks")
                return None
        sys.meta_path.insert(0, Block())
        import agent
        for mod in pkgutil.walk_packages(agent.__path__, "agent."):
            if not mod.name.endswith(".__main__"):  # runs the CLI when imported
                importlib.import_module(mod.name)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


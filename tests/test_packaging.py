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


def _import_every_agent_module_without(blocked: list[str]) -> str:
    """Code that stands in for a venv without ``blocked`` (a meta-path finder refuses those
    top-level names) and imports every agent module under it."""
    return textwrap.dedent(f"""
        import importlib, pkgutil, sys
        BLOCKED = set({blocked!r})
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"agent imported {{name}}, which is not installed")
                return None
        sys.meta_path.insert(0, Block())
        import agent
        for mod in pkgutil.walk_packages(agent.__path__, "agent."):
            if not mod.name.endswith(".__main__"):  # runs the CLI when imported
                importlib.import_module(mod.name)
    """)


def test_agent_imports_without_other_extras() -> None:
    code = _import_every_agent_module_without(NOT_IN_AGENT_EXTRA) + "print('ok')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(("missing", "model"), [
    (["ai_edge_litert", "tflite_runtime"], "digits_cnn.onnx"),  # the agent-onnx extra
    (["onnxruntime"], "digits_cnn.tflite"),  # the agent-litert extra
])
def test_the_agent_serves_with_one_runtime(missing: list[str], model: str) -> None:
    """With the other runtime absent (as under agent-onnx or agent-litert), every agent
    module imports and a model in the installed runtime's format is served."""
    code = _import_every_agent_module_without([*NOT_IN_AGENT_EXTRA, *missing]) + \
        textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np
        import tempfile
        from agent.runtime import Runtime
        with tempfile.TemporaryDirectory() as state:
            formats = sorted(Runtime(Path(state)).installer.formats)
        runtime = Runtime()
        info = runtime.load_file(Path("models/{model}"), "digits")
        x = np.load("models/digits_data.npz")["eval_x"][:2].astype(np.float32)
        out = runtime.infer("digits", {{info.inputs[0].name: x}})
        print(info.backend, formats, next(iter(out.values())).shape)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    backend, formats = (("onnxruntime:", "['onnx']") if model.endswith(".onnx")
                        else ("litert:", "['tflite']"))
    assert result.stdout.startswith(backend), result.stdout
    assert f" {formats} " in result.stdout  # the installer picks only variants it can serve
    assert result.stdout.strip().endswith("(2, 10)")

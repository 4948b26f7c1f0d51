"""The agent installed with one runtime: installed size, install time and RSS serving a model.

For each extra (``agent-onnx``, ``agent-litert``, and ``agent`` with both runtimes as the
baseline) a fresh virtual environment gets ``pip install '.[EXTRA]'`` from the local
registry (no cache), its size is measured (minus the empty venv's pip and setuptools), and
its ``edge-agent serve`` serves the digits model in the format of its runtime for 200
requests of 4 images, after which its RSS and peak RSS are read from /proc. Ratios are
against the baseline of the same run. docs/benchmarks.md ("Agent with one runtime") has
the results and the command:

    nice .venv/bin/python benchmarks/agent_footprint.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.client import AgentClient

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
#: extra -> the model file its runtime serves
EXTRAS = {"agent": "digits_cnn.onnx", "agent-onnx": "digits_cnn.onnx",
          "agent-litert": "digits_cnn.tflite"}
REQUESTS = 200


@dataclass(frozen=True)
class Footprint:
    extra: str
    install_s: float
    size_mb: float
    backend: str
    rss_mb: float
    peak_mb: float


def _du_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def measure(extra: str, work: Path) -> Footprint:
    venv = work / extra
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = _du_mb(venv)
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir",
                    f"{ROOT}[{extra}]"], check=True, capture_output=True)
    install_s = time.perf_counter() - start
    size = _du_mb(venv) - empty
    process = subprocess.Popen(
        [str(venv / "bin" / "edge-agent"), "serve", "--model", str(MODELS / EXTRAS[extra]),
         "--name", "digits", "--state-dir", str(work / f"{extra}-state"), "--port", "0",
         "--no-auth", "--profile", "x86-64-avx2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        url = re.search(r"http://[0-9.:]+", process.stdout.readline())
        assert url is not None, "the agent did not start"
        x = np.load(MODELS / "digits_data.npz")["eval_x"][:4].astype(np.float32)
        with AgentClient(url.group(0)) as client:
            backend = client.model_metadata("digits")["parameters"]["backend"]
            name = client.model_metadata("digits")["inputs"][0]["name"]
            for _ in range(REQUESTS):
                client.infer("digits", {name: x})
        time.sleep(1)
        status = Path(f"/proc/{process.pid}/status").read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)

    def kib(field: str) -> float:
        match = re.search(rf"{field}:\s+(\d+)", status)
        assert match is not None
        return int(match.group(1)) / 1024

    return Footprint(extra, install_s, size, backend, kib("VmRSS"), kib("VmHWM"))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as tmp:
        results = [measure(extra, Path(tmp)) for extra in EXTRAS]
    base = results[0]
    print(f"{'extra':14} {'install s':>9} {'size MB':>8} {'x base':>7} {'RSS MB':>7} "
          f"{'x base':>7} {'peak MB':>8}  backend")
    for r in results:
        print(f"{r.extra:14} {r.install_s:9.1f} {r.size_mb:8.1f} {r.size_mb / base.size_mb:7.2f} "
              f"{r.rss_mb:7.1f} {r.rss_mb / base.rss_mb:7.2f} {r.peak_mb:8.1f}  {r.backend}")


if __name__ == "__main__":
    main()

"""Measure one TFLite runtime package in the environment this script runs in.

Used to choose between ``ai-edge-litert`` and ``tflite-runtime`` (docs/architecture.md,
"TFLite runtime"). Run it with each candidate environment's interpreter, for example::

    python3 -m venv /tmp/litert && /tmp/litert/bin/pip install numpy==2.4.6 ai-edge-litert
    /tmp/litert/bin/python benchmarks/tflite_runtime_check.py --module ai_edge_litert

It reports: import time, whether the digits model runs and its accuracy, what a missing
delegate raises, and single-sample latency percentiles with one thread. It prints one JSON
object; a failure at any step is reported in the object, not raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MODELS = Path(__file__).resolve().parent.parent / "models"


def measure(module_name: str, iterations: int) -> dict[str, Any]:
    """Import ``module_name``.interpreter, run the digits model, time it."""
    result: dict[str, Any] = {"module": module_name, "python": sys.version.split()[0]}
    try:
        import numpy as np

        result["numpy"] = np.__version__
        started = time.perf_counter()
        interpreter_module = importlib.import_module(f"{module_name}.interpreter")
        result["import_ms"] = round((time.perf_counter() - started) * 1000, 1)
    except Exception as exc:  # the point is to record how the import fails
        result["import_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return result
    try:
        interpreter_module.load_delegate("libedgetpu.so.1")
    except Exception as exc:  # recorded: what a missing delegate looks like
        result["missing_delegate_raises"] = f"{type(exc).__name__}: {exc}"[:200]
    try:
        data = np.load(MODELS / "digits_data.npz")
        interpreter = interpreter_module.Interpreter(
            model_path=str(MODELS / "digits_cnn.tflite"), num_threads=1)
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        output = interpreter.get_output_details()[0]["index"]
        hits = 0
        for sample, label in zip(data["eval_x"], data["eval_y"], strict=True):
            interpreter.set_tensor(index, sample[None])
            interpreter.invoke()
            hits += int(interpreter.get_tensor(output).argmax() == label)
        result["accuracy"] = round(hits / len(data["eval_y"]) * 100, 2)
        sample = data["eval_x"][:1]
        durations = []
        for _ in range(iterations):
            start = time.perf_counter()
            interpreter.set_tensor(index, sample)
            interpreter.invoke()
            interpreter.get_tensor(output)
            durations.append((time.perf_counter() - start) * 1e6)
        durations.sort()
        result["latency_us_p50"] = round(statistics.median(durations), 1)
        result["latency_us_p99"] = round(durations[int(len(durations) * 0.99) - 1], 1)
    except Exception as exc:  # recorded: a runtime that imports but cannot run the model
        result["run_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return result


def main() -> None:
    """Print the measurement as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", required=True, choices=["ai_edge_litert", "tflite_runtime"])
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(measure(args.module, args.iterations)))


if __name__ == "__main__":
    main()

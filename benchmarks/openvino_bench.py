"""OpenVINO's execution provider on this machine's CPU against onnxruntime's own CPU provider.

Runs in an environment with onnxruntime-openvino (which replaces onnxruntime: the same
``onnxruntime`` module with OpenVINOExecutionProvider added). For each of the two committed
reference models, the digits CNN and the sentence encoder, both sessions are built (one
intra-op thread each, as the agent runs small models) and timed in the same run, taking
turns in rounds so load on the shared machine falls on both alike; outputs are compared.
OpenVINO runs with its own thread pool unless told otherwise, so it is measured both ways.
Prints p50 and p99 per request and the ratio to onnxruntime's CPU provider. docs/benchmarks.md
("OpenVINO on the CPU") has the result and the command:

    nice /tmp/ov-venv/bin/python benchmarks/openvino_bench.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = Path(__file__).resolve().parents[1] / "models"
ROUNDS = 20
PER_ROUND = 50


#: label -> (provider, its options)
CONFIGS = {
    "onnxruntime CPU": ("CPUExecutionProvider", {}),
    "OpenVINO CPU": ("OpenVINOExecutionProvider", {"device_type": "CPU"}),
    "OpenVINO CPU, 1 thread": ("OpenVINOExecutionProvider",
                               {"device_type": "CPU", "num_of_threads": "1"}),
}


def _session(path: Path, provider: str, provider_options: dict[str, str],
             ) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options,
                                   providers=[(provider, provider_options)])
    assert session.get_providers()[0] == provider, session.get_providers()
    return session


def _feeds(name: str) -> dict[str, np.ndarray]:
    data = np.load(MODELS / f"{name}_data.npz")
    if name == "digits":
        return {"input": data["eval_x"][:1].astype(np.float32)}
    return {"input_ids": data["eval_x/input_ids"][:1],
            "attention_mask": data["eval_x/attention_mask"][:1]}


def main() -> None:
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    print(f"{'model':14} {'provider':24} {'p50 us':>8} {'p99 us':>8} {'x CPU p50':>9}")
    for name, file in (("digits", "digits_cnn.onnx"), ("text_encoder", "text_encoder.onnx")):
        feeds = _feeds(name)
        sessions = {label: _session(MODELS / file, *config) for label, config in CONFIGS.items()}
        reference = sessions["onnxruntime CPU"].run(None, feeds)[0]
        deviation = max(float(np.max(np.abs(s.run(None, feeds)[0] - reference)))
                        for s in sessions.values())
        times: dict[str, list[float]] = {p: [] for p in sessions}
        for session in sessions.values():  # warm-up
            for _ in range(10):
                session.run(None, feeds)
        for _ in range(ROUNDS):
            for provider, session in sessions.items():
                for _ in range(PER_ROUND):
                    start = time.perf_counter()
                    session.run(None, feeds)
                    times[provider].append(time.perf_counter() - start)
        base = float(np.percentile(times["onnxruntime CPU"], 50))
        for label, samples in times.items():
            p50, p99 = np.percentile(samples, [50, 99]) * 1e6
            print(f"{name:14} {label:24} {p50:8.1f} {p99:8.1f} {p50 / 1e6 / base:9.2f}")
        print(f"{name:14} max |OpenVINO - CPU| = {deviation:.2e}")


if __name__ == "__main__":
    main()

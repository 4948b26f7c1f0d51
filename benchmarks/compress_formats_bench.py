"""Artifact formats and structured pruning on the digits CNN and the ViT, side by side.

Two sections (kept from the first compressor benchmark; compress_bench.py compares
edgefleet's choice with the peers):

- **pruning**: ``PruneChannels`` alone on the ViT at several ratios, no retraining, fp32:
  measured latency gain against accuracy loss;
- **tflite**: for both models, the ONNX candidates the compressor builds and every TFLite
  variant (``compressor/passes/tflite.py``), all timed in one interleaved pool (size,
  accuracy, latency in LiteRT vs onnxruntime); skipped without the ``tflite`` extra.

Run::

    .venv/bin/python benchmarks/compress_formats_bench.py [--pruning] [--tflite] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.errors import CompressorError
from compressor.evaluate import measure_latency_interleaved
from compressor.passes import (
    ConvertFp16,
    ConvertTflite,
    OptimizeGraph,
    PassContext,
    PruneChannels,
    QuantizeDynamic,
    QuantizeStatic,
)
from compressor.passes.tflite import tflite_unavailable
from compressor.runner import ModelRunner, open_runner

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT / "benchmarks"))
from compress_bench import ensure_bench_model  # noqa: E402 - a sibling script, not a package


@dataclass(frozen=True)
class Row:
    """One artifact's figures."""

    name: str
    size_bytes: int
    accuracy: float
    p50_ms: float
    p99_ms: float


def bench_pruning(model: Path, data_path: Path, ratios: tuple[float, ...],
                  rounds: int) -> list[Row]:
    """fp32 (optimised) against the same graph with structured pruning at each ratio."""
    with tempfile.TemporaryDirectory(prefix="prune-bench-") as tmp:
        ctx = PassContext(workdir=Path(tmp))
        base = OptimizeGraph()(model, ctx).model
        paths = {"fp32": base}
        for ratio in ratios:
            paths[f"channels -{ratio:.0%}"] = PruneChannels(ratio)(base, ctx).model
        return measure_rows(paths, data_path, rounds)


def measure_rows(paths: dict[str, Path], data_path: Path, rounds: int) -> list[Row]:
    """Accuracy of each model file, and latency timed interleaved across all of them."""
    with np.load(data_path) as data:
        x, y = data["eval_x"], data["eval_y"]
    runners: dict[str, ModelRunner] = {name: open_runner(p) for name, p in paths.items()}
    latency = measure_latency_interleaved(runners, {"input": x[:1]}, rounds=rounds,
                                          iterations=50)
    return [Row(name, path.stat().st_size, accuracy(runners[name], x, y),
                latency[name].p50_ms, latency[name].p99_ms) for name, path in paths.items()]


def accuracy(runner: ModelRunner, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent, in batches of 64."""
    logits = np.concatenate([next(iter(runner.run({"input": x[i:i + 64]}).values()))
                             for i in range(0, len(x), 64)])
    return float(np.mean(np.argmax(logits, axis=1) == y) * 100)


def bench_tflite(model: Path, data_path: Path, rounds: int) -> list[Row]:
    """ONNX candidates and every TFLite variant of one model, timed in one interleaved pool."""
    with tempfile.TemporaryDirectory(prefix="tflite-bench-") as tmp:
        calib = np.load(data_path)["calib_x"][:128]
        ctx = PassContext(workdir=Path(tmp), calibration=[{"input": c[None]} for c in calib])
        base = OptimizeGraph()(model, ctx).model
        paths = {"onnx fp32": base}
        for name, onnx_pass in (("onnx int8-dynamic", QuantizeDynamic()),
                                ("onnx int8-static", QuantizeStatic()),
                                ("onnx fp16", ConvertFp16())):
            paths[name] = onnx_pass(base, ctx).model
        started = time.monotonic()
        built = ConvertTflite().build(base, ctx)
        print(f"  TFLite conversion ({len(built.artifacts)} variants) took "
              f"{time.monotonic() - started:.1f} s"
              + "".join(f"; {n} failed: {r}" for n, r in built.skipped.items()), flush=True)
        with np.load(data_path) as data:
            x = data["eval_x"]
        for artifact in built.artifacts:
            try:  # as the compressor does: a variant LiteRT cannot run is not offered
                open_runner(artifact.path).run({"input": x})
            except CompressorError as exc:
                print(f"  {artifact.name}: LiteRT cannot run it: {str(exc).splitlines()[0]}")
                continue
            paths[artifact.name] = artifact.path
        return measure_rows(paths, data_path, rounds)


def print_format_table(rows: list[Row]) -> None:
    """Size, accuracy and latency of each artifact, with ratios against ONNX fp32."""
    fp32 = rows[0]
    print(f"{'artifact':<22}{'size':>10}{'accuracy':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'size x':>8}{'speed x':>9}")
    for row in rows:
        print(f"{row.name:<22}{row.size_bytes / 2**10:>7.0f}KiB{row.accuracy:>9.2f}%"
              f"{row.p50_ms:>9.4f}{row.p99_ms:>9.4f}{fp32.size_bytes / row.size_bytes:>8.2f}"
              f"{fp32.p50_ms / row.p50_ms:>9.2f}")


def tflite_section(rounds: int) -> None:
    """TFLite variants beside ONNX ones, for both models; skipped without the extra."""
    missing = tflite_unavailable()
    if missing is not None:
        print(f"\n== TFLite variants: skipped ({missing})")
        return
    vit_model, vit_data = ensure_bench_model()
    for title, model, data in (
            ("digits CNN", MODELS / "digits_cnn.onnx", MODELS / "digits_data.npz"),
            ("ViT encoder", vit_model, vit_data)):
        print(f"\n== TFLite vs ONNX variants: {title} (LiteRT {_version('ai-edge-litert')}, "
              f"onnxruntime {_version('onnxruntime')}; one thread)", flush=True)
        print_format_table(bench_tflite(model, data, rounds))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    """Run the chosen sections (both by default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved timing rounds of 50 calls each (default 10)")
    parser.add_argument("--pruning", action="store_true", help="only the pruning section")
    parser.add_argument("--tflite", action="store_true", help="only the TFLite section")
    args = parser.parse_args()
    started = time.monotonic()
    if args.pruning or not args.tflite:
        print("== structured pruning, no retraining (ViT)", flush=True)
        vit_model, vit_data = ensure_bench_model()
        pruning = bench_pruning(vit_model, vit_data, (0.25, 0.5, 0.75), args.rounds)
        fp32 = pruning[0]
        print(f"{'artifact':<18}{'size':>10}{'accuracy':>10}{'drop':>7}{'p50 ms':>9}"
              f"{'speed x':>9}")
        for row in pruning:
            print(f"{row.name:<18}{row.size_bytes / 2**20:>8.2f}MB{row.accuracy:>9.2f}%"
                  f"{fp32.accuracy - row.accuracy:>7.2f}{row.p50_ms:>9.3f}"
                  f"{fp32.p50_ms / row.p50_ms:>9.2f}")
    if args.tflite or not args.pruning:
        tflite_section(args.rounds)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

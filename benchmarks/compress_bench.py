"""Compression benchmark: fp32 vs ``quantize_dynamic`` defaults vs edgefleet's choice.

For each model (the committed digits CNN, and the ViT benchmark model built on demand by
``models/build_bench_model.py``), in one run on this machine:

- **fp32**: the trained model as exported;
- **quantize_dynamic**: ``onnxruntime.quantization.quantize_dynamic(model, out)`` with its
  defaults, the baseline a user would reach for;
- **edgefleet**: what ``edge-compress MODEL --profile P`` chooses for this host's profile.

All three are timed interleaved (single sample, one thread) and evaluated on the same data;
figures are printed as ratios against fp32 and against quantize_dynamic, with the targets
from the design brief. Then structured pruning alone (no retraining) at several ratios on
the ViT: measured latency gain against accuracy loss. Last, when the ``tflite`` extra is
installed, the TFLite variants of both models beside the ONNX ones (size, accuracy, latency in
LiteRT vs onnxruntime, all timed interleaved in one pool). Run::

    .venv/bin/pip install -e '.[models]'       # once, to build the ViT model (PyTorch)
    .venv/bin/pip install -e '.[tflite]'       # for the TFLite section
    .venv/bin/python benchmarks/compress_bench.py [--tflite-only]
"""

from __future__ import annotations

import argparse
import subprocess
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
from compressor.pipeline import CompressOptions, compress
from compressor.runner import ModelRunner, open_runner
from firmware_profiles import best_profile, load_profiles, probe_host

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@dataclass(frozen=True)
class Row:
    """One artifact's figures."""

    name: str
    size_bytes: int
    accuracy: float
    p50_ms: float
    p99_ms: float


def ensure_bench_model() -> tuple[Path, Path]:
    """The ViT model and its data, built (about 80 s, needs PyTorch) if missing."""
    model = MODELS / "generated" / "digits_vit.onnx"
    data = MODELS / "generated" / "digits_vit_data.npz"
    if not model.is_file() or not data.is_file():
        print("building the benchmark model (models/build_bench_model.py)...", flush=True)
        subprocess.run([sys.executable, str(MODELS / "build_bench_model.py")], check=True)
    return model, data


def bench(model: Path, data_path: Path, profile_name: str, rounds: int) -> list[Row]:
    """Measure fp32, quantize_dynamic defaults and edgefleet's choice for one model."""
    from onnxruntime.quantization import quantize_dynamic

    profiles = {p.name: p for p in load_profiles()}
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        baseline = Path(tmp) / "quantize_dynamic.onnx"
        quantize_dynamic(str(model), str(baseline))
        started = time.monotonic()
        report = compress(model, [profiles[profile_name]], Path(tmp) / "edgefleet",
                          calibration=data_path, evaluation=data_path, options=CompressOptions())
        print(f"  edge-compress took {time.monotonic() - started:.1f} s; chose "
              f"{report['variants'][0]['candidate']}", flush=True)
        chosen = Path(tmp) / "edgefleet" / report["variants"][0]["file"]
        return measure_rows({"fp32": model, "quantize_dynamic": baseline,
                             f"edgefleet ({report['variants'][0]['candidate']})": chosen},
                            data_path, rounds)


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


def print_table(title: str, rows: list[Row]) -> None:
    """The figures, then ratios against fp32 and against quantize_dynamic."""
    fp32, baseline = rows[0], rows[1]
    print(f"\n{title}")
    print(f"{'artifact':<28}{'size':>10}{'accuracy':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'size x':>8}{'speed x':>9}{'drop':>7}{'vs qd: speed x':>16}{'acc':>7}")
    for row in rows:
        print(f"{row.name:<28}{row.size_bytes / 2**20:>8.2f}MB{row.accuracy:>9.2f}%"
              f"{row.p50_ms:>9.3f}{row.p99_ms:>9.3f}{fp32.size_bytes / row.size_bytes:>8.2f}"
              f"{fp32.p50_ms / row.p50_ms:>9.2f}{fp32.accuracy - row.accuracy:>7.2f}"
              f"{baseline.p50_ms / row.p50_ms:>16.2f}{row.accuracy - baseline.accuracy:>+7.2f}")


def main() -> None:
    """Run the benchmark on both models and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved timing rounds of 50 calls each (default 10)")
    parser.add_argument("--tflite-only", action="store_true",
                        help="run only the TFLite section")
    args = parser.parse_args()
    if args.tflite_only:
        tflite_section(args.rounds)
        return
    profiles = load_profiles()
    profile = best_profile(probe_host(profiles), profiles)
    if profile is None:
        raise SystemExit("no firmware profile fits this host; see 'edge-agent probe'")
    print(f"host profile: {profile.name}; numpy {np.__version__}")
    started = time.monotonic()
    vit_model, vit_data = ensure_bench_model()
    for title, model, data in (
            ("digits CNN (models/digits_cnn.onnx)", MODELS / "digits_cnn.onnx",
             MODELS / "digits_data.npz"),
            ("ViT encoder (models/generated/digits_vit.onnx)", vit_model, vit_data)):
        print(f"\n== {title}", flush=True)
        print_table(title, bench(model, data, profile.name, args.rounds))
    print("\n== structured pruning, no retraining (ViT)", flush=True)
    pruning = bench_pruning(vit_model, vit_data, (0.25, 0.5, 0.75), args.rounds)
    fp32 = pruning[0]
    print(f"{'artifact':<18}{'size':>10}{'accuracy':>10}{'drop':>7}{'p50 ms':>9}{'speed x':>9}")
    for row in pruning:
        print(f"{row.name:<18}{row.size_bytes / 2**20:>8.2f}MB{row.accuracy:>9.2f}%"
              f"{fp32.accuracy - row.accuracy:>7.2f}{row.p50_ms:>9.3f}"
              f"{fp32.p50_ms / row.p50_ms:>9.2f}")
    print(f"\ntargets (larger model): drop <= 1 point, size >= 3.5x, speed >= 1.5x, and at "
          f"least quantize_dynamic's accuracy and speed\ntotal {time.monotonic() - started:.0f} s")
    tflite_section(args.rounds)


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


if __name__ == "__main__":
    main()

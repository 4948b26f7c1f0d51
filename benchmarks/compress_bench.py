"""Compression benchmark: edgefleet's choice against the peers' standard post-training quantization.

For each model, in one run on this machine, side by side:

- **fp32**: the model as given;
- **edgefleet**: what ``edge-compress MODEL --profile P`` chooses for this host's profile;
- **peers**, each with its standard post-training quantization and default settings:
  onnxruntime's ``quantize_dynamic`` and ``quantize_static`` (after ``quant_pre_process``;
  QDQ, per-channel, min-max), Microsoft Olive's OnnxDynamicQuantization and
  OnnxStaticQuantization passes, Intel Neural Compressor's ``quantize`` with its default
  dynamic and static configs; Olive and Neural Compressor where they are installed (each in
  its own virtual environment under ``.peers-venv/``, see below), skipped with a line
  otherwise. Static quantizers calibrate on the same calls edgefleet does.

Every artifact is judged by edgefleet's own judge (the same data, the measure that fits the
model's output, against the same fp32 reference) and timed in one interleaved pool (one call
at a time, one thread). Compression runs as a child process each (``edge-compress`` itself,
or ``benchmarks/compress_peers.py``), so its wall time and peak memory (the child's maximum
resident set) are measured alike. The verdict per model: edgefleet's artifact is within the
quality budget, and at least as fast (within 5%) as the fastest peer artifact of equal or
better quality.

Models: the digits CNN (committed), the ViT (``models/build_bench_model.py``), the sentence
encoder, the CRNN line recogniser and the streaming voice-activity detector (committed,
``models/train_*.py``), and a ~100 MB encoder with random weights
(``models/build_large_encoder.py``) for the 2-minute target. Generated models are built on
demand (PyTorch, the ``models`` extra). Run::

    .venv/bin/pip install -e '.[models]'           # once, to build the generated models
    python3 -m venv .peers-venv/olive && .peers-venv/olive/bin/pip install olive-ai \\
        onnxruntime==1.32.0 onnx==1.23.2 onnxscript         # optional peers
    python3 -m venv .peers-venv/inc && .peers-venv/inc/bin/pip install \\
        onnx-neural-compressor onnxruntime==1.32.0
    .venv/bin/python benchmarks/compress_bench.py [--only NAME ...] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compressor.candidates import Judge
from compressor.dataset import parse_state_pair, save_calls
from compressor.errors import CompressorError, first_line
from compressor.evaluate import (
    calibration_calls,
    first_call,
    measure_latency_interleaved,
    run_dataset,
)
from compressor.job import CompressOptions, plan_job, resolve_labels, resolve_metrics
from compressor.metrics import Quality, parse_metric
from compressor.runner import ModelRunner, open_runner
from firmware_profiles import best_profile, get_profile, load_profiles, probe_host

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
GENERATED = MODELS / "generated"
PEERS = {"ort-dynamic": None, "ort-static": None, "olive-dynamic": "olive",
         "olive-static": "olive", "inc-dynamic": "inc", "inc-static": "inc"}
BUDGET = 1.0  # quality points, as edge-compress's default --max-accuracy-drop
LATENCY_TIE = 1.05


@dataclass(frozen=True)
class Bench:
    """One model of the benchmark and how to judge it."""

    name: str
    model: Path
    data: Path
    metrics: tuple[str, ...] = ()  # --metric arguments
    state: tuple[str, ...] = ()  # --state arguments
    build: str | None = None  # script that generates the model, when it is not committed


BENCHES = [
    Bench("digits-cnn", MODELS / "digits_cnn.onnx", MODELS / "digits_data.npz"),
    Bench("vit", GENERATED / "digits_vit.onnx", GENERATED / "digits_vit_data.npz",
          build="build_bench_model.py"),
    Bench("text-encoder", MODELS / "text_encoder.onnx", MODELS / "text_encoder_data.npz",
          metrics=("sentence_embedding=embedding",)),
    Bench("crnn", MODELS / "crnn.onnx", MODELS / "crnn_data.npz", metrics=("logits=ctc",)),
    Bench("vad", MODELS / "vad.onnx", MODELS / "vad_data.npz", metrics=("prob=iou:0.5",),
          state=("stateN=state",)),
    Bench("large-encoder", GENERATED / "large_encoder.onnx",
          GENERATED / "large_encoder_data.npz", metrics=("sentence_embedding=embedding",),
          build="build_large_encoder.py"),
]


@dataclass
class Row:
    """One artifact's figures."""

    name: str
    path: Path | None
    seconds: float | None = None  # time to compress
    peak_mb: float | None = None  # the compressing process's peak resident memory
    quality: Quality | None = None
    p50_ms: float | None = None
    problem: str | None = None  # why there is no usable artifact
    notes: list[str] = field(default_factory=list)


def timed(argv: list[str], log: Path) -> tuple[int, float, float | None]:
    """Run ``argv``; (exit status, wall seconds, peak resident MB of the process).

    The peak comes from GNU time (``/usr/bin/time -f %M``), which forks the command from its
    own small process: a child forked from this benchmark would count this process's pages
    in its own maximum resident set. Without GNU time the peak is None.
    """
    peak_file = log.with_suffix(".peak")
    gnu_time = Path("/usr/bin/time")
    if gnu_time.is_file():
        argv = [str(gnu_time), "-f", "%M", "-o", str(peak_file), *argv]
    started = time.monotonic()
    with log.open("wb") as sink:
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    seconds = time.monotonic() - started
    lines = peak_file.read_text().split() if peak_file.is_file() else []
    peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else None
    return done.returncode, seconds, peak


def last_line(log: Path) -> str:
    """The log's last non-empty line, for a failure's reason."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def ensure_bench_model() -> tuple[Path, Path]:
    """The ViT model and its data, built if missing (agent_bench.py times it too)."""
    vit = next(b for b in BENCHES if b.name == "vit")
    if not ensure(vit):
        raise SystemExit(f"cannot build {vit.model}; install the models extra")
    return vit.model, vit.data


def ensure(bench: Bench) -> bool:
    """Build a generated model if it is missing; False when that is not possible here."""
    if bench.model.is_file() and bench.data.is_file():
        return True
    if bench.build is None:
        return False
    print(f"building {bench.model.name} (models/{bench.build})...", flush=True)
    done = subprocess.run([sys.executable, str(MODELS / bench.build)], check=False,
                          cwd=MODELS)
    return done.returncode == 0 and bench.model.is_file()


def run_bench(bench: Bench, profile: str, rounds: int, work: Path) -> list[Row]:
    """Compress with edgefleet and every peer, then judge and time all artifacts."""
    metrics = dict(parse_metric(m) for m in bench.metrics)
    options = CompressOptions(metrics=metrics,
                              state=tuple(parse_state_pair(s) for s in bench.state))
    job = plan_job(bench.model, [get_profile(profile)], bench.data, bench.data,
                   options=options, progress=None)
    reference_runner = open_runner(bench.model)
    calls = calibration_calls(reference_runner, job.binding, job.calibration,
                              options.calibration_samples)
    calls_path = save_calls(calls, work / "calls.npz")
    rows = [Row("fp32", bench.model)]
    rows.append(edgefleet(bench, profile, work))
    for tool, venv in PEERS.items():
        rows.append(peer(tool, venv, bench.model, calls_path, work))
    reference = run_dataset(reference_runner, job.binding, job.evaluation)
    resolved = resolve_metrics(job.signature, job.binding, reference, metrics)
    judge = Judge(job.binding, job.evaluation, reference, resolved,
                  resolve_labels(job.evaluation, job.binding, resolved))
    runners: dict[str, ModelRunner] = {}
    for row in rows:
        if row.path is None:
            continue
        try:
            runners[row.name], row.quality = judge.load(row.path)
        except CompressorError as exc:
            row.problem = f"unusable: {first_line(exc)}"
    latency = measure_latency_interleaved(runners, first_call(job.binding, job.evaluation),
                                          rounds=rounds, iterations=50)
    for row in rows:
        if row.name in latency:
            row.p50_ms = latency[row.name].p50_ms
    return rows


def edgefleet(bench: Bench, profile: str, work: Path) -> Row:
    out = work / "edgefleet"
    argv = [str(Path(sys.executable).parent / "edge-compress"), str(bench.model), "--profile",
            profile, "--calibration", str(bench.data), "--eval", str(bench.data), "--out",
            str(out), "--json"]
    for metric in bench.metrics:
        argv += ["--metric", metric]
    for pair in bench.state:
        argv += ["--state", pair]
    status, seconds, peak = timed(argv, work / "edgefleet.log")
    report_path = out / "report.json"
    if not report_path.is_file():
        return Row("edgefleet", None, seconds, peak,
                   problem=f"failed: {last_line(work / 'edgefleet.log')}")
    report = json.loads(report_path.read_text())
    variant = report["variants"][0] if report["variants"] else None
    if status != 0 or variant is None:
        return Row("edgefleet", None, seconds, peak, problem="no artifact within the budget")
    row = Row(f"edgefleet ({variant['candidate']})", out / variant["file"], seconds, peak)
    row.notes = [f"{f['name']} {f['stage']} failed" for f in report["failed"]]
    return row


def peer(tool: str, venv: str | None, model: Path, calls: Path, work: Path) -> Row:
    python = Path(sys.executable) if venv is None else ROOT / ".peers-venv" / venv / "bin" / (
        "python")
    if not python.is_file():
        return Row(tool, None, problem=f"not installed (.peers-venv/{venv})")
    out = work / f"{tool}.onnx"
    log = work / f"{tool}.log"
    status, seconds, peak = timed([str(python), str(ROOT / "benchmarks" / "compress_peers.py"),
                                   tool, str(model), str(calls), str(out)], log)
    if status != 0 or not out.is_file():
        return Row(tool, None, seconds, peak, problem=f"failed: {last_line(log)}")
    return Row(tool, out, seconds, peak)


def worst(quality: Quality) -> tuple[str, float, float]:
    """(measure, score, drop) of the output with the largest drop."""
    name = max(quality.outputs, key=lambda n: quality.outputs[n].drop)
    out = quality.outputs[name]
    return out.metric, out.score, out.drop


def print_table(bench: Bench, rows: list[Row]) -> str:
    """The figures, the verdict line, and the verdict itself."""
    fp32 = rows[0]
    print(f"\n{bench.name} ({bench.model.name}, {bench.model.stat().st_size / 2**20:.2f} MB)")
    print(f"{'artifact':<34}{'size':>10}{'quality':>20}{'drop':>8}{'p50 ms':>10}"
          f"{'speed x':>9}{'time s':>8}{'peak MB':>9}")
    for row in rows:
        if row.quality is None or row.path is None or row.p50_ms is None:
            time_s = f"{row.seconds:.1f}" if row.seconds is not None else "-"
            print(f"{row.name:<34}{'':>10}{'':>20}{'':>8}{'':>10}{'':>9}{time_s:>8}"
                  f"{'':>9}  {row.problem}")
            continue
        metric, score, drop = worst(row.quality)
        speed = (fp32.p50_ms or 0) / row.p50_ms
        seconds = "-" if row.seconds is None else f"{row.seconds:.1f}"
        peak = "-" if row.peak_mb is None else f"{row.peak_mb:.0f}"
        print(f"{row.name:<34}{row.path.stat().st_size / 2**20:>8.2f}MB"
              f"{f'{score:.2f} {metric}':>20}{drop:>8.2f}{row.p50_ms:>10.4f}{speed:>9.2f}"
              f"{seconds:>8}{peak:>9}" + (f"  ({'; '.join(row.notes)})" if row.notes else ""))
    return verdict(rows)


def verdict(rows: list[Row]) -> str:
    """Whether edgefleet's artifact is usable and at least as fast as the best peer at equal
    or better quality."""
    ours = rows[1]
    if ours.quality is None or ours.p50_ms is None:
        return f"FAIL: edgefleet produced no usable artifact ({ours.problem})"
    drop = worst(ours.quality)[2]
    if drop > BUDGET:
        return f"FAIL: edgefleet's artifact drops {drop:.2f} points"
    rivals = [r for r in rows[2:] if r.quality is not None and r.p50_ms is not None
              and worst(r.quality)[2] <= drop + 1e-9]
    if not rivals:
        return "PASS: no peer artifact reaches edgefleet's quality"
    best = min(rivals, key=lambda r: r.p50_ms or 0.0)
    assert best.p50_ms is not None
    ratio = ours.p50_ms / best.p50_ms
    word = "PASS" if ratio <= LATENCY_TIE else "FAIL"
    return (f"{word}: edgefleet p50 {ours.p50_ms:.4f} ms vs {best.p50_ms:.4f} ms for the "
            f"fastest peer of equal or better quality ({best.name}), ratio {ratio:.2f}")


def main() -> None:
    """Run every benchmark model (or --only some) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved timing rounds of 50 calls each (default 10)")
    parser.add_argument("--only", action="append", choices=[b.name for b in BENCHES],
                        help="run only these models (repeatable)")
    args = parser.parse_args()
    profiles = load_profiles()
    profile = best_profile(probe_host(profiles), profiles)
    if profile is None:
        raise SystemExit("no firmware profile fits this host; see 'edge-agent probe'")
    print(f"host profile: {profile.name}; numpy {np.__version__}; budget {BUDGET} point")
    started = time.monotonic()
    verdicts = {}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        if not ensure(bench):
            print(f"\n{bench.name}: skipped ({bench.model} missing and not buildable here)")
            continue
        with tempfile.TemporaryDirectory(prefix=f"compress-bench-{bench.name}-") as tmp:
            rows = run_bench(bench, profile.name, args.rounds, Path(tmp))
            verdicts[bench.name] = print_table(bench, rows)
        print(verdicts[bench.name], flush=True)
    print("\nverdicts:")
    for name, line in verdicts.items():
        print(f"  {name}: {line}")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

"""``edge-compress``: the model compressor command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from common.cli import Subcommands, new_parser, run
from firmware_profiles import (
    ProfileError,
    get_profile,
    load_profile,
    load_profiles,
    match_profiles,
    probe_host,
)
from firmware_profiles.describe import match_to_json, matches_table

from . import __version__
from .composite_cli import add_composite
from .dataset import DatasetError, bind, load_dataset, parse_state_pair
from .errors import CompressorError
from .evaluate import first_call, measure_latency, run_dataset
from .job import resolve_labels, resolve_metrics
from .metrics import KINDS, Metric, parse_metric
from .pipeline import CompressOptions, NoArtifactError, compress
from .runner import open_runner, read_signature

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``edge-compress`` and all its subcommands."""
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, Subcommands[argparse.ArgumentParser]]:
    parser, subparsers = new_parser(
        "edge-compress", "Turn a trained model (ONNX, TFLite) into device-specific artifacts, "
        "accuracy-gated and measured, for the firmware profiles of a fleet.", __version__,
        epilog="Compress: edge-compress MODEL --profile NAME [--profile NAME ...] --out DIR "
        "[--calibration DATA.npz] [--eval DATA.npz] [--max-accuracy-drop 1.0] [--json] "
        "(the same as 'edge-compress compress MODEL ...'; see 'edge-compress compress -h').")
    _add_compress(subparsers)
    _add_profiles(subparsers)
    _add_evaluate(subparsers)
    add_composite(subparsers)
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-compress``; returns the process exit code."""
    # `edge-compress MODEL ...` is the main job: the word `compress` may be left out.
    parser, subparsers = _build()
    return run(parser, argv, expected=(CompressorError, ProfileError),
               default_command=(subparsers, "compress"))


# --- edge-compress profiles ---------------------------------------------------------------

def _add_profiles(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    profiles = subparsers.add_parser(
        "profiles", help="list the firmware profiles, or check profile files",
        description="List the firmware profiles (device kinds) and how this host matches "
        "each; * marks the best match. With --check, validate profile files instead.")
    profiles.add_argument("--dir", type=Path, metavar="DIR",
                          help="read profiles from DIR (default: the packaged profiles)")
    profiles.add_argument("--check", type=Path, nargs="+", metavar="FILE",
                          help="validate these profile files; exit 1 at the first error")
    profiles.add_argument("--json", action="store_true", help="print JSON")
    profiles.set_defaults(handler=_profiles)


def _profiles(args: argparse.Namespace) -> int:
    if args.check:
        for path in args.check:
            profile = load_profile(path)
            print(f"OK {path} ({profile.name})")
        return 0
    profiles = load_profiles(args.dir)
    matches = match_profiles(probe_host(profiles), profiles)
    if args.json:
        print(json.dumps([match_to_json(m) for m in matches], indent=2))
    else:
        print(matches_table(matches))
    return 0


# --- edge-compress evaluate ---------------------------------------------------------------

def _add_evaluate(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="measure a model file's quality and latency on this machine",
        description="Run MODEL (.onnx or .tflite) on the CPU over DATA's evaluation split "
        "and report, per labelled output, its score by the measure that fits it (top-1 "
        "accuracy for a classifier), and size and single-call latency.")
    evaluate.add_argument("model", type=Path, metavar="MODEL")
    evaluate.add_argument("--data", type=Path, required=True, metavar="DATA.npz",
                          help="eval_x/<input> and eval_y/<output> arrays, or eval_x and "
                          "eval_y (docs/compressor.md, 'Data files')")
    _add_data_options(evaluate)
    evaluate.add_argument("--threads", type=int, default=1, metavar="N")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(handler=_evaluate)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", action="append", default=[], metavar="[OUTPUT=]KIND[:PARAM]",
                   help="quality measure for an output (all outputs without OUTPUT=): "
                   f"{', '.join(KINDS)}; python:FILE.py:FUNCTION for your own. Default: "
                   "inferred from each output's shape and name (repeatable)")
    p.add_argument("--state", action="append", default=[], metavar="OUTPUT=INPUT",
                   help="a recurrent model's state: OUTPUT's value feeds INPUT in the next "
                   "call; data then holds sequences (default: inferred from names such as "
                   "state/stateN, h0/hn; repeatable)")


def _evaluate(args: argparse.Namespace) -> int:
    signature = read_signature(args.model)
    data = load_dataset(args.data, "eval")
    if data is None:
        raise DatasetError(f"{args.data}: no evaluation inputs (eval_x/<input>, eval_x or x).")
    binding = bind(signature, data, [parse_state_pair(s) for s in args.state])
    runner = open_runner(args.model, args.threads)
    outputs = run_dataset(runner, binding, data)
    metrics = resolve_metrics(signature, binding, outputs, _metrics(args.metric))
    labels = resolve_labels(data, binding, metrics)
    result: dict[str, object] = {"model": str(args.model),
                                 "size_bytes": args.model.stat().st_size,
                                 "samples": len(data)}
    for name, target in labels.items():
        score = metrics[name].score(outputs[name], target, labelled=True)[0]
        result.setdefault("accuracy", round(score, 2))  # the first labelled output's
        result[f"{name} {metrics[name]}"] = round(score, 2)
    latency = measure_latency(runner, first_call(binding, data))
    result["latency_ms_p50"] = round(latency.p50_ms, 4)
    result["latency_ms_p99"] = round(latency.p99_ms, 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(key) for key in result) + 2
        print("\n".join(f"{key:{width}} {value}" for key, value in result.items()))
    return 0


def _metrics(specs: list[str]) -> dict[str, Metric]:
    return dict(parse_metric(spec) for spec in specs)


# --- edge-compress [compress] MODEL -------------------------------------------------------

def _add_compress(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "compress", help="compress MODEL for firmware profiles (the default command)",
        description="Build candidate artifacts of MODEL (ONNX: fp32 optimised, int8 dynamic "
        "and static, fp16 where the profile runs it; TFLite, for profiles that prefer or need "
        "it: fp32, fp16, int8 dynamic-range and static, int8-full, which needs the "
        "edgefleet[tflite] extra; a .tflite MODEL is translated to ONNX with the same extra), "
        "judge each against MODEL on the evaluation data by the measure that fits each "
        "output, time them on this machine, and keep per profile the smallest artifact of its "
        "preferred format within the quality budget that is not slower than fp32. Writes the "
        "artifacts and report.json into DIR, atomically: on any error DIR is left untouched.")
    p.add_argument("model", type=Path, metavar="MODEL", help="trained model (.onnx or .tflite)")
    p.add_argument("--profile", action="append", required=True, metavar="NAME",
                   help="target firmware profile (repeatable; see 'edge-compress profiles')")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory (must not exist or be empty)")
    p.add_argument("--calibration", type=Path, metavar="DATA.npz",
                   help="representative inputs (calib_x/<input>, or calib_x or x) for static "
                   "quantization")
    p.add_argument("--eval", type=Path, metavar="DATA.npz",
                   help="evaluation inputs and labels (eval_x/<input>, eval_y/<output>, or "
                   "eval_x, eval_y); without labels, agreement with MODEL is measured")
    _add_data_options(p)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="largest accepted quality loss in points of each output's measure "
                   "(default 1.0)")
    p.add_argument("--prune-channels", type=float, metavar="RATIO",
                   help="also try structured pruning: remove this share (0-1) of hidden "
                   "units/channels, alone and with int8 (no retraining; the quality gate "
                   "decides)")
    p.add_argument("--profiles-dir", type=Path, metavar="DIR",
                   help="read profiles from DIR (default: the packaged profiles)")
    p.add_argument("--json", action="store_true", help="print report.json instead of a table")
    p.set_defaults(handler=_compress)


def _compress(args: argparse.Namespace) -> int:
    profiles = [get_profile(name, args.profiles_dir) for name in args.profile]
    options = CompressOptions(max_accuracy_drop=args.max_accuracy_drop,
                              prune_channels=args.prune_channels,
                              metrics=_metrics(args.metric),
                              state=tuple(parse_state_pair(s) for s in args.state))
    try:
        report = compress(args.model, profiles, args.out, calibration=args.calibration,
                          evaluation=args.eval, options=options, progress=_progress)
    except NoArtifactError:
        report = json.loads((args.out / "report.json").read_text("utf-8"))
        print(_report_table(report))
        _warn_format(report)
        raise
    print(json.dumps(report, indent=1) if args.json else _report_table(report))
    _warn_format(report)
    return 0


def _warn_format(report: dict[str, Any]) -> None:
    """One stderr line per profile that did not get the format it prefers (with --json too,
    where the table's notes are not printed)."""
    for decision in report["decisions"]:
        for note in decision.get("notes", []):
            if note.startswith("wanted "):
                print(f"edge-compress: warning: {decision['profile']}: {note}", file=sys.stderr)


def _progress(step: int, total: int, what: str) -> None:
    if not sys.stderr.isatty():  # logs and pipes get one plain line per step
        print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)
        return
    width = 24
    done = width * step // total
    end = "\n" if step == total else ""
    print(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} {what:<45}", end=end,
          file=sys.stderr, flush=True)


def _report_table(report: dict[str, Any]) -> str:
    candidates, decisions = report["candidates"], report["decisions"]
    rows = [("CANDIDATE", "SIZE", "QUALITY", "DROP", "P50 MS", "P99 MS")]
    rows += [(c["name"], f"{c['size_bytes'] / 1024:.0f} KiB", _quality_cell(c),
              f"{c['accuracy_drop']:+.2f}", f"{c['latency_p50_ms']:.3f}",
              f"{c['latency_p99_ms']:.3f}") for c in candidates]
    rows += [(f["name"], "-", f"FAILED ({f['stage']})", "-", "-", "-")
             for f in report.get("failed", [])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    for decision in decisions:
        lines.append(f"\n{decision['profile']}: "
                     f"{decision['chosen'] or 'NO ARTIFACT within the accuracy budget'}")
        lines += [f"  note: {note}" for note in decision.get("notes", [])]
        lines += [f"  rejected {r['candidate']}: {r['reason']}" for r in decision["rejected"]]
    notes = report.get("notes", [])
    if notes:
        lines.append("")
        lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


def _quality_cell(candidate: dict[str, Any]) -> str:
    """The worst output's score and measure, e.g. ``98.15 top1``."""
    quality = candidate.get("quality", {})
    if not quality:
        return "-"
    worst = max(quality.values(), key=lambda q: q["drop"])
    return f"{worst['score']:.2f} {worst['metric']}"

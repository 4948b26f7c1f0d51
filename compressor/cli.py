"""``edge-compress``: the model compressor command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from firmware_profiles import (
    ProfileError,
    load_profile,
    load_profiles,
    match_profiles,
    probe_host,
)
from firmware_profiles.describe import match_to_json, matches_table

from . import __version__
from .errors import CompressorError
from .evaluate import accuracy, load_eval_data, measure_latency, open_runner, predict

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``edge-compress`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="edge-compress",
        description="Turn a trained model (ONNX, TFLite) into device-specific artifacts, "
        "accuracy-gated and measured, for the firmware profiles of a fleet.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_profiles(subparsers)
    _add_evaluate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-compress``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args.verbose),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except (CompressorError, ProfileError) as exc:
        print(f"edge-compress: error: {exc}", file=sys.stderr)
        return 1


def _log_level(verbosity: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)


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
        "evaluate", help="measure a model file's accuracy and latency on this machine",
        description="Run MODEL (.onnx or .tflite) on the CPU over DATA's evaluation split "
        "and report top-1 accuracy, size and single-sample latency.")
    evaluate.add_argument("model", type=Path, metavar="MODEL")
    evaluate.add_argument("--data", type=Path, required=True, metavar="DATA.npz",
                          help="arrays eval_x and eval_y (or x and y)")
    evaluate.add_argument("--threads", type=int, default=1, metavar="N")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    data = load_eval_data(args.data)
    runner = open_runner(args.model, args.threads)
    result: dict[str, object] = {"model": str(args.model),
                                 "size_bytes": args.model.stat().st_size,
                                 "samples": len(data.x)}
    if data.y is not None:
        result["accuracy"] = round(accuracy(predict(runner, data.x), data.y), 2)
    latency = measure_latency(runner, data.x[:1])
    result["latency_ms_p50"] = round(latency.p50_ms, 4)
    result["latency_ms_p99"] = round(latency.p99_ms, 4)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(f"{key:15} {value}" for key, value in result.items()))
    return 0

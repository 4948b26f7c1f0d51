"""``edge-compress``: the model compressor command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import CompressorError

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
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-compress``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args.verbose),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except CompressorError as exc:
        print(f"edge-compress: error: {exc}", file=sys.stderr)
        return 1


def _log_level(verbosity: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)

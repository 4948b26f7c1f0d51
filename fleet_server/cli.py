"""``fleet``: the operator command line.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import FleetError

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``fleet`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="fleet",
        description="Operator tools: keys and signed bundles, device registry, publishing "
        "and rollouts to a fleet of edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fleet``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=_log_level(args.verbose),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except FleetError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        return 1


def _log_level(verbosity: int) -> int:
    return {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)

"""``edge-agent``: the on-device command line.

The commands live in two groups, one module each: the long-running ones
(:mod:`agent.cli_serving`: ``serve``, ``run``, ``stop``) and those that do one job and
return (:mod:`agent.cli_offline`); what they share is :mod:`agent.cli_options`.

Exit codes: 0 success, 1 the command failed (one line on stderr says why), 2 bad usage.
"""

from __future__ import annotations

import argparse

from common.cli import new_parser, run
from firmware_profiles import ProfileError

from . import __version__, cli_offline, cli_serving
from .errors import AgentError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``edge-agent`` and all its subcommands."""
    parser, subparsers = new_parser(
        "edge-agent", "On-device daemon: verify and install model bundles, serve inference "
        "locally (offline-capable), report to the fleet server.", __version__)
    cli_serving.register(subparsers)
    cli_offline.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``edge-agent``; returns the process exit code."""
    return run(build_parser(), argv, expected=(AgentError, ProfileError))

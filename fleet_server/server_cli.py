"""The ``fleet`` commands of a running fleet, one module per group, registered here:
``serve`` and ``stop`` (:mod:`fleet_server.serve_cli`); ``status``, ``enroll-token``, ``devices``,
``device show|reset`` (:mod:`fleet_server.device_cli`); ``bundles``, ``publish``,
``rollback`` (:mod:`fleet_server.publish_cli`); ``events``, ``metrics``
(:mod:`fleet_server.events_cli`); ``rollout``, ``audit`` (:mod:`fleet_server.rollout_cli`);
``experiment`` (:mod:`fleet_server.experiment_cli`).
:mod:`fleet_server.cli` registers them all; what they print is :mod:`fleet_server.cli_text`.

Every command but ``serve`` and ``stop`` finds the server with ``--server URL`` or ``--data
DIR`` (default ``$EDGEFLEET_SERVER_DIR`` or ``~/.local/share/edgefleet/server``), see
:mod:`fleet_server.api_client`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.defaults import SERVER_API_PORT

from .device_cli import add_device_commands
from .events_cli import add_event_commands
from .experiment_cli import add_experiment_commands
from .publish_cli import add_publish_commands
from .rollout_cli import add_rollout_commands
from .serve_cli import add_serve_commands

__all__ = ["add_server_commands"]


def add_server_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and the operator commands to ``fleet``'s subparsers."""
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_argument_group("which server")
    group.add_argument("--server", metavar="URL",
                       help=f"the operator API, e.g. https://127.0.0.1:{SERVER_API_PORT} "
                       "(admin token from $EDGEFLEET_ADMIN_TOKEN or DIR/admin.token; its "
                       "certificate checked against $EDGEFLEET_SERVER_CA or DIR/ca/ca.crt)")
    group.add_argument("--data", type=Path, metavar="DIR",
                       help="the server's data directory, to find it through DIR/server.json "
                       "(default $EDGEFLEET_SERVER_DIR or ~/.local/share/edgefleet/server)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")

    # One line per command group, in the order `fleet --help` lists them.
    add_serve_commands(subparsers)
    add_device_commands(subparsers, [where, as_json])
    add_publish_commands(subparsers, [where, as_json])
    add_event_commands(subparsers, [where, as_json])
    add_rollout_commands(subparsers, [where, as_json])
    add_experiment_commands(subparsers, [where, as_json])

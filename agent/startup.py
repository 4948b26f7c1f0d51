"""What ``edge-agent serve`` and ``run`` check and do at start, failing in one line.

A state directory the agent cannot use, TLS files its broker connection could not load and
a full disk when it announces itself each end the command with one line on stderr saying
what to do (exit 1), before anything is served and with nothing left half-written.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from transport.x509 import certificate_common_name

from .config import FleetSettings
from .errors import AgentError

if TYPE_CHECKING:  # the daemon imports the runtimes: only the commands that serve need it
    from .daemon import AgentProcess

__all__ = ["check_fleet_files", "start_agent", "usable_state_dir"]

_REENROLL = "re-enroll the device (edge-agent enroll) or fix the path in agent.toml"


def usable_state_dir(path: Path) -> Path:
    """``path``, created if missing; AgentError if this user cannot keep state there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AgentError(f"cannot use {path} as the state directory ({exc.strerror}); pass "
                         "a writable --state-dir (or set EDGEFLEET_STATE_DIR)") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise AgentError(f"state directory {path} is not writable by this user; pass a "
                         "writable --state-dir or run as its owner")
    return path


def check_fleet_files(fleet: FleetSettings) -> None:
    """Load the device's TLS files as the broker connection will; AgentError names the
    file and what is wrong with it."""
    for key in ("ca_file", "cert_file", "key_file"):
        path: Path = getattr(fleet, key)
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise AgentError(f"fleet.{key} {path}: cannot read it ({exc.strerror}); "
                             f"{_REENROLL}") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=fleet.ca_file)
    except ssl.SSLError as exc:
        raise AgentError(f"fleet.ca_file {fleet.ca_file} holds no PEM CA certificate "
                         f"({exc.reason or exc}); {_REENROLL}") from exc
    try:
        certificate_common_name(fleet.cert_file.read_bytes())
    except ValueError as exc:
        raise AgentError(f"fleet.cert_file {fleet.cert_file} is not a device certificate "
                         f"({exc}); {_REENROLL}") from exc
    try:
        # The empty password: an encrypted key fails here instead of prompting on a tty.
        context.load_cert_chain(fleet.cert_file, fleet.key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise AgentError(f"fleet.key_file {fleet.key_file} is not the (unencrypted) private "
                         f"key of {fleet.cert_file} ({exc.reason or exc}); "
                         f"{_REENROLL}") from exc


def start_agent(process: AgentProcess, token_file: Path | None) -> None:
    """Start ``process``; if it cannot announce itself (a full disk, say), stop it again
    and raise AgentError."""
    try:
        process.start(token_file)
    except OSError as exc:
        process.server.stop()
        process.runtime.close()
        raise AgentError(f"cannot write the run file agent.json in {process.state_dir} "
                         f"({exc.strerror}); free space there or fix its permissions, then "
                         "start again") from exc

"""What ``edge-agent`` commands check before they start, failing in one line.

A state directory the agent cannot use and TLS files its broker connection could not load
each end the command with one line on stderr saying what to do (exit 1), before anything is
served or written.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from common.instance_lock import DirectoryLock, LockHeld
from transport.x509 import certificate_common_name

from .config import FleetSettings
from .errors import AgentError

__all__ = ["check_fleet_files", "lock_state_dir", "usable_state_dir"]

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


def lock_state_dir(path: Path) -> DirectoryLock:
    """Hold a lock on ``path`` while this agent serves from it (keep the object): a second
    agent would share the broker session (each taking it from the other), the install
    records, the outbox and ``agent.json``. The directory itself is locked, with nothing
    written, so a full disk does not keep the agent from starting. AgentError names the
    agent that holds it when it can."""
    try:
        return DirectoryLock(path)
    except LockHeld:
        from .daemon import find_running

        running = find_running(path)
        holder = f"pid {running.pid}" if running is not None else "starting or installing"
        raise AgentError(f"another agent ({holder}) serves from {path}; stop it first "
                         f"(edge-agent stop --state-dir {path}) or give this one another "
                         "--state-dir") from None
    except OSError as exc:
        raise AgentError(f"cannot lock the state directory {path} ({exc.strerror}); pass a "
                         "usable --state-dir") from exc


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

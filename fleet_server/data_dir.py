"""The fleet server's data directory: its lock, its CA, its MQTT identity and what it
remembers between runs.

Layout (``fleet serve --data DIR``)::

    DATA/
      serve.lock       held (flock) while a server runs on DATA; holds its pid
      fleet.db         the registry on SQLite (unless --db URL)
      bundles/         bundle blobs, <sha256>.efb
      ca/              the fleet CA (fleet_server.ca); back up ca.key
      identity/        the server's MQTT identity: fleet-server.crt, .key (0600), ca.crt
      broker/          the embedded Mosquitto: mosquitto.conf, acl, mosquitto.log,
                       mosquitto.pid, persistence/
      broker-tls/      the broker's server certificate, re-issued at every start
      api-tls/         the operator API's server certificate, re-issued at every start
      state.json       the embedded broker's port when it was chosen automatically
      admin.token      the operator API's bearer token (0600; fleet_server.api)
      server.json      while `fleet serve` runs: its API URL, pid, token file
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO

from cryptography import x509

from common.atomic import write_atomic
from common.instance_lock import LockHeld, hold_lock
from transport.mqtt import TLSIdentity

from .broker_config import SERVER_IDENTITY
from .ca import FleetCA
from .errors import ServiceError

__all__ = ["DEFAULT_FLEET", "load_ca", "lock_data_dir", "remember_port", "remembered_port",
           "server_identity"]

log = logging.getLogger(__name__)

DEFAULT_FLEET = "default"
#: Re-issue the server's MQTT certificate when it expires within this long.
_RENEW_BEFORE = timedelta(days=30)


def lock_data_dir(data: Path) -> IO[str]:
    """Hold ``DATA/serve.lock`` (an exclusive flock, released when the returned file is
    closed or the process dies): two servers on one data directory would share a broker, a
    registry and server.json, and each would undo the other. ServiceError names the pid of
    the server that holds it."""
    path = data / "serve.lock"
    try:
        return hold_lock(path)
    except LockHeld as held:
        raise ServiceError(f"another fleet server (pid {held.holder}) is running on {data}; "
                           "stop it first, or give this one another --data directory") from None
    except OSError as exc:
        raise ServiceError(f"cannot open {path} ({exc.strerror}); choose a writable --data "
                           "directory") from exc


def load_ca(data: Path, fleet: str | None) -> FleetCA:
    """The fleet CA in ``DATA/ca``, created for ``fleet`` (or :data:`DEFAULT_FLEET`) if
    there is none; ServiceError if it belongs to another fleet than ``fleet``."""
    directory = data / "ca"
    if (directory / "ca.key").exists():
        ca = FleetCA.load(directory)
        if fleet is not None and fleet != ca.fleet:
            raise ServiceError(f"{data} belongs to fleet {ca.fleet!r}, not {fleet!r}; drop "
                               "--fleet or use another --data directory")
        return ca
    return FleetCA.create(directory, fleet or DEFAULT_FLEET)


def server_identity(data: Path, ca: FleetCA, name: str = SERVER_IDENTITY) -> TLSIdentity:
    """The server's MQTT identity ``name`` in ``DATA/identity``, issued once and kept
    (re-issued when it nears expiry or another CA issued it)."""
    directory = data / "identity"
    files = TLSIdentity(directory / "ca.crt", directory / f"{name}.crt",
                        directory / f"{name}.key")
    try:
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        fresh = (files.key_file.exists() and cert.issuer == ca.certificate.subject and
                 cert.not_valid_after_utc - _RENEW_BEFORE > datetime.now(timezone.utc))
    except (OSError, ValueError):
        fresh = False
    if fresh:
        return files
    log.info("issuing the fleet server's MQTT identity in %s", directory)
    return ca.write_identity(ca.issue_client_cert(name), directory)


def remembered_port(data: Path) -> int:
    """The embedded broker's port picked on an earlier run (``DATA/state.json``), or 0."""
    try:
        state = json.loads((data / "state.json").read_text("utf-8"))
        return int(state["mqtt_port"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def remember_port(data: Path, port: int) -> None:
    """Keep the broker's port for the next run: enrolled devices know it."""
    write_atomic(data / "state.json", json.dumps({"mqtt_port": port}).encode())

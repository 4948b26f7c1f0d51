"""Schema v2: what devices should run and what they report running, in typed tables.

- ``desired_models (device_id, model, bundle_sha256)`` replaces the JSON in
  ``devices.desired``; a desired model's version and size are its bundle's.
- ``reported_models (device_id, model, version, bundle_sha256, state)`` holds the models of
  each device's last report, parsed once when it arrives: what convergence reads.
- ``desired_history.previous`` (JSON) becomes ``previous_sha256`` (NULL: the model was absent).
- ``ever_desired (device_id, bundle_sha256)``: every bundle a device was ever asked to run,
  which are the bundles it may fetch. v1 searched the event log for them, where a device
  could forge a ``desired.set`` event of its own; it is filled from the server's own
  ``desired.*`` events (a device's events carry ``device_at`` in their detail, the server's
  never do).
- ``devices.reported`` stays: the last report as the device sent it, for display.
- ``device_event_seqs (device_id, seq)``, the numbered device events stored: the last v1
  code created it at open without changing the version, so a v1 database may have it
  (rows kept) or not (created).

Each stored report is parsed with the protocol's decoder. One that does not parse (v1 kept
any JSON object it was given) stays for display with no running models: the device counts
as not converged until it reports again, which an agent does each time it connects.
"""

from __future__ import annotations

import json
import logging

from fleet_server.errors import RegistryError
from fleet_server.registry.database import Tx
from protocol.errors import ProtocolError
from protocol.messages import decode_reported

__all__ = ["upgrade"]

log = logging.getLogger(__name__)


def upgrade(tx: Tx) -> None:
    """Create the typed tables, move the JSON's content into them, drop what they replace."""
    tx.run("""CREATE TABLE desired_models (
        device_id TEXT NOT NULL REFERENCES devices (id),
        model TEXT NOT NULL,
        bundle_sha256 TEXT NOT NULL REFERENCES bundles (sha256),
        PRIMARY KEY (device_id, model))""")
    tx.run("CREATE INDEX desired_models_bundle ON desired_models (bundle_sha256)")
    tx.run("""CREATE TABLE reported_models (
        device_id TEXT NOT NULL REFERENCES devices (id),
        model TEXT NOT NULL,
        version BIGINT NOT NULL,
        bundle_sha256 TEXT,
        state TEXT NOT NULL,
        PRIMARY KEY (device_id, model))""")
    tx.run("""CREATE TABLE IF NOT EXISTS device_event_seqs (
        device_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (device_id, seq))""")
    tx.run("""CREATE TABLE ever_desired (
        device_id TEXT NOT NULL REFERENCES devices (id),
        bundle_sha256 TEXT NOT NULL REFERENCES bundles (sha256),
        PRIMARY KEY (device_id, bundle_sha256))""")
    _move_desired(tx)
    _move_history(tx)
    _fill_ever_desired(tx)
    _parse_reports(tx)


def _move_desired(tx: Tx) -> None:
    stored = {row[0] for row in tx.all("SELECT sha256 FROM bundles")}
    rows = []
    for device_id, text in tx.all("SELECT id, desired FROM devices ORDER BY id"):
        for model, value in sorted(json.loads(text).items()):
            rows.append((device_id, model, _stored_sha(value, stored, device_id)))
    tx.many("INSERT INTO desired_models (device_id, model, bundle_sha256) VALUES (?, ?, ?)",
            rows)
    tx.run("ALTER TABLE devices DROP COLUMN desired")


def _move_history(tx: Tx) -> None:
    tx.run("ALTER TABLE desired_history ADD COLUMN previous_sha256 TEXT "
           "REFERENCES bundles (sha256)")
    stored = {row[0] for row in tx.all("SELECT sha256 FROM bundles")}
    tx.many("UPDATE desired_history SET previous_sha256 = ? WHERE id = ?",
            [(_stored_sha(json.loads(previous), stored, device_id), entry_id)
             for entry_id, device_id, previous in tx.all(
                 "SELECT id, device_id, previous FROM desired_history "
                 "WHERE previous IS NOT NULL")])
    tx.run("ALTER TABLE desired_history DROP COLUMN previous")


def _fill_ever_desired(tx: Tx) -> None:
    stored = {row[0] for row in tx.all("SELECT sha256 FROM bundles")}
    enrolled = {row[0] for row in tx.all("SELECT id FROM devices")}
    pairs = set(tx.all("SELECT device_id, bundle_sha256 FROM desired_models"))
    for device_id, text in tx.all("SELECT device_id, detail FROM events WHERE kind IN "
                                  "('desired.set', 'desired.rolled_back')"):
        detail = json.loads(text)
        after = detail.get("after")
        if "device_at" in detail or not isinstance(after, dict):
            continue  # sent by a device, not logged by the server
        sha = after.get("bundle_sha256")
        if device_id in enrolled and sha in stored:
            pairs.add((device_id, sha))
    tx.many("INSERT INTO ever_desired (device_id, bundle_sha256) VALUES (?, ?)", sorted(pairs))


def _stored_sha(value: dict[str, object], stored: set[str], device_id: str) -> str:
    """The bundle a v1 desired value names; v1 only ever set stored bundles."""
    sha = value.get("bundle_sha256")
    if not isinstance(sha, str) or sha not in stored:
        raise RegistryError(f"cannot upgrade the registry: device {device_id!r} is (or was) "
                            f"asked to run bundle {sha!r}, which is not in the bundles table; "
                            "restore the database from a backup taken by edgefleet")
    return sha


def _parse_reports(tx: Tx) -> None:
    models = []
    for device_id, text in tx.all("SELECT id, reported FROM devices WHERE reported <> '{}' "
                                  "ORDER BY id"):
        try:
            report = decode_reported(text.encode())
        except ProtocolError as exc:
            log.warning("device %s: its stored report does not parse (%s); it counts as not "
                        "converged until it reports again", device_id, exc)
            continue
        models += [(device_id, name, m.version, m.bundle_sha256, m.state)
                   for name, m in sorted(report.models.items())]
    # Written out here, not shared with the registry's own insert: a migration must keep
    # doing what it did when it was released, whatever later versions change.
    tx.many("INSERT INTO reported_models (device_id, model, version, bundle_sha256, state) "
            "VALUES (?, ?, ?, ?, ?)", models)

"""The registry's front: :func:`open_registry` and :class:`Registry`, one method per operation.

Each method validates nothing itself and holds no SQL: it reads the clock, opens one
transaction on the :class:`~.database.Database` and calls the operation in the module of
its concept (:mod:`.devices`, :mod:`.tokens`, :mod:`.bundles`, :mod:`.desired`,
:mod:`.events`, :mod:`.telemetry`). So every public call is one transaction, and inside a
:meth:`Registry.batch` one savepoint of the batch's transaction.

Why one module of about 500 lines: it is one concept, the registry's public face, made of
some 60 methods of a few lines each (clock, transaction, call); the logic is in the concept
modules already, and splitting the class would only spread one interface over mixins.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.posterior import Delta, DeltaVerdict, Merged
from fleet_server.audit import AuditEntry
from fleet_server.ca import IssuedCertificate, RevokedCertificate
from fleet_server.errors import RegistryError
from fleet_server.monitoring.alerts import Alert, Notice
from fleet_server.monitoring.samples import Observation
from fleet_server.monitoring.series import Totals
from protocol.messages import DesiredModel, Telemetry
from stats.bandit import ArmStats

from . import (
    alerts,
    audit,
    bundles,
    ca_records,
    deltas,
    desired,
    device_messages,
    devices,
    events,
    experiments,
    metric_series,
    rollouts,
    telemetry,
    tokens,
)
from .bundle_store import BundleStore
from .database import DEFAULT_MAX_CONNECTIONS, Database, Tx, open_database
from .device_messages import DeviceMessage, DeviceSample, StoredBatch
from .experiments import ExperimentRecord
from .migrations import migrate
from .records import (
    BundleRecord,
    DeltaRecord,
    DesiredChange,
    DesiredState,
    Device,
    Enrolled,
    EventRecord,
    TelemetryRecord,
)
from .rollouts import RolloutRecord

__all__ = ["Registry", "open_registry"]

#: Ids per ``IN (...)`` list: SQLite allows 32766 host parameters per statement (999
#: before 3.32), and each of load_devices' queries names them once.
_IDS_PER_QUERY = 500


def open_registry(url: str | Path, *, blob_dir: Path | None = None,
                  clock: Callable[[], float] = time.time,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Registry:
    """Open the registry at ``url``, creating it or upgrading its schema if needed.

    ``url`` is ``postgresql://user[:password]@host[:port]/database[?options=...]``
    (``postgres://`` too), ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
    or a plain file path (SQLite). ``blob_dir`` is where :meth:`Registry.put_bundle` stores
    bundle files; ``clock`` returns the current Unix time (tests pass a fake one);
    ``max_connections`` bounds the connection pool. Raises RegistryError when the URL is
    unusable, the database cannot be opened or is newer than this code.
    """
    database = open_database(url, max_connections=max_connections)
    try:
        migrate(database)
    except BaseException:
        database.close()
        raise
    return Registry(database, store=None if blob_dir is None else BundleStore(blob_dir),
                    clock=clock)


class Registry:
    """The fleet server's state. Use :func:`open_registry`; close it (or use ``with``).

    Thread-safe: each call takes a pooled connection of its own. Several Registry objects,
    processes or (on PostgreSQL) server replicas may share one database (docs/registry.md).
    """

    def __init__(self, database: Database, *, store: BundleStore | None,
                 clock: Callable[[], float]) -> None:
        """Wrap an open, migrated database; :func:`open_registry` is the public way in."""
        self._db = database
        self._store = store
        self._clock = clock
        self.dialect = database.dialect.name

    @property
    def blob_dir(self) -> Path | None:
        """Where new bundle files are written (None: this registry cannot store bundles)."""
        return None if self._store is None else self._store.directory

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; later calls raise RegistryError. Closing twice is fine."""
        self._db.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make the calls this thread makes in the block one write transaction: one commit
        (on SQLite, one fsync) for all of them instead of one each.

        Each call inside still succeeds or fails as a whole (it runs in a savepoint), so a
        refused call (RegistryError) changes nothing and the batch goes on. Everything is
        committed together when the block ends, or nothing if the block raises or the
        commit fails. Other threads' calls go on beside it on their own connections (on
        SQLite their writes wait for it); batches do not nest.
        """
        with self._db.batch():
            yield

    def _tx(self, *, write: bool = False) -> contextlib.AbstractContextManager[Tx]:
        return self._db.transaction(write=write)

    # --- devices ---

    def upsert_device(self, device_id: str, *, group: str, profile: str,
                      cert_fingerprint: str, tags: Iterable[str] = ()) -> Device:
        """Record an enrollment: a new device, or a known one enrolling again (new
        certificate). Group, profile, fingerprint, tags and ``enrolled_at`` are replaced;
        desired and reported state are kept, so a re-imaged device gets its models back."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return devices.enroll_device(tx, now, device_id, group=group, profile=profile,
                                         cert_fingerprint=cert_fingerprint, tags=tags)

    def update_device(self, device_id: str, *, group: str | None = None,
                      tags: Iterable[str] | None = None, profile: str | None = None) -> Device:
        """Change a device's group, tags (replaced as a whole) or profile."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return devices.update_device(tx, now, device_id, group=group, tags=tags,
                                         profile=profile)

    def get_device(self, device_id: str) -> Device | None:
        """The device, or None if it never enrolled."""
        with self._tx() as tx:
            return devices.load_device(tx, device_id)

    def list_devices(self, *, group: str | None = None, tag: str | None = None,
                     online: bool | None = None) -> list[Device]:
        """Devices in id order, optionally only one group's, one tag's, or (not) online."""
        where, params = devices.device_filter(group=group, tag=tag, online=online)
        with self._tx() as tx:
            return devices.load_devices(tx, where, params)

    def get_devices(self, device_ids: Sequence[str]) -> list[Device]:
        """The enrolled devices among ``device_ids``, in id order (unknown ids left out):
        a few queries per 500 ids, or for a quarter of the fleet or more one pass over it
        (measured at 10,000 devices: 130 ms of CPU for all of them, 340 ms by id lists)."""
        wanted = sorted(set(device_ids))
        found: list[Device] = []
        with self._tx() as tx:
            fleet = tx.one("SELECT count(*) FROM devices")
            if fleet is not None and len(wanted) * 4 >= int(fleet[0]):
                keep = set(wanted)
                return [d for d in devices.load_devices(tx, "", ()) if d.id in keep]
            for start in range(0, len(wanted), _IDS_PER_QUERY):
                chunk = wanted[start:start + _IDS_PER_QUERY]
                found += devices.load_devices(
                    tx, f"WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
        return found

    @property
    def concurrent_writers(self) -> bool:
        """Whether transactions on several connections write at once (PostgreSQL), rather
        than one after another under one database lock (SQLite)."""
        return self._db.dialect.name == "postgresql"

    def device_presence(self) -> list[tuple[str, str, float | None]]:
        """(id, group, last_seen) of every device, in id order: what the offline alert
        reads, without loading and decoding whole devices (at 10,000 devices that cost every
        server process a second of CPU per alert evaluation)."""
        with self._tx() as tx:
            return devices.presence(tx)

    def unconverged(self, *, group: str | None = None) -> list[Device]:
        """Devices whose reported state does not (yet) match their desired state."""
        return [d for d in self.list_devices(group=group) if not d.converged]

    def set_online(self, device_id: str, online: bool) -> None:
        """Record a connect (also bumps ``last_seen``) or a disconnect (the broker's will)."""
        now = self._clock()
        with self._tx(write=True) as tx:
            devices.set_online(tx, now, device_id, online)

    def set_reported(self, device_id: str, payload: bytes) -> None:
        """Store the report the device sent (its ``reported`` message, parsed here once by
        ``protocol.messages``), replacing the previous one unless that one is newer by the
        device's clock within the reorder window (``device_messages.is_overtaken``), and
        mark the device seen and online. RegistryError for an unknown device or a payload
        that is not a report."""
        self._store_all([device_messages.report_from_payload(device_id, payload)])

    def store_messages(self, messages: Sequence[DeviceMessage]) -> StoredBatch:
        """Store what devices sent (reports, events, telemetry samples, in the order they
        came) with a few statements for all of them (registry/device_messages.py). Each
        device that sent something is marked seen and online (offline by its offline
        event); a report overtaken on the way is not stored; an event or sample stored
        before (same device and seq) is skipped. A message the registry refuses (an
        unknown device, a value it does not take) changes nothing: it is returned, with
        why, and the others are stored. Returns the new samples too."""
        if not messages:
            return StoredBatch([], {})
        now = self._clock()
        with self._tx(write=True) as tx:
            return device_messages.store_messages(tx, now, messages)

    def _store_all(self, messages: Sequence[DeviceMessage]) -> StoredBatch:
        """Store ``messages``, or none of them if one is refused (RegistryError)."""
        now = self._clock()
        with self._tx(write=True) as tx:
            stored = device_messages.store_messages(tx, now, messages)
            for error in stored.refused.values():
                raise error  # undoes the transaction
        return stored

    def enroll_device(self, token: str, device_id: str, *, profile: str,
                      cert_fingerprint: str, tags: Iterable[str] = (),
                      encryption_key: str | None = None) -> Enrolled:
        """Redeem ``token`` for ``device_id`` and record the device, in one transaction.

        An enrolled device id is taken only with a token issued for that id
        (``issue_token(..., device=ID)``) or after :meth:`reset_device`: a group's token
        cannot take over an existing device. RegistryError, and nothing changed (the token
        still valid), for an unknown, used, expired or unfitting token. Returns the device
        and the fingerprint of the certificate it replaced (to revoke)."""
        now = self._clock()
        with self._tx(write=True) as tx:
            claim = tokens.redeem_token(tx, now, token, device_id)
            return devices.enroll_with_token(tx, now, claim, device_id, profile=profile,
                                             cert_fingerprint=cert_fingerprint, tags=tags,
                                             encryption_key=encryption_key)

    def reset_device(self, device_id: str) -> Device:
        """Mark the device reset by the operator: any valid token may now enroll its id
        again (group, tags and desired state kept until then). Returns the device as it was
        enrolled, whose certificate the caller revokes. RegistryError if unknown."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return devices.reset_device(tx, now, device_id)

    # --- enrollment tokens ---

    def issue_token(self, group: str, ttl: float, device: str | None = None) -> str:
        """A new one-time enrollment token for ``group``, valid for ``ttl`` seconds; with
        ``device``, for that device id only, which it may take even if enrolled (the
        operator's consent to re-enroll it).

        The plaintext is returned here only; the registry keeps its SHA-256."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return tokens.issue_token(tx, now, group, ttl, device)

    def redeem_token(self, token: str, device_id: str) -> str:
        """Use up ``token`` for ``device_id``; returns the group it enrolls into.

        Atomic: of any number of concurrent redeems of one token (threads, processes, server
        replicas) exactly one succeeds. Raises RegistryError for an unknown, used or expired
        token, or one issued for another device id; a refused redeem changes nothing.
        (:meth:`enroll_device` also decides whether the id may be taken.)"""
        now = self._clock()
        with self._tx(write=True) as tx:
            return tokens.redeem_token(tx, now, token, device_id).group

    # --- bundles ---

    def put_bundle(self, data: bytes, name: str, version: int, *, metadata_version: int = 0,
                   rollback_of: int | None = None) -> BundleRecord:
        """Store a bundle file as ``<blob_dir>/<sha256>.efb`` and record it, with the
        version of its TUF metadata and, for a re-release, the version it restores.

        Idempotent: the same bytes again return the existing record (and restore its blob
        file if it went missing or was damaged). Raises RegistryError when another bundle
        already has this name and version, or when the same bytes were stored under another
        name or version."""
        if self._store is None:
            raise RegistryError("this registry has no blob directory for bundle files; "
                                "open it with open_registry(url, blob_dir=DIR)")
        bundles.check_bundle(name, version)
        sha = hashlib.sha256(data).hexdigest()
        # Check before writing the file (a clash should not leave a file behind), write it
        # outside the transaction (fsync of a large file should not hold the write lock),
        # then record it, checking again. A crash in between leaves an unrecorded file whose
        # name is its hash: harmless, and the next put of the same bytes reuses it.
        with self._tx() as tx:
            known = bundles.find_bundle(tx, sha, name, version)
        # A known bundle is repaired where its record points, even if that is another
        # (earlier) blob directory.
        path = known.path if known is not None else self._store.path_for(sha)
        self._store.save(data, sha, path)
        now = self._clock()
        with self._tx(write=True) as tx:
            return bundles.record_bundle(tx, now, sha, name, version, size=len(data), path=path,
                                         metadata_version=metadata_version,
                                         rollback_of=rollback_of)

    def put_delta(self, data: bytes, bundle_sha256: str, base_version: int) -> DeltaRecord:
        """Store a delta bundle of the stored full bundle ``bundle_sha256``, carrying the
        deltas from ``base_version`` (the caller verified it belongs to that release).
        Idempotent like :meth:`put_bundle`; RegistryError if the full bundle is not stored
        or already has another delta from that version."""
        if self._store is None:
            raise RegistryError("this registry has no blob directory for bundle files; "
                                "open it with open_registry(url, blob_dir=DIR)")
        sha = hashlib.sha256(data).hexdigest()
        with self._tx() as tx:
            known = deltas.get_delta(tx, sha)
        path = known.path if known is not None else self._store.path_for(sha)
        self._store.save(data, sha, path)
        now = self._clock()
        with self._tx(write=True) as tx:
            return deltas.record_delta(tx, now, sha, bundle_sha256, base_version,
                                       size=len(data), path=path)

    def get_delta(self, sha256: str) -> DeltaRecord | None:
        """The delta bundle with this content hash, or None."""
        with self._tx() as tx:
            return deltas.get_delta(tx, sha256)

    def deltas_of(self, bundle_sha256: str) -> list[DeltaRecord]:
        """The delta bundles of a stored full bundle, by base version."""
        with self._tx() as tx:
            return deltas.deltas_of(tx, bundle_sha256)

    def get_bundle(self, sha256: str) -> BundleRecord | None:
        """The bundle with this content hash, or None."""
        with self._tx() as tx:
            return bundles.get_bundle(tx, sha256)

    def release_versions(self, name: str) -> tuple[int, int]:
        """The highest version of model ``name`` stored (0: none) and the highest metadata
        version of any stored bundle (0: none): a new release must exceed both."""
        with self._tx() as tx:
            return bundles.release_versions(tx, name)

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        """Stored bundles by name then version, optionally of one model only."""
        with self._tx() as tx:
            return bundles.list_bundles(tx, name)

    # --- desired state and rollback ---

    def set_desired(self, bundle_sha256: str, *, devices: Sequence[str] | None = None,
                    group: str | None = None) -> list[DesiredChange]:
        """Ask the given devices, or every device of ``group``, to run this stored bundle
        (its name is the model, its version the version), in one transaction.

        Each device's previous value for the model is kept, so :meth:`rollback` can restore
        it. Devices already at this bundle are left alone. Returns the changes made."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return desired.set_desired(tx, now, bundle_sha256, devices, group)

    def clear_desired(self, model: str, *, devices: Sequence[str] | None = None,
                      group: str | None = None) -> list[DesiredChange]:
        """Stop asking the devices (or ``group``) to run ``model``; rollback restores it."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return desired.clear_desired(tx, now, model, devices, group)

    def set_desired_models(self, model: str, targets: Mapping[str, DesiredModel | None],
                           ) -> list[DesiredChange]:
        """Set ``model`` on each device to its own target, carrying what the target carries
        (a shadow candidate, ``compare_previous``; None: not desired), in one transaction.
        Rollouts use this; each change is pushed on the history as :meth:`set_desired`'s
        are. RegistryError for an unknown device or a bundle that is not stored."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return desired.set_models(tx, now, model, targets)

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None, dry_run: bool = False,
                 substitute: Mapping[str, DesiredModel] | None = None) -> list[DesiredChange]:
        """Undo the last desired-state change of each device (of ``model`` only, if given),
        for the given devices or every device of ``group``, in one transaction.

        Changes form a stack per device and model: rolling back twice undoes two changes.
        Devices with nothing to undo are skipped; RegistryError if none had anything.
        ``dry_run`` returns the changes without making them. ``substitute`` maps the sha256
        of a bundle to go back to onto what to desire instead (its re-release under a new
        version, which is how devices accept it); RegistryError, and nothing changed, if a
        bundle to go back to has no substitute then (the history moved since the dry run)."""
        now = self._clock()
        with self._tx(write=not dry_run) as tx:
            return desired.roll_back(tx, now, devices, group, model, dry_run=dry_run,
                                     substitute=substitute)

    def desired_states(self, device_ids: Sequence[str]) -> list[DesiredState]:
        """What the desired-state messages of the enrolled devices among ``device_ids``
        are made of, in id order: a few queries for all of them."""
        with self._tx() as tx:
            return desired.desired_states_of(tx, device_ids)

    def desired_states_page(self, *, group: str | None = None, after: str = "",
                            limit: int = 2000) -> list[DesiredState]:
        """The same for ``group``'s devices (None: all) after id ``after``, ``limit`` at
        most, in id order: page through a fleet with bounded memory (empty: the end)."""
        with self._tx() as tx:
            return desired.desired_states_page(tx, group, after, limit)

    def was_desired(self, device_id: str, bundle_sha256: str) -> bool:
        """Whether this bundle is, or at some time was, in the device's desired state.

        The fleet server serves a device only such bundles, so a device cannot fetch blobs it
        was never asked to run; rollbacks do not take that permission back."""
        with self._tx() as tx:
            return desired.was_desired(tx, device_id, bundle_sha256)

    def bundle_access(self, device_id: str, bundle_sha256: str) -> tuple[str, bool] | None:
        """What the bundle endpoint checks for one download, in one query: the fingerprint
        of the device's enrolled certificate and whether the bundle is or was in its desired
        state (:meth:`was_desired`); None for an unknown or reset device."""
        with self._tx() as tx:
            return desired.bundle_access(tx, device_id, bundle_sha256)

    # --- the fleet CA's shared records (fleet_server.ca.CARecords) ---

    def record_issued_certificate(self, record: IssuedCertificate) -> None:
        """Keep a device certificate the CA issued, so any server process can revoke it."""
        with self._tx(write=True) as tx:
            ca_records.add_issued(tx, record)

    def issued_certificate(self, fingerprint: str) -> IssuedCertificate | None:
        """The device certificate issued with ``fingerprint``; None if not recorded."""
        with self._tx() as tx:
            return ca_records.issued(tx, fingerprint.lower())

    def record_revocation(self, record: RevokedCertificate) -> bool:
        """Keep a revocation; False if that certificate was revoked already."""
        with self._tx(write=True) as tx:
            return ca_records.add_revoked(tx, record)

    def revocations(self) -> list[RevokedCertificate]:
        """Every revocation recorded, oldest first: what each process's CRL lists."""
        with self._tx() as tx:
            return ca_records.revoked(tx)

    # --- events ---

    def add_event(self, kind: str, *, device: str | None = None,
                  detail: Mapping[str, Any] | None = None, seq: int | None = None) -> int:
        """Append an event; returns its id. ``device`` need not be enrolled (a refused
        connection is worth logging too). An event a device numbered (``seq``, unique per
        device) is stored once: sent again, it is skipped and 0 is returned."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return events.add_event(tx, now, kind, device, detail, seq=seq)

    def events(self, since_id: int = 0, *, device: str | None = None,
               limit: int = 1000, newest: bool = False) -> list[EventRecord]:
        """Events with id greater than ``since_id`` in id order, at most ``limit`` of them
        (the oldest ones, or with ``newest`` the newest), optionally of one device only.
        Poll with the last id seen to follow the log."""
        with self._tx() as tx:
            return events.list_events(tx, since_id, device, limit, newest)

    # --- telemetry ---

    def add_telemetry(self, device_id: str, samples: Iterable[Telemetry]) -> int:
        """Store a batch of a device's telemetry and mark it seen; returns how many samples
        were new. A sample whose seq is already stored is skipped (the device re-sent its
        buffer after a lost acknowledgement), so re-sending a batch never duplicates rows.
        RegistryError, and nothing stored, for an unknown device or unstorable metrics."""
        return len(self._store_all([DeviceSample(device_id, s) for s in samples]).new_samples)

    def telemetry(self, device_id: str, *, since_seq: int = 0,
                  limit: int = 1000) -> list[TelemetryRecord]:
        """One device's samples with seq greater than ``since_seq``, in seq order."""
        with self._tx() as tx:
            return telemetry.list_telemetry(tx, device_id, since_seq, limit)

    def latest_telemetry(self, *, group: str | None = None) -> dict[str, TelemetryRecord]:
        """Each device's newest sample (highest seq), by device id; optionally one group's."""
        with self._tx() as tx:
            return telemetry.latest_telemetry(tx, group)

    def telemetry_since(self, device_ids: Sequence[str], since: float, *,
                        limit: int = 100_000) -> list[TelemetryRecord]:
        """Samples of these devices taken at or after ``since`` (device time), by device then
        seq, at most ``limit``."""
        with self._tx() as tx:
            return telemetry.telemetry_since(tx, device_ids, since, limit)

    def prune_telemetry(self, *, before: float) -> int:
        """Delete samples taken before ``before`` (Unix time); returns how many."""
        with self._tx(write=True) as tx:
            return telemetry.prune_telemetry(tx, before)

    # --- monitoring: time series and alerts (fleet_server.monitoring) ---

    def record_metrics(self, samples: Iterable[tuple[str, float, Iterable[Observation]]],
                       ) -> int:
        """Add samples' observations, each (device, time taken, observations), to the
        devices' time series in one call (the ingest thread's batch makes one)."""
        with self._tx(write=True) as tx:
            return metric_series.record(tx, samples)

    def metric_totals(self, *, since: float, until: float, by: Sequence[str] = (),
                      where: Mapping[str, Any] | None = None) -> list[Totals]:
        """Time series summed over [since, until) per value of ``by`` (device, group,
        profile, model, version), only the points matching ``where``."""
        with self._tx() as tx:
            return metric_series.totals(tx, since=since, until=until, by=by,
                                        where=dict(where or {}))

    def metric_series(self, *, since: float, until: float, step: int,
                      where: Mapping[str, Any] | None = None) -> list[Totals]:
        """Time series over [since, until) summed per ``step`` seconds."""
        with self._tx() as tx:
            return metric_series.series(tx, since=since, until=until, step=step,
                                        where=dict(where or {}))

    def compact_metrics(self, *, minutes_before: float, hours_before: float,
                        ) -> tuple[int, int]:
        """Roll old minute points into hour points and delete expired hour points."""
        with self._tx(write=True) as tx:
            return metric_series.compact(tx, minutes_before=minutes_before,
                                         hours_before=hours_before)

    def rollout_states(self) -> dict[str, int]:
        """Rollouts per status."""
        with self._tx() as tx:
            return metric_series.rollout_states(tx)

    def raise_alert(self, kind: str, key: str, summary: str,
                    detail: Mapping[str, Any]) -> Notice | None:
        """Raise an alert; the notice to send if it started firing (else it is counted)."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return alerts.raise_alert(tx, now, kind, key, summary, detail=detail)

    def resolve_alert(self, kind: str, key: str) -> Notice | None:
        """Resolve an alert; the notice to send if it was firing."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return alerts.resolve_alert(tx, now, kind, key)

    def alerts(self, *, firing_only: bool = False, kind: str | None = None,
               limit: int = 1000) -> list[Alert]:
        """Alerts, most recently changed first."""
        with self._tx() as tx:
            return alerts.list_alerts(tx, firing_only=firing_only, kind=kind, limit=limit)

    # --- rollouts ---

    def save_rollout(self, record: RolloutRecord) -> None:
        """Store a rollout: revision 1 creates it, revision N replaces revision N - 1
        (RegistryError if another writer got there first, or the id is taken)."""
        with self._tx(write=True) as tx:
            rollouts.save_rollout(tx, record)

    def get_rollout(self, rollout_id: str) -> RolloutRecord | None:
        """The rollout, or None."""
        with self._tx() as tx:
            return rollouts.load_rollout(tx, rollout_id)

    def list_rollouts(self, *, statuses: tuple[str, ...] | None = None,
                      limit: int = 100) -> list[RolloutRecord]:
        """Rollouts, newest first, optionally only those in ``statuses``."""
        with self._tx() as tx:
            return rollouts.list_rollouts(tx, statuses, limit)

    # --- experiments (registry/experiments.py) ---

    def create_experiment(self, record: ExperimentRecord, arms: Sequence[str],
                          devices: Sequence[str]) -> None:
        """Store a new experiment (RegistryError if the name was ever used)."""
        with self._tx(write=True) as tx:
            experiments.create_experiment(tx, record, arms, devices)

    def get_experiment(self, name: str) -> ExperimentRecord | None:
        """The experiment, or None."""
        with self._tx() as tx:
            return experiments.load_experiment(tx, name)

    def list_experiments(self, *, status: str | None = None,
                         limit: int = 100) -> list[ExperimentRecord]:
        """Experiments, newest first."""
        with self._tx() as tx:
            return experiments.list_experiments(tx, status, limit)

    def end_experiment(self, name: str, status: str, detail: Mapping[str, Any]) -> None:
        """Set an experiment's status (``stopped``, ``promoted``) and detail."""
        now = self._clock()
        with self._tx(write=True) as tx:
            experiments.set_status(tx, name, status, now, detail)

    def experiment_arms(self, name: str) -> dict[str, ArmStats]:
        """The experiment's merged arm sums."""
        with self._tx() as tx:
            return experiments.arm_sums(tx, name)

    def experiment_devices(self, name: str) -> list[str]:
        """The devices taking part in the experiment."""
        with self._tx() as tx:
            return experiments.participants(tx, name)

    def experiment_declarations(self, device_id: str) -> list[dict[str, Any]]:
        """What the desired state of ``device_id`` declares: its running experiments."""
        with self._tx() as tx:
            return experiments.declarations_of(tx, device_id)

    def apply_experiment_delta(self, delta: Delta) -> DeltaVerdict:
        """Count a device's delta once (``experiments.posterior.apply_delta``'s rule)."""
        with self._tx(write=True) as tx:
            return experiments.apply_delta(tx, delta)

    def experiment_push(self, name: str, device_id: str) -> Merged | None:
        """The merged posterior to push to the device (None if not taking part)."""
        with self._tx() as tx:
            return experiments.push_for(tx, name, device_id)

    # --- audit log ---

    def append_audit(self, actor: str, action: str, target: str, reason: str = "",
                     detail: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append a hash-chained entry to the audit log (docs/rollouts.md, "Audit log")."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return audit.append_audit(tx, AuditEntry(0, now, actor, action, target, reason,
                                                     dict(detail or {})))

    def audit_log(self, *, since_seq: int = 0, limit: int = 1000) -> list[AuditEntry]:
        """Audit entries after ``since_seq``, oldest first, at most ``limit``."""
        with self._tx() as tx:
            return audit.list_audit(tx, since_seq, limit)

    def last_audit(self, action: str) -> AuditEntry | None:
        """The newest audit entry of ``action``, or None."""
        with self._tx() as tx:
            return audit.last_audit(tx, action)

    def audit_head(self) -> tuple[int, str]:
        """The audit log's head: how many entries were appended, and the newest's hash."""
        with self._tx() as tx:
            return audit.audit_head(tx)

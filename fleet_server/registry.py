"""The fleet server's persistent state: devices, enrollment tokens, bundles, desired and
reported state, events and telemetry. SQLite by default, PostgreSQL by URL.

Open it with :func:`open_registry`; one :class:`Registry` is safe to share between threads
(the server's HTTP and MQTT threads). Records come back as frozen dataclasses. The schema,
the URL forms and the concurrency guarantees are described in docs/registry.md.

Both databases run the same SQL. What differs (placeholders, auto-increment keys, row
locks, how a transaction starts, how the new id of an insert is read) lives in
:class:`_Dialect` and the two small backend classes, and nowhere else.

Timestamps are Unix seconds (UTC) as floats, like the agent's records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from common.atomic import write_atomic
from protocol.names import InvalidNameError, check_name

from .errors import RegistryError

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "SCHEMA_VERSION",
    "BundleRecord",
    "DesiredChange",
    "DesiredModel",
    "Device",
    "Enrolled",
    "Event",
    "Registry",
    "TelemetryRecord",
    "TelemetrySample",
    "is_converged",
    "open_registry",
]

log = logging.getLogger(__name__)

#: Version of the table layout; stored in ``schema_version``. Bump it with a migration.
SCHEMA_VERSION = 2

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_X25519_B64 = re.compile(r"[A-Za-z0-9+/]{43}=")
_MAX_LABEL = 128
#: SQLite allows 32766 host parameters per statement (999 before 3.32); stay well below.
_IN_CHUNK = 500
#: How long a writer waits for another process's SQLite write lock before failing.
_SQLITE_BUSY_TIMEOUT_S = 10.0
#: Any constant shared by every fleet server: serialises schema creation on PostgreSQL, where
#: two replicas racing through CREATE TABLE IF NOT EXISTS can collide in the catalog.
_PG_SCHEMA_LOCK = 0x6564_6765_666C_74  # "edgeflt"
#: The reported-install state that counts as converged (agent.install_state.COMMITTED).
_COMMITTED = "committed"


# --- records ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DesiredModel:
    """What one device should run for one model: a version and the exact bundle."""

    version: int
    bundle_sha256: str

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored and published in the device's desired state."""
        return {"version": self.version, "bundle_sha256": self.bundle_sha256}

    @classmethod
    def from_json(cls, obj: Any) -> DesiredModel:
        """Inverse of :meth:`to_json`."""
        return cls(int(obj["version"]), str(obj["bundle_sha256"]))


@dataclass(frozen=True)
class Device:
    """One enrolled device, as the registry last recorded it.

    ``desired`` is what the server wants it to run (model name -> :class:`DesiredModel`);
    ``reported`` is the JSON object the device last sent, unchanged (see
    :func:`is_converged` for the part the registry reads).
    """

    id: str
    group: str
    tags: tuple[str, ...]
    profile: str
    cert_fingerprint: str
    enrolled_at: float
    last_seen: float | None
    online: bool
    desired: Mapping[str, DesiredModel]
    reported: Mapping[str, Any]
    reported_at: float | None
    #: The public half of the device's X25519 key (base64 of 32 raw bytes), which bundles
    #: are encrypted for; None for a device enrolled without one.
    encryption_key: str | None = None
    #: When the operator reset the device (its certificate revoked, its id free for any
    #: token); None once it enrolled again, or if it never was.
    reset_at: float | None = None

    @property
    def converged(self) -> bool:
        """Whether the device reports running everything it is asked to run."""
        return is_converged(self.desired, self.reported)

    def desired_json(self) -> dict[str, dict[str, Any]]:
        """The desired state as the JSON object published to the device."""
        return {name: d.to_json() for name, d in sorted(self.desired.items())}


@dataclass(frozen=True)
class DesiredChange:
    """One device's desired state for one model went from ``before`` to ``after``.

    ``None`` means the model was absent (not desired)."""

    device: str
    model: str
    before: DesiredModel | None
    after: DesiredModel | None


@dataclass(frozen=True)
class BundleRecord:
    """A stored bundle: the blob is ``path``, named by its content hash."""

    sha256: str
    name: str
    version: int
    size: int
    path: Path
    created_at: float
    #: The version of the bundle's TUF timestamp, snapshot and targets metadata (0: stored
    #: before the registry recorded it).
    metadata_version: int = 0
    #: For a re-release (a rollback): the version whose contents it carries.
    rollback_of: int | None = None


@dataclass(frozen=True)
class Enrolled:
    """What an enrollment did: the device as now recorded, and the certificate it replaced
    (its fingerprint; None for a new or a reset device), which must be revoked."""

    device: Device
    replaced_fingerprint: str | None


@dataclass(frozen=True)
class Event:
    """One entry of the append-only event log. ``device`` is None for fleet-wide events."""

    id: int
    at: float
    device: str | None
    kind: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class TelemetrySample:
    """One telemetry message from a device. ``seq`` is the device's own sequence number and
    must never repeat for that device: a (device, seq) already stored is a re-send."""

    seq: int
    at: float
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class TelemetryRecord:
    """A stored telemetry sample and the device it came from."""

    device: str
    seq: int
    at: float
    payload: Mapping[str, Any]


def is_converged(desired: Mapping[str, DesiredModel], reported: Mapping[str, Any]) -> bool:
    """Whether ``reported`` shows every desired model installed and committed.

    The registry reads only ``reported["models"][name]``: ``version`` must equal the desired
    version; ``bundle_sha256``, when present, must equal the desired bundle; ``state``, when
    present, must be ``"committed"`` (a model still in probation may yet roll back). Models
    the device runs but that are not desired do not count. No desired models: converged.
    """
    models = reported.get("models")
    if not isinstance(models, Mapping):
        return not desired
    for name, want in desired.items():
        got = models.get(name)
        if not isinstance(got, Mapping):
            return False
        version = got.get("version")
        # bool is an int in Python; a device reporting "version": true is not at version 1.
        if isinstance(version, bool) or version != want.version:
            return False
        if got.get("bundle_sha256", want.bundle_sha256) != want.bundle_sha256:
            return False
        if got.get("state", _COMMITTED) != _COMMITTED:
            return False
    return True


# --- dialects and backends ----------------------------------------------------------------

@dataclass(frozen=True)
class _Dialect:
    """Everything that differs between the two databases' SQL."""

    name: str
    placeholder: str
    #: Column definition of an auto-increment primary key named ``id``.
    id_column: str
    #: Suffix of a SELECT that is read, modified and written back in the same transaction.
    #: SQLite needs none: BEGIN IMMEDIATE already holds the one database-wide write lock.
    for_update: str
    #: Statement returning the id of the last insert, or None to use ``RETURNING id``
    #: (SQLite has RETURNING only since 3.35; last_insert_rowid() works everywhere).
    last_id_sql: str | None


_SQLITE = _Dialect(name="sqlite", placeholder="?",
                   id_column="id INTEGER PRIMARY KEY AUTOINCREMENT",
                   for_update="", last_id_sql="SELECT last_insert_rowid()")
_POSTGRES = _Dialect(name="postgresql", placeholder="%s",
                     id_column="id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                     for_update=" FOR UPDATE", last_id_sql=None)


class _Cursor(Protocol):
    """What the registry uses of a DB-API cursor (sqlite3 and psycopg both have it)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: tuple[Any, ...], /) -> object: ...

    def executemany(self, sql: str, params: list[tuple[Any, ...]], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Tx:
    """One open transaction. SQL is written once with ``?`` placeholders."""

    def __init__(self, cursor: _Cursor, dialect: _Dialect) -> None:
        self._cur = cursor
        self.dialect = dialect
        self._savepoints = 0

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[_Tx]:
        """A nested transaction: what the block changed is undone if it raises. If undoing
        fails (the database itself failed), that error is raised instead."""
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self._cur.execute(f"SAVEPOINT {name}", ())
        try:
            yield self
        except BaseException:
            self._cur.execute(f"ROLLBACK TO SAVEPOINT {name}", ())
            self._cur.execute(f"RELEASE SAVEPOINT {name}", ())
            raise
        else:
            self._cur.execute(f"RELEASE SAVEPOINT {name}", ())
        finally:
            self._savepoints -= 1

    def _sql(self, sql: str) -> str:
        # No statement of this module has a literal '?' or '%', so this is a plain rewrite.
        return sql if self.dialect.placeholder == "?" else sql.replace("?", "%s")

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute one statement; returns the number of rows it changed."""
        self._cur.execute(self._sql(sql), tuple(params))
        return self._cur.rowcount

    def many(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        """Execute one statement per row; returns the total number of rows changed."""
        batch = [tuple(r) for r in rows]
        if not batch:
            return 0
        self._cur.executemany(self._sql(sql), batch)
        return self._cur.rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of a query, or None."""
        self._cur.execute(self._sql(sql), tuple(params))
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""
        self._cur.execute(self._sql(sql), tuple(params))
        return [tuple(r) for r in self._cur.fetchall()]

    def insert_id(self, sql: str, params: Sequence[Any]) -> int:
        """Run an INSERT into a table with an auto-increment ``id``; returns the new id."""
        if self.dialect.last_id_sql is None:
            row = self.one(sql + " RETURNING id", params)
        else:
            self.run(sql, params)
            row = self.one(self.dialect.last_id_sql)
        assert row is not None  # an INSERT that did not raise inserted a row
        return int(row[0])


class _Backend(Protocol):
    dialect: _Dialect

    def transaction(self, *, write: bool) -> contextlib.AbstractContextManager[_Tx]: ...

    def close(self) -> None: ...


class _SqliteBackend:
    """One sqlite3 connection in WAL mode; transactions are explicit."""

    dialect = _SQLITE

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit BEGIN; transaction() says where they start.
            # check_same_thread=False: the Registry's lock serialises every use.
            conn = sqlite3.connect(path, timeout=_SQLITE_BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open the SQLite database {path} ({exc}); check that "
                                "the directory exists and is writable") from exc
        try:
            # WAL: readers (the operator CLI) never block the server's writes, nor the reverse.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("%s: SQLite refused WAL mode (journal_mode=%s); readers and "
                            "writers will block each other", path, mode)
            conn.execute("PRAGMA foreign_keys=ON")
            # synchronous stays FULL (the default): an enrollment the server acknowledged
            # must survive a power cut, and registry writes are few.
        except sqlite3.Error as exc:
            conn.close()
            raise RegistryError(f"{path} is not a usable SQLite database ({exc}); point the "
                                "registry at a new file or at the fleet's database") from exc
        self._conn = conn

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[_Tx]:
        """A transaction; a writer takes the write lock up front (BEGIN IMMEDIATE) so two
        processes never both read and then fail to upgrade (SQLITE_BUSY mid-transaction)."""
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _Tx(cur, self.dialect)
                cur.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: a transaction left open would make every later
                # BEGIN on this connection fail.
                if self._conn.in_transaction:
                    cur.execute("ROLLBACK")
                raise
        finally:
            cur.close()

    def close(self) -> None:
        self._conn.close()


class _PostgresBackend:
    """One psycopg connection; reconnects once it is broken (server restart, network)."""

    dialect = _POSTGRES

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            import psycopg
        except ImportError as exc:
            raise RegistryError("PostgreSQL needs the psycopg package: pip install "
                                "'edgefleet[server]'") from exc
        try:
            # autocommit: transactions are opened explicitly by transaction() below.
            return psycopg.connect(self._url, autocommit=True)
        except psycopg.Error as exc:
            raise RegistryError(
                f"cannot connect to {_redact(self._url)} ({_one_line(exc)}); check that "
                "PostgreSQL runs there and that the user, password and database exist") from exc

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[_Tx]:
        """A READ COMMITTED transaction; writers lock the rows they rewrite (FOR UPDATE)."""
        del write  # PostgreSQL locks rows, not the database: one kind of transaction suffices
        if self._conn.broken:
            # A failed call left the connection dead; that call already raised, the next one
            # should not fail too.
            log.warning("connection to %s was lost; reconnecting", _redact(self._url))
            self._conn.close()
            self._conn = self._connect()
        with self._conn.transaction(), self._conn.cursor() as cur:
            yield _Tx(cur, self.dialect)

    def close(self) -> None:
        self._conn.close()


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines (with tabs); an error message here is one line."""
    return " ".join(str(exc).split())


def _schema(d: _Dialect) -> list[str]:
    """CREATE statements, idempotent. JSON is stored as TEXT on both databases."""
    return [
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        """CREATE TABLE IF NOT EXISTS devices (
            id TEXT PRIMARY KEY,
            group_name TEXT NOT NULL,
            profile TEXT NOT NULL,
            cert_fingerprint TEXT NOT NULL,
            enrolled_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION,
            online BOOLEAN NOT NULL,
            desired TEXT NOT NULL,
            reported TEXT NOT NULL,
            reported_at DOUBLE PRECISION)""",
        "CREATE INDEX IF NOT EXISTS devices_group ON devices (group_name)",
        """CREATE TABLE IF NOT EXISTS device_tags (
            device_id TEXT NOT NULL REFERENCES devices (id),
            tag TEXT NOT NULL,
            PRIMARY KEY (device_id, tag))""",
        "CREATE INDEX IF NOT EXISTS device_tags_tag ON device_tags (tag)",
        """CREATE TABLE IF NOT EXISTS enrollment_tokens (
            token_sha256 TEXT PRIMARY KEY,
            group_name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL,
            used_at DOUBLE PRECISION,
            used_by TEXT)""",
        """CREATE TABLE IF NOT EXISTS bundles (
            sha256 TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            size BIGINT NOT NULL,
            path TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (name, version))""",
        f"""CREATE TABLE IF NOT EXISTS desired_history (
            {d.id_column},
            device_id TEXT NOT NULL REFERENCES devices (id),
            model TEXT NOT NULL,
            previous TEXT,
            at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS desired_history_device "
        "ON desired_history (device_id, model, id)",
        f"""CREATE TABLE IF NOT EXISTS events (
            {d.id_column},
            at DOUBLE PRECISION NOT NULL,
            device_id TEXT,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS events_device ON events (device_id, id)",
        # The seqs of device events stored (add_event with seq): a re-send is skipped.
        """CREATE TABLE IF NOT EXISTS device_event_seqs (
            device_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (device_id, seq))""",
        """CREATE TABLE IF NOT EXISTS telemetry (
            device_id TEXT NOT NULL REFERENCES devices (id),
            seq BIGINT NOT NULL,
            at DOUBLE PRECISION NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (device_id, seq))""",
        "CREATE INDEX IF NOT EXISTS telemetry_at ON telemetry (at)",
    ]


#: Schema v2 (docs/registry.md): device encryption keys and resets, tokens bound to one
#: device id, and each bundle's TUF metadata version and the version it re-releases.
_V2_TRUST = (
    "ALTER TABLE devices ADD COLUMN encryption_key TEXT",
    "ALTER TABLE devices ADD COLUMN reset_at DOUBLE PRECISION",
    "ALTER TABLE enrollment_tokens ADD COLUMN device_id TEXT",
    "ALTER TABLE bundles ADD COLUMN metadata_version BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE bundles ADD COLUMN rollback_of BIGINT",
)


# --- opening ------------------------------------------------------------------------------

def open_registry(url: str | Path, *, blob_dir: Path | None = None,
                  clock: Callable[[], float] = time.time) -> Registry:
    """Open (creating if needed) the registry at ``url``.

    ``url`` is ``postgresql://user[:password]@host[:port]/database[?options=...]``
    (``postgres://`` too), ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
    or a plain file path (SQLite). ``blob_dir`` is where :meth:`Registry.put_bundle` stores
    bundle files; ``clock`` returns the current Unix time (tests pass a fake one).
    Raises RegistryError when the URL is unusable or the database cannot be opened.
    """
    backend = _backend_for(url)
    try:
        registry = Registry(backend, blob_dir=blob_dir, clock=clock)
        registry.init_schema()
    except BaseException:
        backend.close()
        raise
    return registry


def _backend_for(url: str | Path) -> _Backend:
    if isinstance(url, Path):
        return _SqliteBackend(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SqliteBackend(Path(url))
    if scheme in ("postgresql", "postgres"):
        return _PostgresBackend(url)
    if scheme == "sqlite":
        # As SQLAlchemy: sqlite:///fleet.db is relative, sqlite:////var/lib/fleet.db absolute.
        if not rest.startswith("/") or rest == "/":
            raise RegistryError(f"{url!r}: a SQLite URL is sqlite:///relative/path.db or "
                                "sqlite:////absolute/path.db (or give a plain file path)")
        return _SqliteBackend(Path(rest[1:]))
    raise RegistryError(f"unsupported database URL scheme {scheme!r} in {_redact(url)!r}; use "
                        "postgresql://... or sqlite:///... or a plain file path")


# --- the registry -------------------------------------------------------------------------

class Registry:
    """The fleet server's state. Use :func:`open_registry`; close it (or use ``with``).

    Thread-safe: one lock serialises this object's use of its single connection. Several
    Registry objects or processes on one database are safe too (docs/registry.md says how).
    """

    def __init__(self, backend: _Backend, *, blob_dir: Path | None,
                 clock: Callable[[], float]) -> None:
        """Wrap an open backend; :func:`open_registry` is the public way in."""
        self._backend: _Backend | None = backend
        self._lock = threading.RLock()
        self._batch: _Tx | None = None  # the open batch() transaction, if any
        self._clock = clock
        self.blob_dir = None if blob_dir is None else blob_dir.resolve()
        self.dialect = backend.dialect.name

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; later calls raise RegistryError. Closing twice is fine."""
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make the calls in the block one write transaction: one commit (on SQLite, one
        fsync) for all of them instead of one each.

        Each call inside still succeeds or fails as a whole (it runs in a savepoint), so a
        refused call (RegistryError) changes nothing and the batch goes on. Everything is
        committed together when the block ends, or nothing if the block raises or the
        commit fails. Other threads' calls wait until the batch ends; batches do not nest.
        """
        with self._lock:
            if self._batch is not None:
                raise RuntimeError("Registry.batch() does not nest")
            if self._backend is None:
                raise RegistryError("the registry is closed; open it again with "
                                    "open_registry()")
            with self._backend.transaction(write=True) as tx:
                self._batch = tx
                try:
                    yield
                finally:
                    self._batch = None

    @contextlib.contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[_Tx]:
        with self._lock:
            if self._batch is not None:
                # Inside this thread's batch (the lock is held by it): one call = a savepoint.
                with self._batch.savepoint() as tx:
                    yield tx
                return
            if self._backend is None:
                raise RegistryError("the registry is closed; open it again with "
                                    "open_registry()")
            with self._backend.transaction(write=write) as tx:
                yield tx

    def init_schema(self) -> None:
        """Create missing tables and check the schema version (done by open_registry)."""
        with self._tx(write=True) as tx:
            if tx.dialect.name == "postgresql":
                tx.run("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
            for statement in _schema(tx.dialect):
                tx.run(statement)
            row = tx.one("SELECT version FROM schema_version")
            found = 1 if row is None else int(row[0])  # the CREATEs above are v1
            if found > SCHEMA_VERSION:
                raise RegistryError(
                    f"the database has registry schema v{found}, newer than this edgefleet "
                    f"understands (v{SCHEMA_VERSION}); upgrade edgefleet on this machine")
            if found < 2:
                for statement in _V2_TRUST:
                    tx.run(statement)
            if row is None:
                tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif found != SCHEMA_VERSION:
                tx.run("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # --- devices ---

    def upsert_device(self, device_id: str, *, group: str, profile: str,
                      cert_fingerprint: str, tags: Iterable[str] = (),
                      encryption_key: str | None = None) -> Device:
        """Record an enrollment: a new device, or a known one enrolling again (new
        certificate). Group, profile, fingerprint, tags, encryption key and ``enrolled_at``
        are replaced, a reset is cleared; desired and reported state are kept, so a
        re-imaged device gets its models back. :meth:`enroll_device` is the checked way
        (token and take-over rule in the same transaction)."""
        _check_device_id(device_id)
        fields = _enrollment_fields(group, profile, cert_fingerprint, tags, encryption_key)
        now = self._clock()
        with self._tx(write=True) as tx:
            known = tx.one("SELECT id FROM devices WHERE id = ?", (device_id,)) is not None
            return _upsert_device(tx, now, device_id, known, fields)

    def enroll_device(self, token: str, device_id: str, *, profile: str,
                      cert_fingerprint: str, tags: Iterable[str] = (),
                      encryption_key: str | None = None) -> Enrolled:
        """Redeem ``token`` for ``device_id`` and record the device, in one transaction.

        A device id that is enrolled already is taken only with a token issued for that id
        (``issue_token(..., device=ID)``) or after :meth:`reset_device`: a token for a group
        cannot take over an existing device. RegistryError (and nothing changed, the token
        still valid) for an unknown, used, expired or unfitting token."""
        _check_device_id(device_id)
        digest = _token_digest(token)
        now = self._clock()
        with self._tx(write=True) as tx:
            lock = tx.dialect.for_update
            row = tx.one("SELECT group_name, expires_at, used_at, used_by, device_id "
                         f"FROM enrollment_tokens WHERE token_sha256 = ?{lock}", (digest,))
            _check_token(row, device_id, now)
            assert row is not None
            group, bound = str(row[0]), row[4]
            current = tx.one(f"SELECT cert_fingerprint, reset_at FROM devices WHERE id = ?{lock}",
                             (device_id,))
            if current is not None and current[1] is None and bound != device_id:
                raise RegistryError(
                    f"device {device_id!r} is enrolled already, and this token is for group "
                    f"{group!r}, not for that device: a token cannot take over an enrolled "
                    f"device. To enroll it again (a re-imaged or replaced device), issue a "
                    f"token for it (`fleet enroll-token --device {device_id}`) or reset it "
                    f"first (`fleet device reset {device_id}`)")
            fields = _enrollment_fields(group, profile, cert_fingerprint, tags,
                                        encryption_key)
            tx.run("UPDATE enrollment_tokens SET used_at = ?, used_by = ? "
                   "WHERE token_sha256 = ?", (now, device_id, digest))
            _log(tx, now, device_id, "token.redeemed", {"token": digest[:12], "group": group,
                                                        "device": bound})
            device = _upsert_device(tx, now, device_id, current is not None, fields)
        # A reset device's certificate was revoked by the reset already.
        replaced = None if (current is None or current[1] is not None
                            or current[0] == device.cert_fingerprint) else str(current[0])
        return Enrolled(device, replaced)

    def reset_device(self, device_id: str) -> Device:
        """Mark the device reset by the operator: any valid token may now enroll its id
        again (its group, tags and desired state are kept until then). Returns the device
        as it was enrolled, whose certificate the caller revokes. RegistryError if unknown."""
        now = self._clock()
        with self._tx(write=True) as tx:
            _require_device(tx, device_id)
            tx.run("UPDATE devices SET reset_at = ?, online = ? WHERE id = ?",
                   (now, False, device_id))
            device = _one_device(tx, device_id)
            _log(tx, now, device_id, "device.reset",
                 {"cert_fingerprint": device.cert_fingerprint})
            return device

    def update_device(self, device_id: str, *, group: str | None = None,
                      tags: Iterable[str] | None = None, profile: str | None = None) -> Device:
        """Change a device's group, tags (replaced as a whole) or profile."""
        now = self._clock()
        with self._tx(write=True) as tx:
            _require_device(tx, device_id)
            changes: dict[str, Any] = {}
            for column, key, value in (("group_name", "group", group),
                                       ("profile", "profile", profile)):
                if value is not None:
                    _check_label(key, value)
                    tx.run(f"UPDATE devices SET {column} = ? WHERE id = ?", (value, device_id))
                    changes[key] = value
            if tags is not None:
                changes["tags"] = list(_replace_tags(tx, device_id, _clean_tags(tags)))
            if changes:
                _log(tx, now, device_id, "device.updated", changes)
            return _one_device(tx, device_id)

    def get_device(self, device_id: str) -> Device | None:
        """The device, or None if it never enrolled."""
        with self._tx() as tx:
            devices = _load_devices(tx, "WHERE id = ?", (device_id,))
        return devices[0] if devices else None

    def list_devices(self, *, group: str | None = None, tag: str | None = None,
                     online: bool | None = None) -> list[Device]:
        """Devices in id order, optionally only one group's, one tag's, or (not) online."""
        where, params = _device_filter(group=group, tag=tag, online=online)
        with self._tx() as tx:
            return _load_devices(tx, where, params)

    def unconverged(self, *, group: str | None = None) -> list[Device]:
        """Devices whose reported state does not (yet) match their desired state."""
        return [d for d in self.list_devices(group=group) if not d.converged]

    def set_online(self, device_id: str, online: bool) -> None:
        """Record a connect (also bumps ``last_seen``) or a disconnect (the broker's will)."""
        now = self._clock()
        with self._tx(write=True) as tx:
            was = _require_device(tx, device_id)
            if online:
                tx.run("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
                       (True, now, device_id))
            else:
                tx.run("UPDATE devices SET online = ? WHERE id = ?", (False, device_id))
            if was != online:
                _log(tx, now, device_id, "device.online" if online else "device.offline", {})

    def set_reported(self, device_id: str, reported: Mapping[str, Any]) -> Device:
        """Store the state the device reports (replacing the previous report) and mark the
        device seen and online. Returns the device as now recorded."""
        text = _dumps(reported, "reported state")
        now = self._clock()
        with self._tx(write=True) as tx:
            _seen(tx, device_id, now)
            tx.run("UPDATE devices SET reported = ?, reported_at = ? WHERE id = ?",
                   (text, now, device_id))
            return _one_device(tx, device_id)

    # --- enrollment tokens ---

    def issue_token(self, group: str, ttl: float, device: str | None = None) -> str:
        """A new one-time enrollment token for ``group``, valid for ``ttl`` seconds; with
        ``device``, only for that device id, which it may take even if it is enrolled
        (the operator's consent to re-enroll it).

        The plaintext is returned here only; the registry keeps its SHA-256 (a plain hash is
        enough: the token is 256 random bits, so there is nothing to brute-force)."""
        _check_label("group", group)
        if device is not None:
            _check_device_id(device)
        if not ttl > 0:
            raise RegistryError(f"token lifetime must be positive seconds, got {ttl!r}")
        token = secrets.token_urlsafe(32)
        digest = _token_digest(token)
        now = self._clock()
        with self._tx(write=True) as tx:
            tx.run("INSERT INTO enrollment_tokens (token_sha256, group_name, created_at, "
                   "expires_at, used_at, used_by, device_id) "
                   "VALUES (?, ?, ?, ?, NULL, NULL, ?)",
                   (digest, group, now, now + ttl, device))
            _log(tx, now, device, "token.issued", {"token": digest[:12], "group": group,
                                                   "expires_at": now + ttl, "device": device})
        return token

    def redeem_token(self, token: str, device_id: str) -> str:
        """Use up ``token`` for ``device_id``; returns the group it enrolls into.

        Atomic: of any number of concurrent redeems of one token (threads, processes, server
        replicas) exactly one succeeds. Raises RegistryError for an unknown, used or expired
        token, or one issued for another device; a refused redeem changes nothing. (Whether
        ``device_id`` may be taken is :meth:`enroll_device`'s business.)"""
        _check_device_id(device_id)
        digest = _token_digest(token)
        now = self._clock()
        with self._tx(write=True) as tx:
            row = tx.one("SELECT group_name, expires_at, used_at, used_by, device_id FROM "
                         f"enrollment_tokens WHERE token_sha256 = ?{tx.dialect.for_update}",
                         (digest,))
            _check_token(row, device_id, now)
            assert row is not None
            tx.run("UPDATE enrollment_tokens SET used_at = ?, used_by = ? "
                   "WHERE token_sha256 = ?", (now, device_id, digest))
            _log(tx, now, device_id, "token.redeemed",
                 {"token": digest[:12], "group": row[0], "device": row[4]})
            return str(row[0])

    # --- bundles ---

    def put_bundle(self, data: bytes, name: str, version: int, *, metadata_version: int = 0,
                   rollback_of: int | None = None) -> BundleRecord:
        """Store a bundle file as ``<blob_dir>/<sha256>.efb`` and record it, with the
        version of its TUF metadata and, for a re-release, the version it restores.

        Idempotent: the same bytes again return the existing record (and restore its blob
        file if it went missing or was damaged). Raises RegistryError when another bundle
        already has this name and version, or when the same bytes were stored under another
        name or version."""
        blob_dir = self._require_blob_dir()
        _check_label("bundle name", name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryError(f"bundle version must be a positive integer, got {version!r}")
        sha = hashlib.sha256(data).hexdigest()
        # Check before writing the blob (a clash should not leave a file behind), write it
        # outside the transaction (fsync of a large file should not hold the write lock),
        # then record it, checking again. A crash in between leaves an unrecorded file whose
        # name is its hash: harmless, and the next put of the same bytes reuses it.
        with self._tx() as tx:
            known = _check_bundle_clash(tx, sha, name, version)
        # A known bundle is repaired where its record points, even if that is another
        # (earlier) blob directory.
        path = known.path if known is not None else blob_dir / f"{sha}.efb"
        if not _blob_intact(path, sha):
            try:
                write_atomic(path, data)
            except OSError as exc:
                raise RegistryError(f"cannot write the bundle to {path} ({exc.strerror}); "
                                    "check that the blob directory is writable") from exc
        now = self._clock()
        with self._tx(write=True) as tx:
            existing = _check_bundle_clash(tx, sha, name, version)
            if existing is not None:
                return existing
            tx.run("INSERT INTO bundles (sha256, name, version, size, path, created_at, "
                   "metadata_version, rollback_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (sha, name, version, len(data), str(path), now, metadata_version,
                    rollback_of))
            _log(tx, now, None, "bundle.stored",
                 {"sha256": sha, "name": name, "version": version, "size": len(data),
                  "metadata_version": metadata_version, "rollback_of": rollback_of})
            return BundleRecord(sha, name, version, len(data), path, now, metadata_version,
                                rollback_of)

    def get_bundle(self, sha256: str) -> BundleRecord | None:
        """The bundle with this content hash, or None."""
        with self._tx() as tx:
            rows = tx.all(f"SELECT {_BUNDLE_COLUMNS} FROM bundles WHERE sha256 = ?",
                          (sha256.lower(),))
        return _bundle(rows[0]) if rows else None

    def release_versions(self, name: str) -> tuple[int, int]:
        """The highest version of model ``name`` stored (0: none) and the highest metadata
        version of any stored bundle (0: none): a new release must exceed both."""
        with self._tx() as tx:
            row = tx.one("SELECT (SELECT MAX(version) FROM bundles WHERE name = ?), "
                         "(SELECT MAX(metadata_version) FROM bundles)", (name,))
        assert row is not None
        return int(row[0] or 0), int(row[1] or 0)

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        """Stored bundles by name then version, optionally of one model only."""
        where, params = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        with self._tx() as tx:
            rows = tx.all(f"SELECT {_BUNDLE_COLUMNS} FROM bundles {where} "
                          "ORDER BY name, version", params)
        return [_bundle(r) for r in rows]

    # --- desired state and rollback ---

    def set_desired(self, bundle_sha256: str, *, devices: Sequence[str] | None = None,
                    group: str | None = None) -> list[DesiredChange]:
        """Ask the given devices, or every device of ``group``, to run this stored bundle
        (its name is the model, its version the version), in one transaction.

        Each device's previous value for the model is kept, so :meth:`rollback` can restore
        it. Devices already at this bundle are left alone. Returns the changes made."""
        now = self._clock()
        with self._tx(write=True) as tx:
            rows = tx.all(f"SELECT {_BUNDLE_COLUMNS} FROM bundles WHERE sha256 = ?",
                          (bundle_sha256.lower(),))
            if not rows:
                raise RegistryError(f"no stored bundle has sha256 {bundle_sha256!r}; store "
                                    "it first (put_bundle) and use the hash it returns")
            bundle = _bundle(rows[0])
            target = DesiredModel(bundle.version, bundle.sha256)
            return _change_desired(tx, now, _lock_targets(tx, devices, group),
                                   model=bundle.name, target=target, kind="desired.set")

    def clear_desired(self, model: str, *, devices: Sequence[str] | None = None,
                      group: str | None = None) -> list[DesiredChange]:
        """Stop asking the devices (or ``group``) to run ``model``; rollback restores it."""
        now = self._clock()
        with self._tx(write=True) as tx:
            return _change_desired(tx, now, _lock_targets(tx, devices, group), model=model,
                                   target=None, kind="desired.cleared")

    def rollback(self, *, devices: Sequence[str] | None = None, group: str | None = None,
                 model: str | None = None, dry_run: bool = False,
                 substitute: Mapping[str, DesiredModel] | None = None) -> list[DesiredChange]:
        """Undo the last desired-state change of each device (of ``model`` only, if given),
        for the given devices or every device of ``group``, in one transaction.

        Changes form a stack per device and model: rolling back twice undoes two changes.
        Devices with nothing to undo are skipped; RegistryError if none had anything.
        ``dry_run`` returns the changes without making them. ``substitute`` maps the sha256
        of a bundle to restore onto what to desire instead (its re-release under a new
        version, which is how devices accept it); RegistryError, and nothing changed, if a
        bundle to restore has no substitute then (the history moved since the dry run)."""
        now = self._clock()
        with self._tx(write=not dry_run) as tx:
            targets = _lock_targets(tx, devices, group)
            model_filter = " AND model = ?" if model is not None else ""
            changes: list[DesiredChange] = []
            popped: list[tuple[int]] = []
            for device_id, desired in targets:
                params = (device_id, model) if model is not None else (device_id,)
                top = tx.one("SELECT id, model, previous FROM desired_history "
                             f"WHERE device_id = ?{model_filter} ORDER BY id DESC LIMIT 1",
                             params)
                if top is None:
                    continue
                entry_id, entry_model, previous = top
                before = desired.get(entry_model)
                after = None if previous is None else DesiredModel.from_json(
                    json.loads(previous))
                if substitute is not None and after is not None:
                    if after.bundle_sha256 not in substitute:
                        raise RegistryError(f"the desired state of {device_id} changed while "
                                            "the rollback was prepared; roll back again")
                    after = substitute[after.bundle_sha256]
                changes.append(DesiredChange(device_id, entry_model, before, after))
                popped.append((entry_id,))
            if not changes:
                what = f"model {model!r} of " if model is not None else ""
                raise RegistryError(f"nothing to roll back: {what}the selected devices have "
                                    "no earlier desired state")
            if dry_run:
                return changes
            _write_desired(tx, now, targets, changes, "desired.rolled_back")
            tx.many("DELETE FROM desired_history WHERE id = ?", popped)
            return changes

    def was_desired(self, device_id: str, bundle_sha256: str) -> bool:
        """Whether this bundle is, or at some time was, in the device's desired state.

        The fleet server serves a device only such bundles, so a device cannot fetch blobs it
        was never asked to run. "Was" comes from the ``desired.*`` events, which record
        every value a change set (``after``), so it survives rollbacks popping the history.
        """
        sha = bundle_sha256.lower()
        if not _SHA256_HEX.fullmatch(sha):
            return False
        with self._tx() as tx:
            row = tx.one("SELECT desired FROM devices WHERE id = ?", (device_id,))
            if row is None:
                return False
            if any(d.bundle_sha256 == sha for d in _desired_from_text(row[0]).values()):
                return True
            # A hex digest has no LIKE wildcards; the LIKE only narrows, the JSON decides.
            rows = tx.all("SELECT detail FROM events WHERE device_id = ? AND kind IN "
                          "('desired.set', 'desired.rolled_back') AND detail LIKE ?",
                          (device_id, f"%{sha}%"))
        return any((json.loads(r[0]).get("after") or {}).get("bundle_sha256") == sha
                   for r in rows)

    # --- events ---

    def add_event(self, kind: str, *, device: str | None = None,
                  detail: Mapping[str, Any] | None = None, seq: int | None = None) -> int:
        """Append an event; returns its id. ``device`` need not be enrolled (a refused
        connection is worth logging too). An event a device numbered (``seq``, unique per
        device) is stored once: sent again, it is skipped and 0 is returned."""
        _check_label("event kind", kind)
        text = _dumps(detail or {}, "event detail")
        now = self._clock()
        with self._tx(write=True) as tx:
            if seq is not None and not tx.run(
                    "INSERT INTO device_event_seqs (device_id, seq) VALUES (?, ?) "
                    "ON CONFLICT (device_id, seq) DO NOTHING", (device, seq)):
                return 0
            return tx.insert_id("INSERT INTO events (at, device_id, kind, detail) "
                                "VALUES (?, ?, ?, ?)", (now, device, kind, text))

    def events(self, since_id: int = 0, *, device: str | None = None,
               limit: int = 1000) -> list[Event]:
        """Events with id greater than ``since_id`` in id order, at most ``limit`` of them,
        optionally of one device only. Poll with the last id seen to follow the log."""
        if limit < 1:
            raise RegistryError(f"limit must be at least 1, got {limit}")
        where = "WHERE id > ?" + (" AND device_id = ?" if device is not None else "")
        params = (since_id, device) if device is not None else (since_id,)
        with self._tx() as tx:
            rows = tx.all("SELECT id, at, device_id, kind, detail FROM events "
                          f"{where} ORDER BY id LIMIT ?", (*params, limit))
        return [Event(int(r[0]), float(r[1]), r[2], str(r[3]), json.loads(r[4])) for r in rows]

    # --- telemetry ---

    def add_telemetry(self, device_id: str, samples: Iterable[TelemetrySample]) -> int:
        """Store a batch of a device's telemetry and mark it seen; returns how many samples
        were new. A sample whose seq is already stored is skipped (the device re-sent its
        buffer after a lost acknowledgement), so re-sending a batch never duplicates rows."""
        rows = [(device_id, s.seq, s.at, _dumps(s.payload, "telemetry payload"))
                for s in samples]
        now = self._clock()
        with self._tx(write=True) as tx:
            _seen(tx, device_id, now)
            return tx.many("INSERT INTO telemetry (device_id, seq, at, payload) "
                           "VALUES (?, ?, ?, ?) ON CONFLICT (device_id, seq) DO NOTHING", rows)

    def telemetry(self, device_id: str, *, since_seq: int = 0,
                  limit: int = 1000) -> list[TelemetryRecord]:
        """One device's samples with seq greater than ``since_seq``, in seq order."""
        with self._tx() as tx:
            rows = tx.all("SELECT device_id, seq, at, payload FROM telemetry "
                          "WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                          (device_id, since_seq, limit))
        return [_telemetry(r) for r in rows]

    def latest_telemetry(self, *, group: str | None = None) -> dict[str, TelemetryRecord]:
        """Each device's newest sample (highest seq), by device id; optionally one group's."""
        where = "" if group is None else (
            " AND t.device_id IN (SELECT id FROM devices WHERE group_name = ?)")
        with self._tx() as tx:
            rows = tx.all("SELECT t.device_id, t.seq, t.at, t.payload FROM telemetry t "
                          "WHERE t.seq = (SELECT MAX(seq) FROM telemetry m "
                          f"WHERE m.device_id = t.device_id){where} ORDER BY t.device_id",
                          () if group is None else (group,))
        return {r[0]: _telemetry(r) for r in rows}

    def prune_telemetry(self, *, before: float) -> int:
        """Delete samples taken before ``before`` (Unix time); returns how many."""
        with self._tx(write=True) as tx:
            return tx.run("DELETE FROM telemetry WHERE at < ?", (before,))

    # --- helpers ---

    def _require_blob_dir(self) -> Path:
        if self.blob_dir is None:
            raise RegistryError("this registry has no blob directory for bundle files; "
                                "open it with open_registry(url, blob_dir=DIR)")
        return self.blob_dir


# --- transaction helpers (module level: they need a _Tx, not the Registry) ------------------

_DEVICE_COLUMNS = ("id, group_name, profile, cert_fingerprint, enrolled_at, last_seen, online, "
                   "desired, reported, reported_at, encryption_key, reset_at")
_BUNDLE_COLUMNS = ("sha256, name, version, size, path, created_at, metadata_version, "
                   "rollback_of")


def _load_devices(tx: _Tx, where: str, params: Sequence[Any]) -> list[Device]:
    rows = tx.all(f"SELECT {_DEVICE_COLUMNS} FROM devices {where} ORDER BY id", params)
    tags: dict[str, list[str]] = {}
    for device_id, tag in tx.all("SELECT device_id, tag FROM device_tags WHERE device_id IN "
                                 f"(SELECT id FROM devices {where}) ORDER BY device_id, tag",
                                 params):
        tags.setdefault(device_id, []).append(tag)
    return [Device(id=r[0], group=r[1], tags=tuple(tags.get(r[0], ())), profile=r[2],
                   cert_fingerprint=r[3], enrolled_at=float(r[4]),
                   last_seen=None if r[5] is None else float(r[5]), online=bool(r[6]),
                   desired=_desired_from_text(r[7]), reported=json.loads(r[8]),
                   reported_at=None if r[9] is None else float(r[9]), encryption_key=r[10],
                   reset_at=None if r[11] is None else float(r[11]))
            for r in rows]


@dataclass(frozen=True)
class _EnrollmentFields:
    group: str
    profile: str
    fingerprint: str
    tags: tuple[str, ...]
    encryption_key: str | None


def _enrollment_fields(group: str, profile: str, cert_fingerprint: str, tags: Iterable[str],
                       encryption_key: str | None) -> _EnrollmentFields:
    """The enrollment's values, checked."""
    _check_label("group", group)
    _check_label("profile", profile)
    fingerprint = cert_fingerprint.lower()
    if not _SHA256_HEX.fullmatch(fingerprint):
        raise RegistryError(f"certificate fingerprint {cert_fingerprint!r} is not a "
                            "SHA-256 hex digest (64 hex digits)")
    if encryption_key is not None and not _X25519_B64.fullmatch(encryption_key):
        raise RegistryError("the encryption key must be an X25519 public key: 32 bytes in "
                            "base64 (44 characters)")
    return _EnrollmentFields(group, profile, fingerprint, _clean_tags(tags), encryption_key)


def _upsert_device(tx: _Tx, now: float, device_id: str, known: bool,
                   f: _EnrollmentFields) -> Device:
    tx.run("INSERT INTO devices (id, group_name, profile, cert_fingerprint, enrolled_at, "
           "last_seen, online, desired, reported, reported_at, encryption_key, reset_at) "
           "VALUES (?, ?, ?, ?, ?, NULL, ?, '{}', '{}', NULL, ?, NULL) "
           "ON CONFLICT (id) DO UPDATE SET group_name = excluded.group_name, "
           "profile = excluded.profile, cert_fingerprint = excluded.cert_fingerprint, "
           "enrolled_at = excluded.enrolled_at, encryption_key = excluded.encryption_key, "
           "reset_at = NULL",
           (device_id, f.group, f.profile, f.fingerprint, now, False, f.encryption_key))
    _replace_tags(tx, device_id, f.tags)
    _log(tx, now, device_id, "device.enrolled",
         {"group": f.group, "profile": f.profile, "cert_fingerprint": f.fingerprint,
          "tags": list(f.tags), "again": known,
          "encryption_key": f.encryption_key is not None})
    return _one_device(tx, device_id)


def _check_token(row: tuple[Any, ...] | None, device_id: str, now: float) -> None:
    """RegistryError unless the token ``row`` (group, expires_at, used_at, used_by,
    device_id) may enroll ``device_id`` now."""
    if row is None:
        raise RegistryError("unknown enrollment token; check for typos or ask the operator "
                            "for a new one (fleet issues them)")
    group, expires_at, used_at, used_by, bound = row
    if used_at is not None:
        raise RegistryError(f"enrollment token already used by device {used_by!r} at "
                            f"{_iso(used_at)}; tokens work once, ask the operator for a new "
                            "one")
    if expires_at <= now:
        raise RegistryError(f"enrollment token for group {group!r} expired at "
                            f"{_iso(expires_at)}; ask the operator for a new one")
    if bound is not None and bound != device_id:
        raise RegistryError(f"this enrollment token was issued for device {bound!r}, not "
                            f"{device_id!r}; enroll with --device-id {bound} or ask for a "
                            "token for this device")


def _one_device(tx: _Tx, device_id: str) -> Device:
    return _load_devices(tx, "WHERE id = ?", (device_id,))[0]


def _device_filter(*, group: str | None, tag: str | None,
                   online: bool | None) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    params: list[Any] = []
    if group is not None:
        clauses.append("group_name = ?")
        params.append(group)
    if tag is not None:
        clauses.append("id IN (SELECT device_id FROM device_tags WHERE tag = ?)")
        params.append(tag)
    if online is not None:
        clauses.append("online = ?")
        params.append(online)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def _require_device(tx: _Tx, device_id: str) -> bool:
    """Lock the device row; returns its online flag. RegistryError if it is unknown."""
    row = tx.one(f"SELECT online FROM devices WHERE id = ?{tx.dialect.for_update}",
                 (device_id,))
    if row is None:
        raise RegistryError(f"unknown device {device_id!r}; it must enroll first")
    return bool(row[0])


def _seen(tx: _Tx, device_id: str, now: float) -> None:
    """The device just sent something: it is online and was seen now."""
    if not _require_device(tx, device_id):
        _log(tx, now, device_id, "device.online", {})
    tx.run("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?", (True, now, device_id))


def _replace_tags(tx: _Tx, device_id: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    tx.run("DELETE FROM device_tags WHERE device_id = ?", (device_id,))
    tx.many("INSERT INTO device_tags (device_id, tag) VALUES (?, ?)",
            [(device_id, t) for t in tags])
    return tags


def _lock_targets(tx: _Tx, devices: Sequence[str] | None,
                  group: str | None) -> list[tuple[str, dict[str, DesiredModel]]]:
    """(id, desired) of the selected devices, rows locked, in id order (a fixed lock order,
    so two concurrent group changes on PostgreSQL cannot deadlock)."""
    lock = tx.dialect.for_update
    if (devices is None) == (group is None):
        raise RegistryError("select devices either by a list of ids or by a group, not both "
                            "and not neither")
    if group is not None:
        rows = tx.all(f"SELECT id, desired FROM devices WHERE group_name = ? ORDER BY id{lock}",
                      (group,))
        if not rows:
            raise RegistryError(f"group {group!r} has no devices; check the group name")
        return [(r[0], dict(_desired_from_text(r[1]))) for r in rows]
    assert devices is not None
    if isinstance(devices, str):
        # A bare string is a sequence of characters: almost certainly devices=["id"] meant.
        raise RegistryError(f"devices must be a list of ids, got the string {devices!r}")
    wanted = sorted(set(devices))
    if not wanted:
        raise RegistryError("no devices given; pass at least one device id or a group")
    rows = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows += tx.all(f"SELECT id, desired FROM devices WHERE id IN ({marks}) "
                       f"ORDER BY id{lock}", chunk)
    missing = sorted(set(wanted) - {r[0] for r in rows})
    if missing:
        raise RegistryError(f"unknown device(s): {', '.join(missing)}; enroll them first or "
                            "fix the list (nothing was changed)")
    return [(r[0], dict(_desired_from_text(r[1]))) for r in rows]


def _change_desired(tx: _Tx, now: float, targets: list[tuple[str, dict[str, DesiredModel]]], *,
                    model: str, target: DesiredModel | None, kind: str) -> list[DesiredChange]:
    """Set ``model`` to ``target`` on each device, pushing the old value onto the history."""
    changes = [DesiredChange(device_id, model, desired.get(model), target)
               for device_id, desired in targets if desired.get(model) != target]
    tx.many("INSERT INTO desired_history (device_id, model, previous, at) VALUES (?, ?, ?, ?)",
            [(c.device, model, None if c.before is None else _dumps(c.before.to_json(), ""),
              now) for c in changes])
    _write_desired(tx, now, targets, changes, kind)
    return changes


def _write_desired(tx: _Tx, now: float, targets: list[tuple[str, dict[str, DesiredModel]]],
                   changes: list[DesiredChange], kind: str) -> None:
    """Apply ``changes`` (at most one per device) to the devices' desired state, with an
    event each."""
    current = dict(targets)
    updates = []
    for c in changes:
        desired = current[c.device]
        if c.after is None:
            desired.pop(c.model, None)
        else:
            desired[c.model] = c.after
        updates.append((_desired_to_text(desired), c.device))
    tx.many("UPDATE devices SET desired = ? WHERE id = ?", updates)
    tx.many("INSERT INTO events (at, device_id, kind, detail) VALUES (?, ?, ?, ?)",
            [(now, c.device, kind, _dumps({
                "model": c.model,
                "before": None if c.before is None else c.before.to_json(),
                "after": None if c.after is None else c.after.to_json()}, ""))
             for c in changes])


def _check_bundle_clash(tx: _Tx, sha: str, name: str, version: int) -> BundleRecord | None:
    """The record of these bytes if already stored as this name and version; RegistryError
    if they, or this name and version, are stored otherwise."""
    rows = tx.all(f"SELECT {_BUNDLE_COLUMNS} FROM bundles WHERE sha256 = ? "
                  "OR (name = ? AND version = ?)", (sha, name, version))
    for row in rows:
        other = _bundle(row)
        if other.sha256 == sha and (other.name, other.version) == (name, version):
            return other
        if other.sha256 == sha:
            raise RegistryError(f"these bytes are already stored as {other.name} "
                                f"v{other.version}, not {name} v{version}; check the name and "
                                "version given")
        raise RegistryError(f"{name} v{version} is already stored as another bundle "
                            f"(sha256 {other.sha256[:12]}...); versions are immutable, build "
                            f"the new bundle with a higher version")
    return None


def _log(tx: _Tx, now: float, device: str | None, kind: str, detail: Mapping[str, Any]) -> None:
    tx.run("INSERT INTO events (at, device_id, kind, detail) VALUES (?, ?, ?, ?)",
           (now, device, kind, _dumps(detail, "event detail")))


def _bundle(row: tuple[Any, ...]) -> BundleRecord:
    return BundleRecord(sha256=row[0], name=row[1], version=int(row[2]), size=int(row[3]),
                        path=Path(row[4]), created_at=float(row[5]),
                        metadata_version=int(row[6]),
                        rollback_of=None if row[7] is None else int(row[7]))


def _telemetry(row: tuple[Any, ...]) -> TelemetryRecord:
    return TelemetryRecord(device=row[0], seq=int(row[1]), at=float(row[2]),
                           payload=json.loads(row[3]))


def _desired_from_text(text: str) -> dict[str, DesiredModel]:
    return {name: DesiredModel.from_json(obj) for name, obj in json.loads(text).items()}


def _desired_to_text(desired: Mapping[str, DesiredModel]) -> str:
    return _dumps({name: d.to_json() for name, d in desired.items()}, "desired state")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what or 'value'} is not JSON-serialisable ({exc}); send plain "
                            "objects, lists, strings, finite numbers, booleans and null") from exc


def _blob_intact(path: Path, sha256: str) -> bool:
    """Whether ``path`` holds the bytes with this hash (a re-put repairs a damaged blob)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            # hashlib.file_digest would do, but it is Python 3.11+ and we support 3.10.
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return False
    return digest.hexdigest() == sha256


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _check_device_id(device_id: str) -> None:
    # Device ids are MQTT client ids, certificate CNs and topic levels: the one name rule.
    try:
        check_name(device_id)
    except InvalidNameError as exc:
        raise RegistryError(str(exc)) from None


def _check_label(what: str, value: str) -> None:
    if (not isinstance(value, str) or not value or value != value.strip()
            or len(value) > _MAX_LABEL or not value.isprintable()):
        raise RegistryError(f"invalid {what} {value!r}: use 1-{_MAX_LABEL} printable "
                            "characters without leading or trailing spaces")


def _clean_tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise RegistryError(f"tags must be a list of strings, got the string {tags!r}")
    cleaned = tuple(sorted(set(tags)))
    for tag in cleaned:
        _check_label("tag", tag)
    return cleaned


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))

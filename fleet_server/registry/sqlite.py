"""SQLite for the registry: a small pool of connections to one file in WAL mode.

WAL lets readers work beside the one writer, so each thread gets a connection of its own
from the pool (up to ``max_connections``) and the operator API reads while the ingest thread
writes. Writers of this process queue on a lock before they start; a writer of another
process (the operator's ``fleet`` command) is waited for by SQLite's busy timeout.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fleet_server.errors import RegistryError

from .database import SQLITE, Tx

__all__ = ["MIN_SQLITE_VERSION", "SqliteBackend"]

log = logging.getLogger(__name__)

#: How long a writer waits for another process's SQLite write lock, and a call for a free
#: connection of the pool, before failing.
_BUSY_TIMEOUT_S = 10.0
#: DROP COLUMN (used by migrations) and RETURNING arrived in SQLite 3.35 (March 2021).
MIN_SQLITE_VERSION = (3, 35, 0)


class SqliteBackend:
    """A bounded pool of sqlite3 connections to one database file."""

    dialect = SQLITE

    def __init__(self, path: Path, *, max_connections: int) -> None:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RegistryError(
                f"the registry needs SQLite {'.'.join(map(str, MIN_SQLITE_VERSION))} or newer, "
                f"this Python has {sqlite3.sqlite_version}; use a newer Python build or "
                "PostgreSQL (--db postgresql://...)")
        # SQLite takes an empty file for an empty database: a registry truncated to zero
        # bytes (a full disk, a bad copy) would come up as a new, empty fleet.
        if path.is_file() and path.stat().st_size == 0:
            raise RegistryError(f"the registry {path} is an empty file (0 bytes), not a "
                                "database: restore it from a backup, or delete it to start a "
                                "new, empty registry")
        self._path = path
        self._max = max_connections
        self._cond = threading.Condition()
        self._idle: list[sqlite3.Connection] = [self._connect()]  # fails now if it can
        self._open = 1
        self._closed = False
        self._writer = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit BEGIN; transaction() says where they start.
            # check_same_thread=False: the pool hands a connection to one thread at a time.
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open the SQLite database {path} ({exc}); check that "
                                "the directory exists and is writable") from exc
        try:
            # WAL: readers (other threads, the operator CLI) never block the server's writes,
            # nor the reverse.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("%s: SQLite refused WAL mode (journal_mode=%s); readers and "
                            "writers will block each other", path, mode)
            conn.execute("PRAGMA foreign_keys=ON")
            # synchronous stays FULL (the default): an enrollment the server acknowledged
            # must survive a power cut.
        except sqlite3.Error as exc:
            conn.close()
            raise RegistryError(f"{path} is not a usable SQLite database ({exc}); point the "
                                "registry at a new file or at the fleet's database") from exc
        return conn

    def _checkout(self) -> sqlite3.Connection:
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        with self._cond:
            while True:
                if self._closed:
                    raise RegistryError("the registry is closed; open it again with "
                                        "open_registry()")
                if self._idle:
                    return self._idle.pop()
                if self._open < self._max:
                    self._open += 1
                    break
                if not self._cond.wait(deadline - time.monotonic()):
                    raise sqlite3.OperationalError(
                        f"all {self._max} connections to {self._path} stayed busy for "
                        f"{_BUSY_TIMEOUT_S:.0f} s; open the registry with more "
                        "max_connections, or find the call that holds them")
        try:
            return self._connect()
        except BaseException:
            self._drop()
            raise

    def _checkin(self, conn: sqlite3.Connection) -> None:
        with self._cond:
            # A connection still in a transaction failed to roll back: it is not reused.
            if not self._closed and not conn.in_transaction:
                self._idle.append(conn)
                self._cond.notify()
                return
        conn.close()
        self._drop()

    def _drop(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        """A transaction; a writer takes the write lock up front (BEGIN IMMEDIATE) so two
        processes never both read and then fail to upgrade (SQLITE_BUSY mid-transaction)."""
        conn = self._checkout()
        try:
            with self._writer if write else contextlib.nullcontext():
                cur = conn.cursor()
                try:
                    cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        yield Tx(cur, self.dialect)
                        cur.execute("COMMIT")
                    except BaseException:
                        # Also after a failed COMMIT: a transaction left open would make every
                        # later BEGIN on this connection fail.
                        if conn.in_transaction:
                            cur.execute("ROLLBACK")
                        raise
                finally:
                    cur.close()
        finally:
            self._checkin(conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

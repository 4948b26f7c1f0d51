"""Which of several ``fleet serve`` processes on one PostgreSQL does the work that must
happen once: retention, alert evaluation, the rollout controller, and the re-publish of
every desired state when a process reconnects to the broker.

The leader is the process holding a PostgreSQL **session-level advisory lock**
(``pg_try_advisory_lock``), keyed by the fleet's name and the registry's schema, on a
connection of its own (not the
registry's pool, whose connections come and go). PostgreSQL releases the lock when that
session ends: a clean stop, a crash, ``kill -9`` (the kernel closes the socket and the
server notices at once), or a network partition (once TCP keepalives give up, below).
Every other process tries for the lock every ``interval_s`` and takes over then.

A leader checks its connection every ``interval_s`` as well: if the check fails it is no
longer leader (its session, and with it the lock, may be gone), and it reconnects and tries
again. So two processes may both *not* be leader for up to an interval, but once one
process's check fails it stops claiming leadership before another can take the lock
(the lock is only free once the old session is gone). Work that must not run twice should
still be idempotent or transactional (retention is), as a leader cut off from the database
learns so only at its next check.

On SQLite there is one server process per database (its data directory is locked), so
:class:`SoleLeadership` always leads. Ask :meth:`is_leader` right before the work; use
``on_change`` to start or stop something when leadership moves.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import make_conninfo

from common.periodic import Periodic

__all__ = ["AdvisoryLeadership", "Leadership", "SoleLeadership", "leadership_for", "lock_key"]

log = logging.getLogger(__name__)

#: TCP keepalive of the leader's connection: a silent peer is given up after about
#: idle + interval * count seconds, releasing the lock on the server's side likewise.
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3, "connect_timeout": 10}


class Leadership(Protocol):
    """Whether this process is the one that does the fleet's once-only work."""

    def is_leader(self) -> bool:
        """True while this process holds the leadership."""
        ...

    def start(self) -> None:
        """Begin competing for leadership."""
        ...

    def stop(self) -> None:
        """Give it up (to another process) and stop competing."""
        ...


def lock_key(fleet: str, schema: str) -> int:
    """The advisory lock's key for ``fleet`` with its registry in ``schema``: a signed
    64-bit number from both names."""
    digest = hashlib.sha256(f"edgefleet-leader/{schema}/{fleet}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class SoleLeadership:
    """The only server process of its database: always the leader."""

    def is_leader(self) -> bool:
        """Always True."""
        return True

    def start(self) -> None:
        """Nothing to compete for."""

    def stop(self) -> None:
        """Nothing to give up."""


class AdvisoryLeadership:
    """Leadership through a PostgreSQL advisory lock held on a dedicated connection
    (module docstring). Thread-safe; ``on_change(leader)`` is called on its thread."""

    def __init__(self, url: str, fleet: str, *, interval_s: float = 1.0,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._url = url
        self._key: int | None = None  # known once connected: it depends on the schema
        self._fleet = fleet
        self.interval_s = interval_s
        self._on_change = on_change
        self._leader = threading.Event()
        self._connection: psycopg.Connection[Any] | None = None
        self._periodic = Periodic("fleet-leadership", self._round, interval_s,
                                  on_exit=self._give_up)

    def is_leader(self) -> bool:
        """True while this process holds the lock (as of its last check)."""
        return self._leader.is_set()

    def start(self) -> None:
        """Compete for the lock on a background thread."""
        self._periodic.start()

    def stop(self) -> None:
        """Release the lock (closing the session) and stop. Idempotent."""
        self._periodic.stop()

    def _round(self) -> None:
        self._set(self._check())

    def _give_up(self) -> None:
        self._set(False)
        self._disconnect()

    def _check(self) -> bool:
        """One round: as leader, whether the session lives; else, whether the lock is
        ours now. Any database error means not leader, and a new connection next time."""
        try:
            if self._connection is None:
                self._connection = psycopg.connect(make_conninfo(self._url, **_KEEPALIVE),
                                                   autocommit=True)
                # Advisory locks are per database: fleets of one name in two schemas (two
                # registries) must not share one leader.
                row = self._connection.execute("SELECT current_schema()").fetchone()
                self._key = lock_key(self._fleet, str(row[0]) if row else "")
            if self._leader.is_set():
                self._connection.execute("SELECT 1")
                return True
            row = self._connection.execute("SELECT pg_try_advisory_lock(%s)",
                                           (self._key,)).fetchone()
            return bool(row and row[0])
        except psycopg.Error as exc:
            if self._leader.is_set():
                log.error("lost the database session that held the leadership (%s); "
                          "another server process may take over", exc)
            else:
                log.debug("leadership check failed: %s", exc)
            self._disconnect()
            return False

    def _set(self, leader: bool) -> None:
        if leader == self._leader.is_set():
            return
        if leader:
            self._leader.set()
        else:
            self._leader.clear()
        log.info("fleet %s: this server process %s the leader", self._fleet,
                 "is now" if leader else "is no longer")
        if self._on_change is not None:
            try:
                self._on_change(leader)
            except Exception:  # a listener's failure must not stop the competition
                log.exception("leadership listener failed")

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.close()


def leadership_for(db_url: str | None, fleet: str, *, interval_s: float = 1.0,
                   on_change: Callable[[bool], None] | None = None) -> Leadership:
    """Advisory-lock leadership on PostgreSQL, sole leadership otherwise (SQLite, where
    ``on_change`` is never called: the process leads from the start)."""
    if db_url is not None and db_url.startswith(("postgresql://", "postgres://")):
        return AdvisoryLeadership(db_url, fleet, interval_s=interval_s, on_change=on_change)
    return SoleLeadership()

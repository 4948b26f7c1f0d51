"""One ``fleet serve`` process per MQTT identity on a shared registry.

Two processes started with the same ``--instance`` name (on two data directories, or two
machines) connect to the broker with the same client id: each connection takes the
session from the other, over and over, and Mosquitto 2.0.11 closes the older connection
without saying why (newer brokers send DISCONNECT "Session taken over", which
:mod:`fleet_server.device_link` logs). So on PostgreSQL a process claims its identity
before it connects: a session-level advisory lock keyed by the registry's schema, the
fleet and the identity, held on a connection of its own for as long as the process runs.
A second process with the same identity is refused at start, naming the cause. PostgreSQL
releases the lock when the holder's session ends (a clean stop, a crash, ``kill -9``); a
holder whose machine vanished keeps it until PostgreSQL's TCP keepalive gives up on the
session (``tcp_keepalives_idle`` on the database server), and the refusal says how to end
that session at once.
On SQLite the data directory's lock already allows one process per registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from typing import Any

import psycopg

from .errors import ServiceError

__all__ = ["InstanceClaim", "application_name", "claim_key", "presence_key"]

log = logging.getLogger(__name__)


def application_name(identity: str) -> str:
    """The claim's connection shows under this name in ``pg_stat_activity``, so an
    operator can end the claim of a process that is gone."""
    return f"edgefleet claim {identity}"


def claim_key(schema: str, fleet: str, identity: str) -> int:
    """The advisory lock's key of ``identity`` in ``fleet`` with its registry in
    ``schema``: a signed 64-bit number (distinct from the leadership's key)."""
    digest = hashlib.sha256(f"edgefleet-instance/{schema}/{fleet}/{identity}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def presence_key(schema: str, fleet: str) -> int:
    """The advisory lock every process of ``fleet`` (registry in ``schema``) holds in shared
    mode while it runs: how many hold it is how many server processes of the fleet run."""
    digest = hashlib.sha256(f"edgefleet-presence/{schema}/{fleet}".encode())
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


# pg_locks shows a bigint advisory key as its high and low 32 bits (classid, objid) with
# objsubid 1.
_PEERS = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
          "objsubid = 1 AND classid = %s::oid AND objid = %s::oid AND "
          "pid <> pg_backend_pid()")


def _claim(url: str, fleet: str, identity: str) -> tuple[psycopg.Connection[Any], int]:
    """A session holding the claim on ``identity`` and the fleet's presence (shared), and
    the presence key; ServiceError if another process holds it or the database cannot be
    reached."""
    try:
        connection = psycopg.connect(url, autocommit=True, connect_timeout=10,
                                     application_name=application_name(identity))
    except psycopg.Error as exc:
        raise ServiceError(f"cannot connect to the registry database to claim the "
                           f"identity {identity} ({exc}); check --db") from exc
    try:
        row = connection.execute("SELECT current_schema()").fetchone()
        schema = str(row[0]) if row else ""
        key = claim_key(schema, fleet, identity)
        taken = connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        presence = presence_key(schema, fleet)
        if taken and taken[0]:
            connection.execute("SELECT pg_advisory_lock_shared(%s)", (presence,))
    except psycopg.Error as exc:
        connection.close()
        raise ServiceError(f"cannot claim the identity {identity} in the registry "
                           f"database ({exc}); check --db") from exc
    if not (taken and taken[0]):
        connection.close()
        raise ServiceError(
            f"another fleet server process of fleet {fleet} already runs as {identity} "
            "on this registry; two processes with one identity would take the broker "
            "session from each other over and over. Give this one its own --instance "
            "name, or stop the other first. If the other is gone (its machine lost), "
            "PostgreSQL frees the claim once it notices; to free it now: SELECT "
            "pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
            f"'{application_name(identity)}'")
    return connection, presence


class InstanceClaim:
    """This process's claim on its MQTT identity (module docstring), and its presence
    among the fleet's server processes (:meth:`others_running`)."""

    def __init__(self, url: str, fleet: str, identity: str,
                 connection: psycopg.Connection[Any], presence: int) -> None:
        """Use :meth:`take`."""
        self._url, self._fleet, self._identity = url, fleet, identity
        self._connection: psycopg.Connection[Any] | None = connection
        self._presence = presence
        self._lock = threading.Lock()

    @classmethod
    def take(cls, url: str, fleet: str, identity: str) -> InstanceClaim:
        """Claim ``identity``; ServiceError if another process holds it, or the database
        cannot be reached."""
        connection, presence = _claim(url, fleet, identity)
        return cls(url, fleet, identity, connection, presence)

    def keep(self) -> None:
        """Take the claim again if its session ended (call every few seconds): a database
        outage or restart ends the session, and PostgreSQL frees its locks with it, so
        without this a second process of the same identity could start, and this one
        would count for no other process's :meth:`others_running`. Logs, never raises."""
        with self._lock:
            connection = self._connection
            if connection is None:
                return
            try:
                connection.execute("SELECT 1")
                return
            except psycopg.Error:
                pass
            with contextlib.suppress(psycopg.Error):
                connection.close()
            try:
                self._connection, self._presence = _claim(self._url, self._fleet,
                                                          self._identity)
            except ServiceError as exc:
                log.error("the claim on %s was lost with its database session and cannot "
                          "be taken again: %s", self._identity, exc)
                return
        log.info("the claim on %s was lost with its database session (an outage?) and is "
                 "taken again", self._identity)

    def others_running(self) -> bool | None:
        """Whether another server process of this fleet runs now (holds its presence);
        None if the database cannot tell."""
        self.keep()  # a session lost in an outage holds no presence: take it again first
        with self._lock:
            connection = self._connection
            if connection is None:
                return None
            bits = self._presence & 0xFFFF_FFFF_FFFF_FFFF
            try:
                row = connection.execute(_PEERS, (bits >> 32, bits & 0xFFFF_FFFF)).fetchone()
            except psycopg.Error:
                return None
        return bool(row and row[0])

    def release(self) -> None:
        """Give the identity up (ends the session). Idempotent."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(psycopg.Error):
                connection.close()

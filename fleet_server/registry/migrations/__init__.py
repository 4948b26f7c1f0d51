"""Versioned schema migrations: how every registry database reaches the current layout.

The database's version is the one row of ``schema_version``. :func:`migrate` (run by
``open_registry``) applies each migration above it, in order, in one transaction with the
version update, so a database is at one version or the next, never between: both SQLite and
PostgreSQL roll back DDL with the rest. A new database is built by the same steps from
version 0, so a fresh registry and an upgraded one cannot differ.

Several fleet servers starting together on one PostgreSQL take turns: the transaction
starts by taking an advisory lock, and whoever comes second finds the work done. On SQLite
the write transaction (``BEGIN IMMEDIATE``) already admits one writer at a time.

Adding a migration (docs/registry.md, "Adding a table: a migration"): write
``vN_what_it_does.py`` with ``upgrade(tx)``, append it to :data:`MIGRATIONS`; released
migrations are never edited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fleet_server.errors import RegistryError
from fleet_server.registry.database import Database, Tx

from . import (
    v1_initial,
    v2_typed_state,
    v3_trust,
    v4_delta,
    v5_monitoring,
    v6_rollouts,
    v7_experiments,
    v8_reported_at,
    v9_ca_records,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

log = logging.getLogger(__name__)

#: Migration N (1-based) takes a database from version N-1 to N.
MIGRATIONS: tuple[Callable[[Tx], None], ...] = (
    v1_initial.upgrade,
    v2_typed_state.upgrade,
    v3_trust.upgrade,
    v4_delta.upgrade,
    v5_monitoring.upgrade,
    v6_rollouts.upgrade,
    v7_experiments.upgrade,
    v8_reported_at.upgrade,
    v9_ca_records.upgrade,
)
#: The version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)
#: Any constant shared by every fleet server: serialises migrations on PostgreSQL, where
#: two replicas racing through CREATE TABLE can collide in the catalog.
_PG_SCHEMA_LOCK = 0x6564_6765_666C_74  # "edgeflt"


def migrate(database: Database) -> int:
    """Bring the database to :data:`SCHEMA_VERSION`; returns the version it had (0: new).

    RegistryError if the database is newer than this code (nothing is changed then)."""
    with database.transaction(write=True) as tx:
        if tx.dialect.name == "postgresql":
            tx.run("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
        tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = tx.one("SELECT version FROM schema_version")
        found = 0 if row is None else int(row[0])
        if found > SCHEMA_VERSION:
            raise RegistryError(
                f"the database has registry schema v{found}, newer than this edgefleet "
                f"understands (v{SCHEMA_VERSION}); upgrade edgefleet on this machine")
        if 0 < found < SCHEMA_VERSION:
            log.info("upgrading the registry schema from v%d to v%d", found, SCHEMA_VERSION)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            log.debug("registry schema: applying %s", MIGRATIONS[version - 1].__module__)
            MIGRATIONS[version - 1](tx)
        if row is None:
            tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif found != SCHEMA_VERSION:
            tx.run("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
    return found

"""PostgreSQL for the registry: a psycopg connection pool (psycopg_pool).

Several stateless server processes share one PostgreSQL, each with a small pool. A
connection is not checked before each use (that would be one more round trip per call,
doubling the cost of a one-statement read): a connection the server lost (PostgreSQL
restarted, a network cut) fails the call that finds it dead, and the pool replaces it.
Transactions run at READ COMMITTED; writers lock the rows they rewrite
(``Dialect.for_update``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fleet_server.errors import RegistryError

from .database import POSTGRES, Tx, one_line, redact

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresBackend"]

#: How long opening waits for the pool's first connection, and a call for a free one.
_POOL_TIMEOUT_S = 30.0


class PostgresBackend:
    """A pool of autocommit psycopg connections; transactions are explicit."""

    dialect = POSTGRES

    def __init__(self, url: str, *, max_connections: int) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise RegistryError("PostgreSQL needs the psycopg and psycopg-pool packages: pip "
                                "install 'edgefleet[server]'") from exc
        # One plain connection first: a wrong URL fails now, with libpq's reason, instead of
        # as a pool timeout half a minute later.
        _connect(url).close()
        self._pool: ConnectionPool[psycopg.Connection[tuple[Any, ...]]] = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, name="edgefleet-registry",
            # autocommit: transactions are opened explicitly by transaction() below.
            kwargs={"autocommit": True}, timeout=_POOL_TIMEOUT_S)
        self._pool.open(wait=True, timeout=_POOL_TIMEOUT_S)

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        """A READ COMMITTED transaction; writers lock the rows they rewrite (FOR UPDATE)."""
        del write  # PostgreSQL locks rows, not the database: one kind of transaction suffices
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield Tx(cur, self.dialect)

    def close(self) -> None:
        self._pool.close()


def _connect(url: str) -> psycopg.Connection[tuple[Any, ...]]:
    import psycopg

    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.Error as exc:
        raise RegistryError(
            f"cannot connect to {redact(url)} ({one_line(exc)}); check that PostgreSQL runs "
            "there and that the user, password and database exist") from exc
    return conn

"""A SQLite file the agent keeps on its own disk: durable writes, and a way out of corruption.

Used by the outbox (:mod:`agent.outbox`): WAL with ``synchronous=FULL``, so a committed
transaction survives power loss; one ``BEGIN IMMEDIATE`` transaction helper; and, for a
file SQLite reports as damaged, :func:`is_corruption` to tell that apart from a full disk
or a lock, and :func:`set_aside` to move the damaged file out of the way (kept for
inspection) so a fresh one can take its place.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from common.atomic import fsync_dir

__all__ = ["connect", "is_corruption", "set_aside", "transaction"]

log = logging.getLogger(__name__)

_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def connect(path: Path, schema: str, *, timeout_s: float = 10.0) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` for durable use and run ``schema`` (an
    idempotent script). Autocommit mode: write with :func:`transaction`. Usable from any
    thread; the caller serialises access. Raises sqlite3.Error."""
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
    except BaseException:
        db.close()
        raise
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def is_corruption(exc: sqlite3.Error) -> bool:
    """A damaged or foreign file, as opposed to a full disk, a lock or an I/O error."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    message = str(exc).lower()
    return "malformed" in message or "not a database" in message


def set_aside(path: Path, *, keep: int = 3) -> Path:
    """Rename the database and its WAL to ``<name>.<unix time µs>.corrupt[-wal]`` (SQLite
    can still open the pair for inspection), delete its ``-shm``, and delete all but the
    ``keep`` newest set-aside copies. Returns the new name; raises OSError if the file
    cannot be moved."""
    stamp = f"{time.time():.6f}".replace(".", "")
    aside = path.with_name(f"{path.name}.{stamp}.corrupt")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        with suppress(FileNotFoundError):
            if suffix == "-shm":
                source.unlink()  # rebuilt from the WAL; never data
            else:
                source.replace(f"{aside}{suffix}")
    with suppress(OSError):
        fsync_dir(path.parent)
    log.error("corrupt database kept as %s", aside)
    old = sorted(path.parent.glob(f"{path.name}.*.corrupt"), reverse=True)
    for stale in old[keep:]:
        for suffix in ("", "-wal"):
            Path(f"{stale}{suffix}").unlink(missing_ok=True)
    return aside

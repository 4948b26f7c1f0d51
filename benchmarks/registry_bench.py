"""Registry benchmark: the registry's hot operations on each database layer, side by side.

The question it answers (docs/registry.md, "Database layer"): which layer should the
registry run on? Every layer runs on SQLite (a file on disk, WAL, synchronous FULL) and on
the local PostgreSQL, in the same run:

- **v1**: the registry as it was before this benchmark existed, one hand-written module on
  one DB-API connection (loaded from git, benchmarks/registry_v1.py): the baseline.
- **pool**: today's registry: the same kind of hand-written SQL layer, split by concept, on
  a connection pool (psycopg_pool; a bounded sqlite3 pool) with the typed v2 schema.
- **sa-driver** / **sa-text**: today's registry with every statement executed by SQLAlchemy
  2 Core on its own engine and QueuePool instead (``Connection.exec_driver_sql``, and
  ``Connection.execute(text(...))`` with named parameters): the same SQL and domain code,
  so the difference is SQLAlchemy's execution layer. Only if SQLAlchemy is installed
  (``pip install sqlalchemy``; it is not a dependency of edgefleet).
- **sa-core**: the ingest batch written in SQLAlchemy Core's expression language (tables as
  ``Table`` objects, ``select()/update()/insert()``), as a registry on SQLAlchemy would be
  written; ingest only.

Operations, on a fleet of ``--devices`` enrolled devices (default 10,000; 1,000 of them in
one group), each with a desired model and a report:

- **ingest**: what the fleet service's ingest thread does with a batch of 200 device
  messages, in one transaction (``Registry.batch()``): a third reports
  (``decode_reported`` + ``set_reported``), a third events (``add_event`` + ``set_online``),
  a third telemetry (``add_telemetry``), each device's messages as the service decodes them.
- **desired reads**: ``get_device`` for 200 devices (the service reads each selected
  device's desired state to publish it).
- **list 1,000** / **list N**: ``list_devices(group=...)`` of the 1,000-device group, and
  ``list_devices()`` of all of them (the API's device list, ``unconverged()``).

Each operation runs ``--repeat`` times per layer, the layers taking turns (the order
rotating each round) so that other load on the machine falls on all alike; printed are the
best time with its ratio to v1's best (the run least disturbed by other load), and the
ratio of the medians.

Run::

    .venv/bin/python benchmarks/registry_bench.py                 # 10,000 devices
    .venv/bin/python benchmarks/registry_bench.py --devices 1000 --repeat 3   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from registry_v1 import load_v1_registry  # noqa: E402 - a script beside this one

from fleet_server.registry import Registry  # noqa: E402
from fleet_server.registry.bundle_store import BundleStore  # noqa: E402
from fleet_server.registry.database import (  # noqa: E402
    POSTGRES,
    SQLITE,
    Database,
    Dialect,
    Tx,
    open_database,
)
from fleet_server.registry.migrations import migrate  # noqa: E402
from protocol import messages  # noqa: E402
from tests.postgres import PG_URL, with_search_path  # noqa: E402

BATCH = 200
GROUP_SIZE = 1000
FINGERPRINT = "ab" * 32


# --- the fleet, as device messages ------------------------------------------------------

def _reported(version: int, sha: str) -> bytes:
    models = {"digits": messages.ModelReport(version, sha, "committed")}
    installs = {"digits": messages.InstallReport(version, sha, "committed")}
    return messages.encode(messages.Reported("x86_64-avx2", "0.1.0", models, installs,
                                             time.time()))


def _ids(devices: int) -> list[str]:
    return [f"gw-{i:05}" for i in range(devices)]


def _group(index: int) -> str:
    return "g1k" if index < GROUP_SIZE else "rest"


# --- one registry under test --------------------------------------------------------------

class Subject:
    """A registry on one layer, with the calls the service makes on that version."""

    def __init__(self, name: str, registry: Any, *, v1: bool) -> None:
        self.name = name
        self.reg = registry
        self.v1 = v1
        self.seq = 0
        self.sha = ""  # the bundle every device is asked to run

    def store_report(self, device: str, payload: bytes) -> None:
        if self.v1:  # as the v1 service did: validate, then keep the JSON as sent
            messages.decode_reported(payload)
            self.reg.set_reported(device, json.loads(payload))
        else:  # today's registry parses the payload itself
            self.reg.set_reported(device, payload)

    def store_event(self, device: str, payload: bytes) -> None:
        event = messages.decode_event(payload)
        self.reg.add_event(event.kind, device=device, detail={**event.detail,
                                                              "device_at": event.at})
        self.reg.set_online(device, True)

    def store_telemetry(self, device: str, payload: bytes) -> None:
        sample = messages.decode_telemetry(payload)
        if self.v1:
            sample = load_v1_registry().TelemetrySample(sample.seq, sample.at, sample.metrics)
        self.reg.add_telemetry(device, [sample])

    def populate(self, devices: int, sha: str) -> None:
        ids = _ids(devices)
        for start in range(0, devices, 1000):
            with self.reg.batch():
                for i, device in enumerate(ids[start:start + 1000], start):
                    self.reg.upsert_device(device, group=_group(i), profile="x86_64-avx2",
                                           cert_fingerprint=FINGERPRINT, tags=["eu"])
        self.reg.set_desired(sha, group="g1k")
        if devices > GROUP_SIZE:
            self.reg.set_desired(sha, group="rest")
        report = _reported(1, sha)
        for start in range(0, devices, 1000):
            with self.reg.batch():
                for device in ids[start:start + 1000]:
                    self.store_report(device, report)

    def ingest(self, devices: int, sha: str) -> None:
        """One batch of 200 device messages, as the service's ingest thread stores it."""
        self.seq += 1
        ids = _ids(devices)
        picked = sorted(ids[(self.seq * 7919 + k * 104_729) % devices] for k in range(BATCH))
        report = _reported(1, sha)
        event = messages.encode(messages.Event("install.committed", time.time(),
                                               {"version": 1}))
        with self.reg.batch():
            for k, device in enumerate(picked):
                if k % 3 == 0:
                    self.store_report(device, report)
                elif k % 3 == 1:
                    self.store_event(device, event)
                else:
                    self.store_telemetry(device, messages.encode(messages.Telemetry(
                        self.seq * BATCH + k, time.time(), {"cpu": 0.5})))

    def desired_reads(self, devices: int) -> None:
        for device in _ids(devices)[::max(1, devices // BATCH)][:BATCH]:
            assert self.reg.get_device(device).desired

    def list_group(self) -> None:
        assert len(self.reg.list_devices(group="g1k")) == GROUP_SIZE

    def list_all(self, devices: int) -> None:
        assert len(self.reg.list_devices()) == devices


# --- SQLAlchemy under today's registry ---------------------------------------------------

class _SqlAlchemyCursor:
    """What Tx needs of a cursor, executed by SQLAlchemy: ``driver`` hands the SQL to the
    driver through SQLAlchemy (exec_driver_sql); ``text`` compiles ``text()`` statements
    with named parameters, as Core code written by hand would."""

    def __init__(self, conn: Any, mode: str, cache: dict[str, Any]) -> None:
        self._conn = conn
        self._mode = mode
        self._cache = cache
        self._result: Any = None

    def _text(self, sql: str) -> tuple[Any, int]:
        found = self._cache.get(sql)
        if found is None:
            import sqlalchemy

            parts = sql.replace("%s", "?").split("?")
            named = "".join(p + (f":p{i}" if i < len(parts) - 1 else "")
                            for i, p in enumerate(parts))
            found = self._cache[sql] = (sqlalchemy.text(named), len(parts) - 1)
        return found

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._mode == "driver":
            self._result = self._conn.exec_driver_sql(sql, params)
        else:
            statement, _ = self._text(sql)
            self._result = self._conn.execute(statement,
                                              {f"p{i}": v for i, v in enumerate(params)})

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if self._mode == "driver":
            self._result = self._conn.exec_driver_sql(sql, rows)
        else:
            statement, _ = self._text(sql)
            self._result = self._conn.execute(
                statement, [{f"p{i}": v for i, v in enumerate(r)} for r in rows])

    @property
    def rowcount(self) -> int:
        return int(self._result.rowcount)

    @property
    def description(self) -> Any:
        return True if self._result.returns_rows else None

    def fetchone(self) -> Any:
        return self._result.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._result.fetchall())


class _SqlAlchemyBackend:
    """The registry's Backend on a SQLAlchemy engine (its QueuePool, its transactions)."""

    def __init__(self, url: str, dialect: Dialect, mode: str) -> None:
        import sqlalchemy

        self.dialect = dialect
        self._mode = mode
        self._cache: dict[str, Any] = {}
        if dialect is SQLITE:
            self._engine = sqlalchemy.create_engine(f"sqlite:///{url}", pool_size=4)

            # SQLAlchemy's documented recipe for real SQLite transactions, as ours: no
            # implicit BEGIN from the driver, BEGIN IMMEDIATE from SQLAlchemy's begin().
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA foreign_keys=ON")

            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            sqlalchemy.event.listen(self._engine, "connect", _connect)
            sqlalchemy.event.listen(self._engine, "begin", _begin)
        else:
            self._engine = sqlalchemy.create_engine(
                url.replace("postgresql://", "postgresql+psycopg://", 1), pool_size=4,
                pool_pre_ping=True)

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        del write
        with self._engine.begin() as conn:
            yield Tx(_SqlAlchemyCursor(conn, self._mode, self._cache), self.dialect)

    def close(self) -> None:
        self._engine.dispose()


def _sa_registry(url: str, dialect: Dialect, mode: str, blobs: Path) -> Registry:
    database = Database(_SqlAlchemyBackend(url, dialect, mode))
    migrate(database)
    return Registry(database, store=BundleStore(blobs), clock=time.time)


class _CoreIngest:
    """The ingest batch in SQLAlchemy Core's expression language, on the v2 tables."""

    def __init__(self, url: str, dialect: Dialect, devices: int, sha: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.backend = _SqlAlchemyBackend(url, dialect, "driver")
        self.pg = dialect is POSTGRES
        self.devices, self.sha, self.seq = devices, sha, 10_000
        md = sa.MetaData()
        self.dev = sa.Table("devices", md, sa.Column("id", sa.Text, primary_key=True),
                            sa.Column("online", sa.Boolean), sa.Column("last_seen", sa.Float),
                            sa.Column("reported", sa.Text), sa.Column("reported_at", sa.Float))
        self.ev = sa.Table("events", md, sa.Column("id", sa.BigInteger, primary_key=True),
                           sa.Column("at", sa.Float), sa.Column("device_id", sa.Text),
                           sa.Column("kind", sa.Text), sa.Column("detail", sa.Text))
        self.tel = sa.Table("telemetry", md, sa.Column("device_id", sa.Text, primary_key=True),
                            sa.Column("seq", sa.BigInteger, primary_key=True),
                            sa.Column("at", sa.Float), sa.Column("payload", sa.Text))
        self.rep = sa.Table("reported_models", md,
                            sa.Column("device_id", sa.Text, primary_key=True),
                            sa.Column("model", sa.Text, primary_key=True),
                            sa.Column("version", sa.BigInteger),
                            sa.Column("bundle_sha256", sa.Text), sa.Column("state", sa.Text))

    def _lock(self, conn: Any, device: str) -> bool:
        query = self.sa.select(self.dev.c.online).where(self.dev.c.id == device)
        return bool(conn.execute(query.with_for_update() if self.pg else query).scalar_one())

    def _seen(self, conn: Any, device: str, now: float, **values: Any) -> None:
        if not self._lock(conn, device):
            conn.execute(self.ev.insert().values(at=now, device_id=device,
                                                 kind="device.online", detail="{}"))
        conn.execute(self.dev.update().where(self.dev.c.id == device)
                     .values(online=True, last_seen=now, **values))

    def ingest(self) -> None:
        if self.pg:
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        self.seq += 1
        ids = _ids(self.devices)
        picked = sorted(ids[(self.seq * 7919 + k * 104_729) % self.devices]
                        for k in range(BATCH))
        report = _reported(1, self.sha)
        with self.backend._engine.begin() as conn:
            for k, device in enumerate(picked):
                now = time.time()
                with conn.begin_nested():
                    if k % 3 == 0:
                        parsed = messages.decode_reported(report)
                        self._seen(conn, device, now, reported_at=now,
                                   reported=report.decode())
                        conn.execute(self.rep.delete().where(self.rep.c.device_id == device))
                        conn.execute(self.rep.insert(), [
                            {"device_id": device, "model": name, "version": m.version,
                             "bundle_sha256": m.bundle_sha256, "state": m.state}
                            for name, m in parsed.models.items()])
                    elif k % 3 == 1:
                        conn.execute(self.ev.insert().values(
                            at=now, device_id=device, kind="install.committed",
                            detail='{"device_at":1.0,"version":1}').returning(self.ev.c.id))
                        self._seen(conn, device, now)
                    else:
                        self._seen(conn, device, now)
                        conn.execute(insert(self.tel).on_conflict_do_nothing(), [
                            {"device_id": device, "seq": self.seq * BATCH + k, "at": now,
                             "payload": '{"cpu":0.5}'}])

    def close(self) -> None:
        self.backend.close()


# --- running ------------------------------------------------------------------------------

def _timed(candidates: dict[str, Callable[[], None]],
           repeat: int) -> dict[str, tuple[float, float]]:
    """(best, median) seconds of each candidate, timed in turns (the order rotating each
    round), so that other load on the machine falls on all of them alike."""
    for fn in candidates.values():
        fn()  # warm: caches, statement preparation, the pool
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeat):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - started)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


@contextlib.contextmanager
def _databases(kind: str, tmp: Path) -> Iterator[Callable[[str], str]]:
    """A factory of empty databases of ``kind``: a name in, the database's URL out."""
    if kind == "sqlite":
        yield lambda name: str(tmp / f"{name}.db")
        return
    schemas: list[str] = []
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        def make(name: str) -> str:
            schema = f"bench_{name.replace('-', '_')}_{secrets.token_hex(3)}"
            admin.execute(f"CREATE SCHEMA {schema}")
            schemas.append(schema)
            return with_search_path(PG_URL, schema)
        try:
            yield make
        finally:
            for schema in schemas:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")


def run(kind: str, devices: int, repeat: int,
        tmp: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """(best, median) seconds per operation, per layer, on one database kind."""
    try:
        import sqlalchemy  # noqa: F401
        with_sa = True
    except ImportError:
        with_sa = False
    dialect = SQLITE if kind == "sqlite" else POSTGRES
    bundle_bytes = b"bench bundle " * 1000
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with _databases(kind, tmp) as new_database, contextlib.ExitStack() as closing:
        blobs = tmp / "blobs"
        subjects: dict[str, Subject] = {}
        core: _CoreIngest | None = None
        for name in ["v1", "pool", *(["sa-driver", "sa-text"] if with_sa else [])]:
            url = new_database(name)
            print(f"  {kind} {name}: enrolling {devices:,} devices ...", flush=True)
            if name == "v1":
                reg = load_v1_registry().open_registry(url, blob_dir=blobs)
            elif name == "pool":
                reg = _open_pool(url, blobs)
            else:
                reg = _sa_registry(url, dialect, name.removeprefix("sa-"), blobs)
            closing.callback(reg.close)
            subject = subjects[name] = Subject(name, reg, v1=name == "v1")
            subject.sha = reg.put_bundle(bundle_bytes, "digits", 1).sha256
            subject.populate(devices, subject.sha)
            if name == "sa-driver":  # the expression-language ingest, on the same tables
                core = _CoreIngest(url, dialect, devices, subject.sha)
                closing.callback(core.close)
        print(f"  {kind}: timing ...", flush=True)
        ingest: dict[str, Callable[[], None]] = {
            name: partial(s.ingest, devices, s.sha) for name, s in subjects.items()}
        if core is not None:
            ingest["sa-core"] = core.ingest
        timed = {
            "ingest": _timed(ingest, repeat),
            "desired reads": _timed({name: partial(s.desired_reads, devices)
                                     for name, s in subjects.items()}, repeat),
            "list 1,000": _timed({name: s.list_group for name, s in subjects.items()},
                                 repeat),
        }
        if devices > GROUP_SIZE:
            timed[f"list {devices:,}"] = _timed(
                {name: partial(s.list_all, devices) for name, s in subjects.items()},
                max(3, repeat // 2))
    for op, by_layer in timed.items():
        for name, took in by_layer.items():
            results.setdefault(name, {})[op] = took
    return results


def _open_pool(url: str, blobs: Path) -> Registry:
    database = open_database(url)
    migrate(database)
    return Registry(database, store=BundleStore(blobs), clock=time.time)


def report(kind: str, results: dict[str, dict[str, tuple[float, float]]]) -> None:
    base = results["v1"]
    names = [n for n in ("v1", "pool", "sa-driver", "sa-text", "sa-core") if n in results]
    print(f"\n{kind}: best ms (ratio to v1) | median ratio to v1")
    print(f"{'operation':16}" + "".join(f"{n:>26}" for n in names))
    for op in base:
        cells = []
        for name in names:
            took = results[name].get(op)
            if took is None:
                cells.append(f"{'-':>26}")
            else:
                best, median = took
                cells.append(f"{best * 1000:9.1f} ({best / base[op][0]:5.2f}x) | "
                             f"{median / base[op][1]:5.2f}x")
        print(f"{op:16}" + "".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000,
                        help=f"enrolled devices (at least {GROUP_SIZE:,}; default 10,000)")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per operation")
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    if args.devices < GROUP_SIZE:
        parser.error(f"--devices must be at least {GROUP_SIZE}")
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    with tempfile.TemporaryDirectory() as tmp:
        all_results = {kind: run(kind, args.devices, args.repeat, Path(tmp)) for kind in kinds}
    for kind, results in all_results.items():
        report(kind, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

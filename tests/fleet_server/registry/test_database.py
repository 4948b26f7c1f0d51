"""The database layer under the registry: URLs, pools, transactions, batches, restarts."""

from __future__ import annotations

import secrets
import socket
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry, is_outage, open_registry
from protocol.messages import Telemetry
from tests.fleet_server.registry.helpers import DAY, bundle, enroll, kinds, report
from tests.postgres import postgres_schema


def test_one_registry_shared_by_threads(reg: Registry) -> None:
    """The server's HTTP, MQTT and ingest threads share one Registry, more threads than
    it has connections."""
    for i in range(8):
        enroll(reg, f"gw-{i}")

    def work(i: int) -> None:
        for seq in range(25):
            reg.add_telemetry(f"gw-{i}", [Telemetry(seq, float(seq), {})])
            reg.add_event("tick", device=f"gw-{i}")
            reg.list_devices()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert {d: t.sample.seq for d, t in reg.latest_telemetry().items()} == {
        f"gw-{i}": 24 for i in range(8)}
    assert kinds(reg).count("tick") == 200


# --- batches ------------------------------------------------------------------------------

def test_batch_commits_its_calls_together(opener: Callable[[], Registry]) -> None:
    """The fleet service stores a burst of device messages as one transaction."""
    reg, other = opener(), opener()  # other: a second registry, as another process
    for i in range(3):
        enroll(reg, f"gw-{i}")
    with reg.batch():
        for i in range(3):
            reg.set_reported(f"gw-{i}", report(i + 1))
            reg.add_event("install.committed", device=f"gw-{i}")
        assert reg.get_device("gw-2").running["digits"].version == 3  # type: ignore[union-attr]
        # Not committed yet: another connection still sees the state before the batch.
        assert all(not d.reported for d in other.list_devices())
    assert [d.running["digits"].version for d in other.list_devices()] == [1, 2, 3]
    assert kinds(other).count("install.committed") == 3


def test_a_refused_call_in_a_batch_changes_nothing_and_the_batch_goes_on(
        reg: Registry) -> None:
    enroll(reg, "gw-1")
    with reg.batch():
        with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
            reg.set_reported("gw-9", report(1))
        # Refused half-way: the group was already changed when the tags were found bad.
        with pytest.raises(RegistryError, match="tag"):
            reg.update_device("gw-1", group="field", tags=["bad\ntag"])
        reg.set_reported("gw-1", report(1))
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.group, device.running["digits"].version) == ("lab", 1)
    assert "device.updated" not in kinds(reg)


def test_a_batch_that_raises_is_undone_whole(reg: Registry) -> None:
    enroll(reg, "gw-1")
    events = len(reg.events())

    class DatabaseFailed(Exception):
        pass

    def store_then_fail() -> None:
        with reg.batch():
            reg.set_reported("gw-1", report(1))
            reg.add_event("install.committed", device="gw-1")
            raise DatabaseFailed

    with pytest.raises(DatabaseFailed):
        store_then_fail()
    assert reg.get_device("gw-1").running == {}  # type: ignore[union-attr]
    assert len(reg.events()) == events
    reg.set_reported("gw-1", report(2))  # the registry is usable afterwards
    assert reg.get_device("gw-1").running["digits"].version == 2  # type: ignore[union-attr]


def test_a_batch_belongs_to_its_thread(reg: Registry) -> None:
    """Other threads read the committed state beside a batch, and what they write is theirs:
    it stays when the batch is undone."""
    enroll(reg, "gw-1")
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.append(reg.get_device("gw-1")))
    writer = threading.Thread(target=lambda: reg.add_event("beside", device="gw-1"))

    class Undo(Exception):
        pass

    def batch_then_undo() -> None:
        with reg.batch():
            reg.set_reported("gw-1", report(1))
            reg.add_event("inside", device="gw-1")
            reader.start()
            reader.join()  # not blocked by the batch, and not reading half of it
            writer.start()  # on SQLite it waits for the batch's write lock; on PostgreSQL not
            with pytest.raises(RuntimeError, match="does not nest"), reg.batch():
                pass
            raise Undo

    with pytest.raises(Undo):
        batch_then_undo()
    writer.join()
    assert seen[0].reported == {}
    assert "inside" not in kinds(reg)
    assert "beside" in kinds(reg)


# --- restart, opening, closing ------------------------------------------------------------

def test_restart_keeps_all_state(opener: Callable[[], Registry]) -> None:
    reg = opener()
    enroll(reg, "gw-0", "lab", ("canary",))
    enroll(reg, "gw-1", "lab")
    token = reg.issue_token("lab", ttl=DAY)
    used = reg.issue_token("lab", ttl=DAY)
    reg.redeem_token(used, "gw-1")
    v1, v2 = bundle(reg, version=1), bundle(reg, version=2)
    reg.set_desired(v1, group="lab")
    reg.set_desired(v2, group="lab")
    reg.set_reported("gw-0", report(2, v2))
    reg.add_telemetry("gw-0", [Telemetry(1, 1.0, {"cpu": 0.5})])
    reg.add_event("note", detail={"k": [1, 2]})
    before = (reg.list_devices(), reg.list_bundles(), reg.events(), reg.latest_telemetry())
    reg.close()

    again = opener()
    assert (again.list_devices(), again.list_bundles(), again.events(),
            again.latest_telemetry()) == before
    assert again.get_device("gw-0").converged  # type: ignore[union-attr]
    assert again.redeem_token(token, "gw-2") == "lab"
    with pytest.raises(RegistryError, match="already used by device 'gw-1'"):
        again.redeem_token(used, "gw-3")
    assert again.add_telemetry("gw-0", [Telemetry(1, 1.0, {"cpu": 0.5})]) == 0
    rolled = again.rollback(group="lab")[0].after
    assert rolled is not None
    assert rolled.bundle_sha256 == v1
    assert again.add_event("later") > before[2][-1].id


def test_closed_registry_refuses_calls(reg: Registry) -> None:
    reg.close()
    reg.close()
    with pytest.raises(RegistryError, match="the registry is closed; open it again"):
        reg.list_devices()
    with pytest.raises(RegistryError, match="the registry is closed"), reg.batch():
        pass


@pytest.mark.parametrize("form", ["plain", "path", "relative-url"])
def test_sqlite_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    monkeypatch.chdir(tmp_path)
    urls: dict[str, str | Path] = {"plain": "state/fleet.db", "path": Path("state/fleet.db"),
                                   "relative-url": "sqlite:///state/fleet.db"}
    with open_registry(urls[form]) as reg:
        enroll(reg, "gw-0")
        assert reg.dialect == "sqlite"
    with sqlite3.connect(tmp_path / "state" / "fleet.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT id FROM devices").fetchall() == [("gw-0",)]
    conn.close()


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://root@localhost/fleet", "unsupported database URL scheme 'mysql'"),
    ("sqlite://fleet.db", "a SQLite URL is sqlite:///relative/path.db"),
    ("sqlite:///", "a SQLite URL is"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        open_registry(url)


def test_sqlite_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    (tmp_path / "fleet.db").write_bytes(b"not a database" * 100)
    with pytest.raises(RegistryError, match=r"fleet\.db is not a usable SQLite database"):
        open_registry(tmp_path / "fleet.db")


def test_an_empty_sqlite_file_is_not_a_new_registry(tmp_path: Path) -> None:
    (tmp_path / "fleet.db").write_bytes(b"")
    with pytest.raises(RegistryError, match=r"fleet\.db is an empty file \(0 bytes\)"):
        open_registry(tmp_path / "fleet.db")
    assert (tmp_path / "fleet.db").stat().st_size == 0  # left for the operator to look at


@pytest.mark.parametrize("size", [0, 65, True])
def test_pool_size_is_bounded(tmp_path: Path, size: int) -> None:
    with pytest.raises(RegistryError, match="max_connections must be 1 to 64"):
        open_registry(tmp_path / "fleet.db", max_connections=size)


def test_one_connection_is_enough(db_url: str, tmp_path: Path) -> None:
    """Calls never hold two connections at once (a batch included): a pool of one works."""
    with open_registry(db_url, blob_dir=tmp_path / "b", max_connections=1) as reg:
        enroll(reg, "gw-0")
        with reg.batch():
            reg.set_desired(bundle(reg), devices=["gw-0"])
            reg.set_reported("gw-0", report(1))
        assert reg.unconverged() == []


def test_unreachable_postgres_names_the_url_without_password() -> None:
    expected = (r"cannot connect to postgresql://fleet:\*\*\*@127\.0\.0\.1:1/fleet"
                r"\?connect_timeout=2 \(connection failed: [^\n]*\); check that PostgreSQL")
    with pytest.raises(RegistryError, match=expected):
        open_registry("postgresql://fleet:s3cret@127.0.0.1:1/fleet?connect_timeout=2")


@pytest.mark.integration
def test_postgres_replaces_a_connection_it_lost() -> None:
    name = f"edgefleet-test-{secrets.token_hex(4)}"  # kill this registry's session only
    with (postgres_schema() as (url, admin),
          open_registry(f"{url}&application_name={name}") as reg):
        enroll(reg, "gw-0")  # one call at a time: the pool holds one connection
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s", (name,)).fetchall()
        assert killed == [(True,)]
        with pytest.raises(psycopg.OperationalError):  # the call that finds it dead fails
            reg.list_devices()
        assert [d.id for d in reg.list_devices()] == ["gw-0"]  # the pool replaced it
        enroll(reg, "gw-1")
        assert [d.id for d in reg.list_devices()] == ["gw-0", "gw-1"]


def test_with_rows_runs_one_statement_over_many_rows(db_url: str) -> None:
    """Tx.with_rows on both databases: every row, in order, typed as its column; on SQLite
    split into statements within its parameter limit (10,000 rows of 4 are 40,000)."""
    from fleet_server.registry.database import open_database

    rows = [(f"d-{n}", n, n / 2 if n % 3 else None, n % 2 == 0) for n in range(10_000)]
    rows[1] = ("d-1", 1, 7, False)  # an int where floats go: stored as a float
    database = open_database(db_url)
    try:
        with database.transaction(write=True) as tx:
            tx.run("CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT, x DOUBLE PRECISION, "
                   "b BOOLEAN)")
            returned = tx.with_rows(
                "INSERT INTO t (id, n, x, b) SELECT column1, column2, column3, column4 "
                "FROM {rows} WHERE true ON CONFLICT (id) DO NOTHING RETURNING id",
                ("TEXT", "BIGINT", "DOUBLE PRECISION", "BOOLEAN"), rows + rows[:5])
            assert [r[0] for r in returned] == [r[0] for r in rows]  # the repeats skipped
            assert tx.with_rows("SELECT id FROM t WHERE id IN (SELECT column1 FROM {rows})",
                                ("TEXT",), []) == []
            stored = tx.all("SELECT id, n, x, b FROM t ORDER BY n")
            assert [(i, n, x, bool(b)) for i, n, x, b in stored] == [
                (i, n, None if x is None else float(x), b) for i, n, x, b in rows]
            tx.run("DROP TABLE t")
    finally:
        database.close()


def test_an_outage_is_told_from_a_refusal(tmp_path: Path) -> None:
    # What the ingest keeps and retries (the database is unavailable) against what it
    # records as the message's fault: real errors of both drivers.
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked") as locked:
        waiter.execute("INSERT INTO t VALUES (1)")
    holder.close()
    waiter.close()
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout=2)
    assert is_outage(locked.value)
    assert is_outage(refused.value)
    assert not is_outage(RegistryError("unknown device 'gw-9'"))
    assert not is_outage(psycopg.errors.NumericValueOutOfRange("out of range"))
    assert not is_outage(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_outage(ValueError("a bug"))

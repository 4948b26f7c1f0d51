"""Schema migrations: a registry made by the v1 code opens, upgrades in place and behaves as
before, on both databases; a new database ends up the same as an upgraded one; servers
starting together on one PostgreSQL do not race; a failed upgrade changes nothing.

The v1 databases are fixtures made by the v1 code itself (v1/make_fixtures.py): a SQLite
file and a PostgreSQL dump, with what v1 answered about them in v1/expected.json.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import SCHEMA_VERSION, Registry, desired_json, open_registry
from protocol.messages import ModelReport, Telemetry
from tests.fleet_server.registry.helpers import Clock
from tests.postgres import postgres_schema

V1 = Path(__file__).resolve().parent / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text(encoding="utf-8"))


def load_v1(url: str) -> str:
    """Put the v1 fixture into the (empty) database at ``url``; returns ``url``."""
    if url.startswith("sqlite:///"):
        shutil.copyfile(V1 / "registry_v1.sqlite", url.removeprefix("sqlite:///"))
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((V1 / "registry_v1.postgres.sql").read_text(encoding="utf-8"))
    return url


def version_of(url: str) -> int:
    with _query(url) as query:
        return int(query("SELECT version FROM schema_version")[0][0])


@contextlib.contextmanager
def _query(url: str) -> Iterator[Callable[[str], list[tuple[Any, ...]]]]:
    """Plain SQL on the database at ``url``, without the registry."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield lambda sql: conn.execute(sql).fetchall()
        finally:
            conn.close()
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            def run(sql: str) -> list[tuple[Any, ...]]:
                cursor = pg.execute(sql)
                return cursor.fetchall() if cursor.description else []

            yield run


def schema_of(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Tables, columns, indexes and constraints, as the database describes them."""
    with _query(url) as query:
        if url.startswith("sqlite:///"):
            return {"objects": query("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                     "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")}
        schema = query("SELECT current_schema()")[0][0]
        return {
            "columns": query(
                "SELECT table_name, ordinal_position, column_name, data_type, is_nullable, "
                "column_default, is_identity FROM information_schema.columns "
                "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"),
            "indexes": [(name, definition.replace(f"{schema}.", ""))
                        for name, definition in query(
                            "SELECT indexname, indexdef FROM pg_indexes "
                            "WHERE schemaname = current_schema() ORDER BY indexname")],
            "constraints": query(
                "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                "FROM pg_constraint WHERE connamespace = current_schema()::regnamespace "
                "ORDER BY 1, 2"),
        }


@pytest.fixture
def v1_url(db_url: str) -> str:
    """The test database, holding what the v1 code left in it."""
    return load_v1(db_url)


@pytest.fixture
def upgraded(v1_url: str, tmp_path: Path) -> Iterator[Registry]:
    """The v1 database opened with today's code (a clock a little after v1's last call)."""
    clock = Clock()
    clock.now = 1_800_000_100.0
    with open_registry(v1_url, blob_dir=tmp_path / "blobs", clock=clock) as reg:
        yield reg


def test_the_fixture_is_at_v1(v1_url: str) -> None:
    assert version_of(v1_url) == 1
    with _query(v1_url) as query:
        assert len(query("SELECT desired FROM devices")) == 4  # the v1 layout


def test_v1_data_is_kept(upgraded: Registry, v1_url: str) -> None:
    before = EXPECTED["before"]
    assert version_of(v1_url) == SCHEMA_VERSION
    sizes = {b["sha256"]: b["size"] for b in before["bundles"]}
    for device, was in zip(upgraded.list_devices(), before["devices"], strict=True):
        assert (device.id, device.group, list(device.tags), device.profile,
                device.cert_fingerprint, device.enrolled_at, device.last_seen, device.online,
                device.reported_at) == (
            was["id"], was["group"], was["tags"], was["profile"], was["cert_fingerprint"],
            was["enrolled_at"], was["last_seen"], was["online"], was["reported_at"])
        # Desired models now carry their bundle's size, as published to the device.
        assert device.desired_json() == {
            name: {**d, "size": sizes[d["bundle_sha256"]]} for name, d in was["desired"].items()}
        assert device.converged == was["converged"], device.id
        if isinstance(was["reported"].get("models"), dict):
            # Parsed once, at the upgrade, into the typed models.
            assert device.running == {
                name: ModelReport(m["version"], m["bundle_sha256"], m["state"])
                for name, m in was["reported"]["models"].items()}
        else:  # a report v1 took without checking: shown as it was, not believed
            assert device.running == {}
        assert dict(device.reported) == was["reported"]
    assert [{"sha256": b.sha256, "name": b.name, "version": b.version, "size": b.size,
             "path": str(b.path), "created_at": b.created_at}
            for b in upgraded.list_bundles()] == before["bundles"]
    assert [{"id": e.id, "at": e.at, "device": e.device, "kind": e.kind,
             "detail": dict(e.detail)} for e in upgraded.events(limit=10_000)] == before["events"]
    assert [{"device": t.device, "seq": t.sample.seq, "at": t.sample.at,
             "payload": dict(t.sample.metrics)}
            for d in upgraded.list_devices() for t in upgraded.telemetry(d.id)
            ] == before["telemetry"]


def test_v1_fetch_permissions_are_kept_but_not_a_forged_one(upgraded: Registry) -> None:
    vit = EXPECTED["facts"]["bundles"]["vit"]
    expected = dict(EXPECTED["before"]["was_desired"])
    # v1 let gw-1 fetch vit because of an event gw-1 sent itself (make_fixtures.py).
    assert expected.pop(f"gw-1 {vit}") is True
    for pair, allowed in expected.items():
        device, sha = pair.split()
        assert upgraded.was_desired(device, sha) is allowed, pair
        # The bundle endpoint's one-query check says the same, with the fingerprint.
        record = upgraded.get_device(device)
        assert record is not None
        assert upgraded.bundle_access(device, sha) == (record.cert_fingerprint, allowed), pair
    assert upgraded.was_desired("gw-1", vit) is False
    gw1 = upgraded.get_device("gw-1")
    assert gw1 is not None
    assert upgraded.bundle_access("gw-1", vit) == (gw1.cert_fingerprint, False)
    assert upgraded.bundle_access("gw-1", "../" + vit) == (gw1.cert_fingerprint, False)
    assert upgraded.bundle_access("nobody", vit) is None


def test_v1_state_behaves_as_it_did(upgraded: Registry) -> None:
    """The operations v1 made on its own database give the same results after upgrading."""
    after = EXPECTED["after"]
    assert upgraded.redeem_token(EXPECTED["facts"]["open_token"], "gw-9") == after[
        "redeem_open_token"]
    changes = upgraded.rollback(group="lab", model="digits")
    assert [{"device": c.device, "model": c.model,
             "before": None if c.before is None else _v1_json(c.before),
             "after": None if c.after is None else _v1_json(c.after)}
            for c in changes] == after["rollback_lab_digits"]
    assert {d.id: {name: _v1_json(m) for name, m in d.desired.items()}
            for d in upgraded.list_devices()} == after["desired_after"]
    with pytest.raises(RegistryError) as refused:
        upgraded.redeem_token(EXPECTED["facts"]["open_token"], "gw-0")
    assert str(refused.value) == after["redeem_open_token_again"]
    assert upgraded.add_telemetry("gw-0", [Telemetry(3, 3.0, {})]) == after[
        "telemetry_resend_new"]
    assert upgraded.add_telemetry("gw-0", [Telemetry(4, 4.0, {})]) == after["telemetry_next_new"]
    assert upgraded.add_event("later") > EXPECTED["before"]["events"][-1]["id"]


def _v1_json(model: Any) -> dict[str, Any]:
    """A desired model as v1 showed it (without the size it did not keep)."""
    shown = desired_json(model)
    del shown["size"]
    return shown


def test_a_new_database_is_laid_out_as_an_upgraded_one(v1_url: str, tmp_path: Path) -> None:
    open_registry(v1_url).close()
    if v1_url.startswith("sqlite:///"):
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
        open_registry(fresh).close()
        assert schema_of(fresh) == schema_of(v1_url)
        return
    with postgres_schema() as (fresh, _):
        open_registry(fresh).close()
        assert schema_of(fresh) == schema_of(v1_url)


def test_a_v1_database_with_event_seqs_keeps_them(v1_url: str) -> None:
    """The last v1 code added device_event_seqs at open, without a new version."""
    with _query(v1_url) as query:
        query("CREATE TABLE device_event_seqs (device_id TEXT NOT NULL, seq BIGINT NOT NULL, "
              "PRIMARY KEY (device_id, seq))")
        query("INSERT INTO device_event_seqs (device_id, seq) VALUES ('gw-0', 7)")
    with open_registry(v1_url) as reg:
        assert reg.add_event("agent.install.staged", device="gw-0", seq=7) == 0  # re-sent
        assert reg.add_event("agent.install.staged", device="gw-0", seq=8) > 0


def test_opening_again_changes_nothing(v1_url: str) -> None:
    open_registry(v1_url).close()
    layout = schema_of(v1_url)
    open_registry(v1_url).close()
    assert (schema_of(v1_url), version_of(v1_url)) == (layout, SCHEMA_VERSION)


def test_newer_schema_is_refused(db_url: str) -> None:
    open_registry(db_url).close()
    with _query(db_url) as query:
        query(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RegistryError, match=f"schema v{SCHEMA_VERSION + 1}, newer.*upgrade"):
        open_registry(db_url)


def test_a_failed_upgrade_changes_nothing(v1_url: str) -> None:
    """v1 only ever desired stored bundles; a database where that is broken is refused, and
    left exactly as it was (the DDL already run is rolled back with the rest)."""
    with _query(v1_url) as query:
        query("UPDATE devices SET desired = '{\"digits\": {\"version\": 9, \"bundle_sha256\": "
              f"\"{'0' * 64}\"}}}}' WHERE id = 'gw-2'")
    layout = schema_of(v1_url)
    with pytest.raises(RegistryError, match=r"cannot upgrade the registry: device 'gw-2' .*"
                                            r"not in the bundles table; restore"):
        open_registry(v1_url)
    assert (schema_of(v1_url), version_of(v1_url)) == (layout, 1)


@pytest.mark.integration
@pytest.mark.parametrize("start", ["v1", "empty"])
def test_servers_starting_together_on_postgres_migrate_once(start: str) -> None:
    """Four registries (four sessions, as four server processes) open one database at the
    same moment: the advisory lock makes them take turns, and the last three find the work
    done."""
    with postgres_schema() as (url, _):
        if start == "v1":
            load_v1(url)
        barrier = threading.Barrier(4)
        outcomes: list[str] = []

        def start_server() -> None:
            barrier.wait()
            try:
                open_registry(url).close()
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(repr(exc))

        servers = [threading.Thread(target=start_server) for _ in range(4)]
        for s in servers:
            s.start()
        for s in servers:
            s.join()
        assert outcomes == ["ok"] * 4
        assert version_of(url) == SCHEMA_VERSION
        with open_registry(url) as reg:
            devices = reg.list_devices()
        assert len(devices) == (4 if start == "v1" else 0)
        assert all(len(d.desired) == len(w["desired"])
                   for d, w in zip(devices, EXPECTED["before"]["devices"], strict=False))


def test_the_postgres_fixture_names_no_schema() -> None:
    """The dump loads into whichever schema the connection uses (make_fixtures._portable)."""
    dump = (V1 / "registry_v1.postgres.sql").read_text(encoding="utf-8")
    assert not re.search(r"registry_v1_fixture|CREATE SCHEMA|search_path", dump)

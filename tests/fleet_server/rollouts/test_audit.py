"""The audit log's hash chain: appended in the registry (SQLite and PostgreSQL), and
``verify_chain`` finds every changed, removed or reordered entry."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fleet_server.audit import GENESIS, AuditEntry, entry_hash, verify_chain
from fleet_server.registry import Registry, open_registry
from tests.fleet_server.registry.helpers import Clock


@pytest.fixture
def reg(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    with open_registry(db_url, blob_dir=tmp_path / "blobs", clock=Clock()) as registry:
        yield registry


def _log(reg: Registry, n: int = 5) -> list[AuditEntry]:
    for i in range(n):
        reg.append_audit("admin:abc", "publish", f"group:g{i}", f"because {i}", {"i": i})
    return reg.audit_log()


def test_entries_chain_and_verify(reg: Registry) -> None:
    entries = _log(reg)
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert reg.audit_head() == (5, entries[-1].hash)
    assert verify_chain(entries, reg.audit_head()) == []
    assert reg.last_audit("publish") == entries[-1]
    assert reg.last_audit("enroll") is None


def _tamper(reg: Registry, sql: str, params: tuple[object, ...]) -> None:
    """Edit the stored log behind the registry's back, as an attacker with the database
    would."""
    with reg._db.transaction(write=True) as tx:
        tx.run(sql, params)


@pytest.mark.parametrize(("sql", "params", "words"), [
    ("UPDATE audit_log SET reason = ? WHERE seq = 3", ("nothing to see",), "entry 3: its "
     "contents do not match"),
    ("UPDATE audit_log SET actor = ? WHERE seq = 1", ("someone else",), "entry 1: its "
     "contents"),
    ("DELETE FROM audit_log WHERE seq = ?", (2,), "entry 3: expected entry 2"),
    ("DELETE FROM audit_log WHERE seq = ?", (5,), "newest entries were removed"),
    ("UPDATE audit_log SET seq = -seq WHERE seq IN (2, 4)", (), "entry 2: does not follow"),
], ids=["changed", "actor", "removed", "removed-newest", "reordered"])
def test_verify_finds_tampering(reg: Registry, sql: str, params: tuple[object, ...],
                                words: str) -> None:
    _log(reg)
    _tamper(reg, sql, params)
    if "seq = -seq" in sql:  # swap entries 2 and 4
        _tamper(reg, "UPDATE audit_log SET seq = 4 WHERE seq = -2", ())
        _tamper(reg, "UPDATE audit_log SET seq = 2 WHERE seq = -4", ())
    problems = verify_chain(reg.audit_log(), reg.audit_head())
    assert problems, "tampering went unnoticed"
    assert any(words in p for p in problems), problems


def test_a_rehashed_edit_still_breaks_the_next_link() -> None:
    entries = []
    prev = GENESIS
    for i in range(3):
        e = AuditEntry(i + 1, 1.0 + i, "a", "publish", "t", "", {}, prev)
        e = replace(e, hash=entry_hash(e))
        entries.append(e)
        prev = e.hash
    forged = replace(entries[1], reason="forged")
    entries[1] = replace(forged, hash=entry_hash(forged))
    problems = verify_chain(entries, (3, entries[-1].hash))
    assert problems == ["entry 3: does not follow the entry before it (prev_hash differs): "
                        "an entry before it was changed, removed or reordered"]

"""The registry on both databases: SQLite in a temporary file and PostgreSQL on this machine.

PostgreSQL is at ``EDGEFLEET_TEST_POSTGRES_URL`` (default: the local server, database
``test``); each test gets a fresh schema, dropped afterwards. When PostgreSQL is not
reachable those tests fail rather than skip: CI has it, and a silent skip would hide a broken
backend.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet_server.errors import RegistryError
from fleet_server.registry import (
    SCHEMA_VERSION,
    DesiredChange,
    DesiredModel,
    Enrolled,
    Registry,
    TelemetrySample,
    is_converged,
    open_registry,
)
from tests.postgres import postgres_schema

FINGERPRINT = "ab" * 32
DAY = 86400.0


class Clock:
    """A settable clock: the registry's only source of time in these tests."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def opener(db_url: str, tmp_path: Path, clock: Clock) -> Iterator[Callable[[], Registry]]:
    """Opens registries on the test database; closes them all at the end."""
    opened: list[Registry] = []

    def open_one() -> Registry:
        registry = open_registry(db_url, blob_dir=tmp_path / "blobs", clock=clock)
        opened.append(registry)
        return registry

    yield open_one
    for registry in opened:
        registry.close()


@pytest.fixture
def reg(opener: Callable[[], Registry]) -> Registry:
    return opener()


def _enroll(reg: Registry, device_id: str, group: str = "lab",
            tags: tuple[str, ...] = ()) -> None:
    reg.upsert_device(device_id, group=group, profile="x86_64-avx2",
                      cert_fingerprint=FINGERPRINT, tags=tags)


def _bundle(reg: Registry, name: str = "digits", version: int = 1) -> str:
    return reg.put_bundle(f"{name} v{version}".encode(), name, version).sha256


def _kinds(reg: Registry, device: str | None = None) -> list[str]:
    return [e.kind for e in reg.events(device=device)]


# --- devices ------------------------------------------------------------------------------

def test_upsert_get_and_list_devices(reg: Registry, clock: Clock) -> None:
    _enroll(reg, "gw-1", "lab", ("canary", "eu"))
    _enroll(reg, "gw-2", "lab", ("eu",))
    _enroll(reg, "cam-1", "field")
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.group, device.tags, device.profile) == ("lab", ("canary", "eu"),
                                                           "x86_64-avx2")
    assert (device.cert_fingerprint, device.enrolled_at) == (FINGERPRINT, clock.now)
    assert (device.online, device.last_seen, device.reported_at) == (False, None, None)
    assert (dict(device.desired), dict(device.reported)) == ({}, {})
    assert reg.get_device("nope") is None
    assert [d.id for d in reg.list_devices()] == ["cam-1", "gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(group="lab")] == ["gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(tag="eu")] == ["gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(group="lab", tag="canary")] == ["gw-1"]
    assert reg.list_devices(group="nowhere") == []


def test_enrolling_again_replaces_identity_and_keeps_desired_state(reg: Registry,
                                                                   clock: Clock) -> None:
    _enroll(reg, "gw-1", tags=("old",))
    reg.set_desired(_bundle(reg), devices=["gw-1"])
    clock.now += 60
    device = reg.upsert_device("gw-1", group="field", profile="arm64-neon",
                               cert_fingerprint="CD" * 32, tags=["new", "new"])
    assert (device.group, device.profile, device.tags) == ("field", "arm64-neon", ("new",))
    assert (device.cert_fingerprint, device.enrolled_at) == ("cd" * 32, clock.now)
    assert list(device.desired) == ["digits"]
    again = reg.events(device="gw-1")[-1]
    assert (again.kind, again.detail["again"]) == ("device.enrolled", True)


def test_update_device(reg: Registry) -> None:
    _enroll(reg, "gw-1", tags=("a",))
    device = reg.update_device("gw-1", group="field", tags=["b", "c"])
    assert (device.group, device.tags, device.profile) == ("field", ("b", "c"), "x86_64-avx2")
    assert reg.list_devices(tag="a") == []
    with pytest.raises(RegistryError, match="unknown device 'gw-9'; it must enroll first"):
        reg.update_device("gw-9", group="x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device_id": "gw/1"}, "invalid device id 'gw/1'"),
    ({"device_id": "+"}, "invalid device id"),
    ({"device_id": "gw:1"}, "invalid device id"),
    ({"device_id": "a" * 65}, "use 1 to 64 letters"),
    ({"device_id": ""}, "invalid device id"),
    ({"group": " lab"}, "invalid group ' lab'"),
    ({"cert_fingerprint": "abc"}, "not a SHA-256 hex digest"),
    ({"tags": "canary"}, "tags must be a list of strings"),
    ({"tags": ["ok", ""]}, "invalid tag ''"),
])
def test_upsert_refuses_bad_input(reg: Registry, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"device_id": "gw-1", "group": "lab", "profile": "p",
                            "cert_fingerprint": FINGERPRINT, "tags": (), **kwargs}
    with pytest.raises(RegistryError, match=message):
        reg.upsert_device(args.pop("device_id"), **args)
    assert reg.list_devices() == []


def test_online_and_last_seen(reg: Registry, clock: Clock) -> None:
    _enroll(reg, "gw-1")
    clock.now += 5
    reg.set_online("gw-1", True)
    reg.set_online("gw-1", True)  # no transition: no second event
    seen = clock.now
    clock.now += 5
    reg.set_online("gw-1", False)
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.online, device.last_seen) == (False, seen)
    assert [d.id for d in reg.list_devices(online=False)] == ["gw-1"]
    assert _kinds(reg, "gw-1") == ["device.enrolled", "device.online", "device.offline"]
    with pytest.raises(RegistryError, match="unknown device"):
        reg.set_online("gw-9", True)


# --- enrollment tokens --------------------------------------------------------------------

def test_token_issue_and_redeem(reg: Registry) -> None:
    token = reg.issue_token("lab", ttl=DAY)
    assert len(token) >= 40
    assert reg.redeem_token(token, "gw-1") == "lab"
    with reg._tx() as tx:  # white-box: only the hash is stored
        rows = tx.all("SELECT token_sha256, used_by FROM enrollment_tokens")
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), "gw-1")]
    assert all(token not in repr(e.detail) for e in reg.events())
    assert _kinds(reg) == ["token.issued", "token.redeemed"]


def test_token_refusals(reg: Registry, clock: Clock) -> None:
    token = reg.issue_token("lab", ttl=DAY)
    reg.redeem_token(token, "gw-1")
    with pytest.raises(RegistryError, match=r"already used by device 'gw-1' at .*new one"):
        reg.redeem_token(token, "gw-2")
    with pytest.raises(RegistryError, match="already used"):
        reg.redeem_token(token, "gw-1")  # not even by the same device: one token, one cert
    with pytest.raises(RegistryError, match="unknown enrollment token; check for typos"):
        reg.redeem_token("not-a-token", "gw-2")
    late = reg.issue_token("field", ttl=60)
    clock.now += 60
    with pytest.raises(RegistryError, match=r"token for group 'field' expired at .*new one"):
        reg.redeem_token(late, "gw-2")
    with pytest.raises(RegistryError, match="token lifetime must be positive"):
        reg.issue_token("lab", ttl=0)
    with pytest.raises(RegistryError, match="invalid device id"):
        reg.redeem_token(reg.issue_token("lab", ttl=60), "a b")


@pytest.mark.parametrize("shared", [True, False], ids=["one-registry", "one-per-thread"])
def test_concurrent_redeem_has_exactly_one_winner(opener: Callable[[], Registry],
                                                  shared: bool) -> None:
    """Threads on one Registry (its lock) and on separate connections (the database)."""
    threads = 8
    first = opener()
    registries = [first] * threads if shared else [first, *(opener() for _ in range(threads - 1))]
    token = first.issue_token("lab", ttl=DAY)
    barrier = threading.Barrier(threads)
    results: list[str] = []

    def redeem(i: int) -> None:
        barrier.wait()
        try:
            results.append(f"won {registries[i].redeem_token(token, f'gw-{i}')}")
        except RegistryError as exc:
            results.append(str(exc))

    workers = [threading.Thread(target=redeem, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert results.count("won lab") == 1
    assert sum("already used by device" in r for r in results) == threads - 1
    assert _kinds(first).count("token.redeemed") == 1


# --- bundles ------------------------------------------------------------------------------

def test_put_bundle_is_idempotent_and_content_addressed(reg: Registry, tmp_path: Path) -> None:
    data = b"\x89EFB bundle bytes" * 100
    record = reg.put_bundle(data, "digits", 3)
    sha = hashlib.sha256(data).hexdigest()
    assert (record.sha256, record.name, record.version, record.size) == (sha, "digits", 3,
                                                                         len(data))
    assert record.path == (tmp_path / "blobs" / f"{sha}.efb").resolve()
    assert record.path.read_bytes() == data
    assert reg.put_bundle(data, "digits", 3) == record
    assert reg.get_bundle(sha) == record
    assert reg.get_bundle("0" * 64) is None
    record.path.unlink()
    assert reg.put_bundle(data, "digits", 3) == record  # a lost blob is written again
    assert record.path.read_bytes() == data
    record.path.write_bytes(b"x" * len(data))
    assert reg.put_bundle(data, "digits", 3) == record  # so is a damaged one
    assert record.path.read_bytes() == data
    assert reg.list_bundles() == [record]
    assert _kinds(reg) == ["bundle.stored"]


def test_put_bundle_repairs_the_recorded_blob(reg: Registry, db_url: str,
                                              tmp_path: Path) -> None:
    """A registry opened with another blob_dir still repairs the file the record names."""
    record = reg.put_bundle(b"bytes", "digits", 1)
    record.path.unlink()
    with open_registry(db_url, blob_dir=tmp_path / "elsewhere") as other:
        assert other.put_bundle(b"bytes", "digits", 1) == record
    assert record.path.read_bytes() == b"bytes"
    assert not (tmp_path / "elsewhere").exists()


def test_put_bundle_refuses_clashes(reg: Registry, tmp_path: Path) -> None:
    reg.put_bundle(b"one", "digits", 1)
    with pytest.raises(RegistryError, match=r"digits v1 is already stored as another bundle"):
        reg.put_bundle(b"two", "digits", 1)
    with pytest.raises(RegistryError, match=r"already stored as digits v1, not other v1"):
        reg.put_bundle(b"one", "other", 1)
    with pytest.raises(RegistryError, match="version must be a positive integer"):
        reg.put_bundle(b"three", "digits", 0)
    # The refused bytes left no file behind.
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [
        f"{hashlib.sha256(b'one').hexdigest()}.efb"]


def test_list_bundles_orders_by_name_and_version(reg: Registry) -> None:
    for name, version in [("vit", 1), ("digits", 2), ("digits", 1)]:
        _bundle(reg, name, version)
    assert [(b.name, b.version) for b in reg.list_bundles()] == [
        ("digits", 1), ("digits", 2), ("vit", 1)]
    assert [b.version for b in reg.list_bundles("digits")] == [1, 2]


def test_put_bundle_needs_a_blob_dir(db_url: str) -> None:
    with open_registry(db_url) as reg, pytest.raises(RegistryError,
                                                     match=r"open_registry.*blob_dir=DIR"):
        reg.put_bundle(b"x", "digits", 1)


# --- desired, reported, convergence -------------------------------------------------------

def _report(sha: str, version: int, state: str = "committed") -> dict[str, Any]:
    return {"models": {"digits": {"version": version, "bundle_sha256": sha, "state": state}},
            "installs": [{"id": "i1", "state": state}]}


def test_desired_reported_and_convergence(reg: Registry, clock: Clock) -> None:
    for i in range(3):
        _enroll(reg, f"gw-{i}")
    sha = _bundle(reg, version=2)
    changes = reg.set_desired(sha, devices=["gw-0", "gw-1"])
    want = DesiredModel(2, sha)
    assert changes == [DesiredChange("gw-0", "digits", None, want),
                       DesiredChange("gw-1", "digits", None, want)]
    assert reg.set_desired(sha, devices=["gw-0"]) == []  # already there: no change
    assert [d.id for d in reg.unconverged()] == ["gw-0", "gw-1"]
    clock.now += 1
    device = reg.set_reported("gw-0", _report(sha, 2, "probation"))
    assert (device.online, device.last_seen, device.reported_at) == (True, clock.now,
                                                                      clock.now)
    assert device.reported["installs"] == [{"id": "i1", "state": "probation"}]
    assert not device.converged
    assert reg.set_reported("gw-0", _report(sha, 2)).converged
    assert reg.set_reported("gw-1", _report("f" * 64, 2)).converged is False
    assert [d.id for d in reg.unconverged()] == ["gw-1"]
    assert [d.id for d in reg.unconverged(group="elsewhere")] == []
    stored = reg.get_device("gw-0")
    assert stored is not None
    assert stored.desired_json() == {"digits": {"version": 2, "bundle_sha256": sha}}
    with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
        reg.set_reported("gw-9", {})
    with pytest.raises(RegistryError, match="reported state is not JSON-serialisable"):
        reg.set_reported("gw-0", {"x": {1, 2}})


@pytest.mark.parametrize(("reported", "converged"), [
    ({}, False),
    ({"models": {"digits": {"version": 2}}}, True),
    ({"models": {"digits": {"version": 1}}}, False),
    ({"models": {"digits": {"version": "2"}}}, False),
    ({"models": {"digits": {"version": 2, "state": "failed", "reason": "BadSignature"}}},
     False),
    ({"models": {"digits": {"version": 2, "bundle_sha256": "a" * 64}}}, True),
    ({"models": {"digits": {"version": 2, "bundle_sha256": "b" * 64}}}, False),
    ({"models": {"digits": {"version": 2}, "extra": {"version": 9}}}, True),
    ({"models": "garbage"}, False),
])
def test_is_converged(reported: dict[str, Any], converged: bool) -> None:
    assert is_converged({"digits": DesiredModel(2, "a" * 64)}, reported) is converged
    assert is_converged({}, reported)


def test_group_rollout_then_rollback_restores_previous(reg: Registry) -> None:
    for i in range(3):
        _enroll(reg, f"gw-{i}", "lab")
    _enroll(reg, "cam-0", "field")
    v1, v2, other = _bundle(reg, version=1), _bundle(reg, version=2), _bundle(reg, "vit", 1)
    reg.set_desired(v1, group="lab")
    reg.set_desired(other, devices=["gw-0"])
    assert len(reg.set_desired(v2, group="lab")) == 3

    def digits() -> dict[str, int | None]:
        return {d.id: d.desired["digits"].version if "digits" in d.desired else None
                for d in reg.list_devices()}

    assert digits() == {"cam-0": None, "gw-0": 2, "gw-1": 2, "gw-2": 2}
    restored = reg.rollback(group="lab", model="digits")
    assert [(c.device, c.before, c.after) for c in restored] == [
        (f"gw-{i}", DesiredModel(2, v2), DesiredModel(1, v1)) for i in range(3)]
    assert digits() == {"cam-0": None, "gw-0": 1, "gw-1": 1, "gw-2": 1}
    gw0 = reg.get_device("gw-0")
    assert gw0 is not None
    assert gw0.desired["vit"] == DesiredModel(1, other)  # the other model is untouched
    # Without a model, each device's last change is undone: vit on gw-0, digits elsewhere.
    undone = reg.rollback(group="lab")
    assert [(c.device, c.model, c.after) for c in undone] == [
        ("gw-0", "vit", None), ("gw-1", "digits", None), ("gw-2", "digits", None)]
    assert digits() == {"cam-0": None, "gw-0": 1, "gw-1": None, "gw-2": None}
    assert reg.rollback(devices=["gw-0"])[0].after is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback(group="lab")
    kinds = _kinds(reg, "gw-0")
    assert kinds.count("desired.set") == 3
    assert kinds.count("desired.rolled_back") == 3


def test_clear_desired_and_roll_it_back(reg: Registry) -> None:
    _enroll(reg, "gw-0")
    sha = _bundle(reg)
    reg.set_desired(sha, devices=["gw-0"])
    assert [c.after for c in reg.clear_desired("digits", devices=["gw-0"])] == [None]
    assert reg.clear_desired("digits", devices=["gw-0"]) == []
    assert reg.rollback(devices=["gw-0"], model="digits")[0].after == DesiredModel(1, sha)


def test_desired_changes_refuse_bad_targets_and_change_nothing(reg: Registry) -> None:
    _enroll(reg, "gw-0")
    sha = _bundle(reg)
    with pytest.raises(RegistryError, match=r"unknown device\(s\): gw-8, gw-9; enroll"):
        reg.set_desired(sha, devices=["gw-0", "gw-9", "gw-8"])
    with pytest.raises(RegistryError, match="group 'nowhere' has no devices"):
        reg.set_desired(sha, group="nowhere")
    with pytest.raises(RegistryError, match="either by a list of ids or by a group"):
        reg.set_desired(sha)
    with pytest.raises(RegistryError, match="either by a list of ids or by a group"):
        reg.set_desired(sha, devices=["gw-0"], group="lab")
    with pytest.raises(RegistryError, match="devices must be a list of ids"):
        reg.set_desired(sha, devices="gw-0")
    with pytest.raises(RegistryError, match="no stored bundle has sha256"):
        reg.set_desired("0" * 64, devices=["gw-0"])
    with pytest.raises(RegistryError, match="nothing to roll back: model 'digits' of"):
        reg.rollback(devices=["gw-0"], model="digits")
    device = reg.get_device("gw-0")
    assert device is not None
    assert dict(device.desired) == {}


def test_set_desired_on_many_devices(reg: Registry) -> None:
    """More devices than one IN (...) chunk."""
    with reg._tx(write=True) as tx:  # white-box bulk insert: 1,200 enrollments one by one
        tx.many("INSERT INTO devices (id, group_name, profile, cert_fingerprint, enrolled_at, "
                "online, desired, reported) VALUES (?, 'lab', 'p', ?, 0, ?, '{}', '{}')",
                [(f"gw-{i:04}", FINGERPRINT, False) for i in range(1200)])
    sha = _bundle(reg)
    ids = [f"gw-{i:04}" for i in range(1200)]
    assert len(reg.set_desired(sha, devices=ids)) == 1200
    assert len(reg.unconverged(group="lab")) == 1200
    assert len(reg.rollback(group="lab")) == 1200


# --- events and telemetry -----------------------------------------------------------------

def test_events_order_since_id_device_and_limit(reg: Registry, clock: Clock) -> None:
    ids = []
    for i in range(5):
        clock.now += 1
        ids.append(reg.add_event("agent.install", device=f"gw-{i % 2}",
                                 detail={"n": i, "reason": None}))
    assert ids == sorted(ids)
    events = reg.events()
    assert [e.detail["n"] for e in events] == [0, 1, 2, 3, 4]
    assert events[0].at == clock.now - 4
    assert [e.detail["n"] for e in reg.events(ids[2])] == [3, 4]
    assert [e.detail["n"] for e in reg.events(device="gw-1")] == [1, 3]
    assert [e.id for e in reg.events(ids[0], limit=2)] == ids[1:3]
    assert reg.events(ids[-1]) == []
    assert reg.add_event("fleet.note") > ids[-1]
    assert reg.events(ids[-1])[0].device is None
    with pytest.raises(RegistryError, match="limit must be at least 1"):
        reg.events(limit=0)
    with pytest.raises(RegistryError, match="event detail is not JSON-serialisable"):
        reg.add_event("x", detail={"nan": float("nan")})


def test_an_event_a_device_numbered_is_stored_once(reg: Registry) -> None:
    first = reg.add_event("install.staged", device="gw-0", detail={"n": 1}, seq=5)
    assert first > 0
    assert reg.add_event("install.staged", device="gw-0", detail={"n": 2}, seq=5) == 0
    assert reg.add_event("install.staged", device="gw-1", seq=5) > first  # per device
    assert reg.add_event("install.staged", device="gw-0", seq=6) > first
    assert [(e.device, e.detail) for e in reg.events()] == [
        ("gw-0", {"n": 1}), ("gw-1", {}), ("gw-0", {})]


def test_telemetry_insert_is_idempotent(reg: Registry, clock: Clock) -> None:
    _enroll(reg, "gw-0")
    _enroll(reg, "gw-1")
    batch = [TelemetrySample(seq, 1000.0 + seq, {"cpu": seq / 10}) for seq in (1, 2, 3)]
    assert reg.add_telemetry("gw-0", batch) == 3
    assert reg.add_telemetry("gw-0", batch) == 0  # the same buffered batch re-sent
    more = [*batch[1:], TelemetrySample(4, 1004.0, {"cpu": 0.4})]
    assert reg.add_telemetry("gw-0", more) == 1
    assert reg.add_telemetry("gw-1", batch[:1]) == 1  # seq is per device
    assert [t.seq for t in reg.telemetry("gw-0")] == [1, 2, 3, 4]
    assert [t.seq for t in reg.telemetry("gw-0", since_seq=2, limit=1)] == [3]
    latest = reg.latest_telemetry()
    assert {d: (t.seq, dict(t.payload)) for d, t in latest.items()} == {
        "gw-0": (4, {"cpu": 0.4}), "gw-1": (1, {"cpu": 0.1})}
    assert list(reg.latest_telemetry(group="elsewhere")) == []
    device = reg.get_device("gw-0")
    assert device is not None
    assert (device.online, device.last_seen) == (True, clock.now)
    assert reg.prune_telemetry(before=1002.5) == 3
    assert [t.seq for t in reg.telemetry("gw-0")] == [3, 4]
    with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
        reg.add_telemetry("gw-9", batch)


def test_one_registry_shared_by_threads(reg: Registry) -> None:
    """The server's HTTP and MQTT threads share one Registry."""
    for i in range(4):
        _enroll(reg, f"gw-{i}")

    def work(i: int) -> None:
        for seq in range(25):
            reg.add_telemetry(f"gw-{i}", [TelemetrySample(seq, float(seq), {})])
            reg.add_event("tick", device=f"gw-{i}")
            reg.list_devices()

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert {d: t.seq for d, t in reg.latest_telemetry().items()} == {
        f"gw-{i}": 24 for i in range(4)}
    assert _kinds(reg).count("tick") == 100


# --- batches ------------------------------------------------------------------------------

def _model_report(version: int) -> dict[str, Any]:
    return {"models": {"digits": {"version": version, "state": "committed"}}}


def test_batch_commits_its_calls_together(opener: Callable[[], Registry]) -> None:
    """The fleet service stores a burst of device messages as one transaction."""
    reg, other = opener(), opener()  # other: a second connection, as another process
    for i in range(3):
        _enroll(reg, f"gw-{i}")
    with reg.batch():
        for i in range(3):
            reg.set_reported(f"gw-{i}", _model_report(i))
            reg.add_event("install.committed", device=f"gw-{i}")
        assert reg.get_device("gw-2").reported == _model_report(2)  # type: ignore[union-attr]
        # Not committed yet: another connection still sees the state before the batch.
        assert all(not d.reported for d in other.list_devices())
    assert [d.reported for d in other.list_devices()] == [_model_report(i) for i in range(3)]
    assert _kinds(other).count("install.committed") == 3


def test_a_refused_call_in_a_batch_changes_nothing_and_the_batch_goes_on(
        reg: Registry) -> None:
    _enroll(reg, "gw-1")
    with reg.batch():
        with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
            reg.set_reported("gw-9", _model_report(1))
        # Refused half-way: the group was already changed when the tags were found bad.
        with pytest.raises(RegistryError, match="tag"):
            reg.update_device("gw-1", group="field", tags=["bad\ntag"])
        reg.set_reported("gw-1", _model_report(1))
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.group, device.reported) == ("lab", _model_report(1))
    assert "device.updated" not in _kinds(reg)


def test_a_batch_that_raises_is_undone_whole(reg: Registry) -> None:
    _enroll(reg, "gw-1")
    events = len(reg.events())
    class DatabaseFailed(Exception):
        pass

    def store_then_fail() -> None:
        with reg.batch():
            reg.set_reported("gw-1", _model_report(1))
            reg.add_event("install.committed", device="gw-1")
            raise DatabaseFailed

    with pytest.raises(DatabaseFailed):
        store_then_fail()
    assert reg.get_device("gw-1").reported == {}  # type: ignore[union-attr]
    assert len(reg.events()) == events
    reg.set_reported("gw-1", _model_report(2))  # the registry is usable afterwards
    assert reg.get_device("gw-1").reported == _model_report(2)  # type: ignore[union-attr]


def test_other_threads_wait_for_a_batch_and_batches_do_not_nest(reg: Registry) -> None:
    _enroll(reg, "gw-1")
    seen: list[Any] = []
    reader = threading.Thread(
        target=lambda: seen.append(reg.get_device("gw-1").reported))  # type: ignore[union-attr]
    with reg.batch():
        reg.set_reported("gw-1", _model_report(1))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive()  # waiting for the batch, not reading half of it
        with pytest.raises(RuntimeError, match="does not nest"), reg.batch():
            pass
    reader.join(5)
    assert seen == [_model_report(1)]


# --- restart, opening, closing ------------------------------------------------------------

def test_restart_keeps_all_state(opener: Callable[[], Registry]) -> None:
    reg = opener()
    _enroll(reg, "gw-0", "lab", ("canary",))
    _enroll(reg, "gw-1", "lab")
    token = reg.issue_token("lab", ttl=DAY)
    used = reg.issue_token("lab", ttl=DAY)
    reg.redeem_token(used, "gw-1")
    v1, v2 = _bundle(reg, version=1), _bundle(reg, version=2)
    reg.set_desired(v1, group="lab")
    reg.set_desired(v2, group="lab")
    reg.set_reported("gw-0", _report(v2, 2))
    reg.add_telemetry("gw-0", [TelemetrySample(1, 1.0, {"cpu": 0.5})])
    reg.add_event("note", detail={"k": [1, 2]})
    before = (reg.list_devices(), reg.list_bundles(), reg.events(), reg.latest_telemetry())
    reg.close()

    again = opener()
    assert (again.list_devices(), again.list_bundles(), again.events(),
            again.latest_telemetry()) == before
    assert again.redeem_token(token, "gw-2") == "lab"
    with pytest.raises(RegistryError, match="already used by device 'gw-1'"):
        again.redeem_token(used, "gw-3")
    assert again.add_telemetry("gw-0", [TelemetrySample(1, 1.0, {"cpu": 0.5})]) == 0
    assert again.rollback(group="lab")[0].after == DesiredModel(1, v1)  # history survived
    assert again.add_event("later") > before[2][-1].id


def test_closed_registry_refuses_calls(reg: Registry) -> None:
    reg.close()
    reg.close()
    with pytest.raises(RegistryError, match="the registry is closed; open it again"):
        reg.list_devices()


def test_newer_schema_is_refused(opener: Callable[[], Registry]) -> None:
    reg = opener()
    with reg._tx(write=True) as tx:
        tx.run("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    reg.close()
    with pytest.raises(RegistryError, match=f"schema v{SCHEMA_VERSION + 1}, newer.*upgrade"):
        opener()


@pytest.mark.parametrize("form", ["plain", "path", "relative-url"])
def test_sqlite_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    monkeypatch.chdir(tmp_path)
    urls: dict[str, str | Path] = {"plain": "state/fleet.db", "path": Path("state/fleet.db"),
                                   "relative-url": "sqlite:///state/fleet.db"}
    url = urls[form]
    with open_registry(url) as reg:
        _enroll(reg, "gw-0")
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


def test_unreachable_postgres_names_the_url_without_password() -> None:
    expected = (r"cannot connect to postgresql://fleet:\*\*\*@127\.0\.0\.1:1/fleet"
                r"\?connect_timeout=2 \(connection failed: [^\n]*\); check that PostgreSQL")
    with pytest.raises(RegistryError, match=expected):
        open_registry("postgresql://fleet:s3cret@127.0.0.1:1/fleet?connect_timeout=2")


@pytest.mark.integration
def test_postgres_reconnects_after_losing_its_connection() -> None:
    name = f"edgefleet-test-{secrets.token_hex(4)}"  # kill this registry's session only
    with (postgres_schema() as (url, admin),
          open_registry(f"{url}&application_name={name}") as reg):
        _enroll(reg, "gw-0")
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s", (name,)).fetchall()
        assert killed == [(True,)]
        with pytest.raises(psycopg.OperationalError):  # the call that finds it dead fails
            reg.list_devices()
        assert [d.id for d in reg.list_devices()] == ["gw-0"]  # and the next one reconnects


# --- property: desired-state changes and rollbacks behave like a stack --------------------

_MODELS = ("a", "b")
_TARGETS = st.one_of(st.just("group"), st.sampled_from([0, 1, 2]))
_OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_MODELS), st.integers(1, 3), _TARGETS),
    st.tuples(st.just("clear"), st.sampled_from(_MODELS), st.just(0), _TARGETS),
    st.tuples(st.just("rollback"), st.sampled_from((*_MODELS, None)), st.just(0), _TARGETS),
), max_size=12)


class _Model:
    """The specification: per device, a desired dict and a stack of (model, previous)."""

    def __init__(self, devices: list[str]) -> None:
        self.desired: dict[str, dict[str, DesiredModel]] = {d: {} for d in devices}
        self.history: dict[str, list[tuple[str, DesiredModel | None]]] = {
            d: [] for d in devices}

    def change(self, devices: list[str], model: str,
               after: DesiredModel | None) -> list[DesiredChange]:
        changes = []
        for d in devices:
            before = self.desired[d].get(model)
            if before != after:
                self.history[d].append((model, before))
                self._put(d, model, after)
                changes.append(DesiredChange(d, model, before, after))
        return changes

    def rollback(self, devices: list[str], model: str | None) -> list[DesiredChange]:
        changes = []
        for d in devices:
            stack = self.history[d]
            at = next((i for i in reversed(range(len(stack)))
                       if model is None or stack[i][0] == model), None)
            if at is None:
                continue
            entry_model, previous = stack.pop(at)
            changes.append(DesiredChange(d, entry_model, self.desired[d].get(entry_model),
                                         previous))
            self._put(d, entry_model, previous)
        return changes

    def _put(self, device: str, model: str, value: DesiredModel | None) -> None:
        if value is None:
            self.desired[device].pop(model, None)
        else:
            self.desired[device][model] = value


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_desired_and_rollback_follow_the_stack_model(
        reg: Registry, ops: list[tuple[str, str | None, int, str | int]]) -> None:
    # One registry for every example: each example works on devices of its own.
    prefix = secrets.token_hex(4)
    devices = [f"{prefix}-{i}" for i in range(3)]
    group = f"g-{prefix}"
    for i, d in enumerate(devices):
        _enroll(reg, d, group if i < 2 else f"other-{prefix}")
    shas = {(m, v): _bundle(reg, m, v) for m in _MODELS for v in (1, 2, 3)}
    spec = _Model(devices)
    for op, model, version, target in ops:
        selected = devices[:2] if target == "group" else [devices[int(target)]]
        where: dict[str, Any] = ({"group": group} if target == "group"
                                 else {"devices": selected})
        if op == "set":
            assert model is not None
            sha = shas[(model, version)]
            got = reg.set_desired(sha, **where)
            assert got == spec.change(selected, model, DesiredModel(version, sha))
        elif op == "clear":
            assert model is not None
            assert reg.clear_desired(model, **where) == spec.change(selected, model, None)
        else:
            expected = spec.rollback(selected, model)
            if expected:
                assert reg.rollback(model=model, **where) == expected
            else:
                with pytest.raises(RegistryError, match="nothing to roll back"):
                    reg.rollback(model=model, **where)
        for d in devices:
            device = reg.get_device(d)
            assert device is not None
            assert dict(device.desired) == spec.desired[d]


# --- schema v2: take-over rule, device keys and resets, release versions (issue 9) --------

KEY = "A" * 43 + "="  # base64 of 32 bytes


def _enroll_with(reg: Registry, token: str, device_id: str,
                 fingerprint: str = FINGERPRINT) -> Enrolled:
    return reg.enroll_device(token, device_id, profile="x86_64-avx2",
                             cert_fingerprint=fingerprint, encryption_key=KEY)


def test_a_group_token_cannot_take_over_an_enrolled_device(reg: Registry) -> None:
    first = _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    assert (first.device.group, first.device.encryption_key) == ("lab", KEY)
    assert first.replaced_fingerprint is None
    guest = reg.issue_token("guest", DAY)
    with pytest.raises(RegistryError, match=r"device 'gw-b' is enrolled already.*"
                       r"fleet enroll-token --device gw-b.*fleet device reset gw-b"):
        _enroll_with(reg, guest, "gw-b", "cd" * 32)
    device = reg.get_device("gw-b")
    assert device is not None
    assert (device.group, device.cert_fingerprint) == ("lab", FINGERPRINT)
    assert _enroll_with(reg, guest, "gw-c").device.group == "guest"  # the token survived


def test_a_token_for_the_device_re_enrolls_it_and_names_the_old_certificate(
        reg: Registry) -> None:
    _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    reg.set_desired(reg.put_bundle(b"v1", "digits", 1).sha256, devices=["gw-b"])
    bound = reg.issue_token("lab", DAY, device="gw-b")
    with pytest.raises(RegistryError, match="issued for device 'gw-b', not 'gw-c'"):
        _enroll_with(reg, bound, "gw-c")
    again = _enroll_with(reg, bound, "gw-b", "cd" * 32)
    assert again.replaced_fingerprint == FINGERPRINT
    assert again.device.cert_fingerprint == "cd" * 32
    assert again.device.desired["digits"].version == 1  # a re-imaged device gets it back


def test_after_a_reset_any_token_may_enroll_the_id(reg: Registry, clock: Clock) -> None:
    _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    reset = reg.reset_device("gw-b")
    assert reset.cert_fingerprint == FINGERPRINT
    assert reset.reset_at == clock.now
    again = _enroll_with(reg, reg.issue_token("field", DAY), "gw-b", "cd" * 32)
    assert again.replaced_fingerprint is None  # revoked by the reset already
    assert (again.device.group, again.device.reset_at) == ("field", None)
    with pytest.raises(RegistryError, match="unknown device"):
        reg.reset_device("gw-9")
    kinds = [e.kind for e in reg.events(device="gw-b")]
    assert "device.reset" in kinds


def test_encryption_keys_must_be_x25519_public_keys(reg: Registry) -> None:
    token = reg.issue_token("lab", DAY)
    with pytest.raises(RegistryError, match="X25519 public key"):
        reg.enroll_device(token, "gw-1", profile="p", cert_fingerprint=FINGERPRINT,
                          encryption_key="not base64")
    assert reg.enroll_device(token, "gw-1", profile="p", cert_fingerprint=FINGERPRINT
                             ).device.encryption_key is None


def test_bundles_record_metadata_versions_and_rollback_of(reg: Registry) -> None:
    assert reg.release_versions("digits") == (0, 0)
    reg.put_bundle(b"v1", "digits", 1, metadata_version=4)
    reg.put_bundle(b"s1", "speech", 7, metadata_version=9)
    v3 = reg.put_bundle(b"v3", "digits", 3, metadata_version=10, rollback_of=1)
    assert (v3.metadata_version, v3.rollback_of) == (10, 1)
    assert reg.get_bundle(v3.sha256) == v3
    assert reg.release_versions("digits") == (3, 10)
    assert reg.release_versions("speech") == (7, 10)


def test_rollback_dry_run_and_substitute(reg: Registry) -> None:
    _enroll(reg, "gw-1")
    v1, v2 = reg.put_bundle(b"v1", "digits", 1), reg.put_bundle(b"v2", "digits", 2)
    reg.set_desired(v1.sha256, group="lab")
    reg.set_desired(v2.sha256, group="lab")
    plan = reg.rollback(group="lab", dry_run=True)
    assert [(c.before, c.after) for c in plan] == [
        (DesiredModel(2, v2.sha256), DesiredModel(1, v1.sha256))]
    device = reg.get_device("gw-1")
    assert device is not None
    assert device.desired["digits"].version == 2  # nothing changed
    v3 = reg.put_bundle(b"v3", "digits", 3, rollback_of=1)
    with pytest.raises(RegistryError, match="changed while the rollback was prepared"):
        reg.rollback(group="lab", substitute={})
    changes = reg.rollback(group="lab", substitute={v1.sha256: DesiredModel(3, v3.sha256)})
    assert [c.after for c in changes] == [DesiredModel(3, v3.sha256)]
    assert reg.was_desired("gw-1", v3.sha256)
    assert [c.after for c in reg.rollback(group="lab")] == [None]  # twice: two changes


def test_a_v1_database_is_upgraded_to_v2(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:  # what schema v1 created
        for statement in _V1_TABLES:
            old.execute(statement)
        old.execute("INSERT INTO schema_version (version) VALUES (1)")
        old.execute("INSERT INTO bundles VALUES ('" + "0" * 64 + "', 'digits', 1, 2, 'x', 0)")
    old.close()
    with open_registry(path) as reg:
        [bundle] = reg.list_bundles()
        assert (bundle.metadata_version, bundle.rollback_of) == (0, None)
        token = reg.issue_token("lab", DAY, device="gw-1")
        assert _enroll_with(reg, token, "gw-1").device.encryption_key == KEY
    with sqlite3.connect(path) as upgraded:
        assert upgraded.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    upgraded.close()


_V1_TABLES = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE devices (id TEXT PRIMARY KEY, group_name TEXT NOT NULL, profile TEXT NOT "
    "NULL, cert_fingerprint TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL, last_seen "
    "DOUBLE PRECISION, online BOOLEAN NOT NULL, desired TEXT NOT NULL, reported TEXT NOT "
    "NULL, reported_at DOUBLE PRECISION)",
    "CREATE TABLE enrollment_tokens (token_sha256 TEXT PRIMARY KEY, group_name TEXT NOT "
    "NULL, created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
    "used_at DOUBLE PRECISION, used_by TEXT)",
    "CREATE TABLE bundles (sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version BIGINT NOT "
    "NULL, size BIGINT NOT NULL, path TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
    "UNIQUE (name, version))",
)

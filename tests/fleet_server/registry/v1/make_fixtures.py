"""Make the schema-v1 fixtures with the v1 registry code itself (run once; outputs committed).

    .venv/bin/python tests/fleet_server/registry/v1/make_fixtures.py

Runs the registry of commit ``benchmarks.registry_v1.V1_COMMIT`` (loaded from git) through a
small fleet's life, on SQLite and on PostgreSQL (the local server, or
EDGEFLEET_TEST_POSTGRES_URL), and writes beside this file:

- ``registry_v1.sqlite``: the SQLite database as v1 left it;
- ``registry_v1.postgres.sql``: ``pg_dump --inserts`` of the PostgreSQL schema, with the
  schema name removed so it loads into any schema (the one on the connection's search_path);
- ``expected.json``: what the v1 code answered, before and after a few more operations made
  on a copy, so the upgrade test can ask the new code the same and compare.

Both databases get the same calls at the same (fake) times, and the script checks that v1
answered the same on both before it writes anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from registry_v1 import V1_COMMIT, load_v1_registry  # noqa: E402 - a script beside the benchmark

from tests.postgres import PG_URL, with_search_path  # noqa: E402

T0 = 1_800_000_000.0
#: Where v1 wrote the bundle files (paths recorded in the bundles table).
BLOB_DIR = Path("/tmp/edgefleet-v1-fixture/bundles")
_SCHEMA = "registry_v1_fixture"
FINGERPRINT = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _report(models: dict[str, tuple[int, str, str]]) -> dict[str, Any]:
    """A report as the v1 service stored it: the JSON of a protocol ``reported`` message."""
    return {"protocol": 1, "profile": "x86_64-avx2", "agent_version": "0.1.0", "at": T0,
            "models": {name: {"version": v, "bundle_sha256": sha, "state": state}
                       for name, (v, sha, state) in models.items()},
            "installs": {name: {"version": v, "bundle_sha256": sha, "state": state,
                                "reason": None, "detail": None, "progress": None}
                         for name, (v, sha, state) in models.items()}}


def populate(reg: Any, clock: Clock) -> dict[str, Any]:
    """A fleet's life on the v1 registry; returns what the test needs to know (tokens)."""
    used = reg.issue_token("lab", 86400)
    open_token = reg.issue_token("lab", 10 * 365 * 86400.0)
    reg.issue_token("field", 60)
    clock.now += 1
    assert reg.redeem_token(used, "gw-1") == "lab"
    for device, group, tags in [("gw-0", "lab", ["canary", "eu"]), ("gw-1", "lab", ["eu"]),
                                ("gw-2", "lab", []), ("cam-0", "field", [])]:
        reg.upsert_device(device, group=group, profile="x86_64-avx2",
                          cert_fingerprint=FINGERPRINT, tags=tags)
    clock.now += 1
    d1 = reg.put_bundle(b"digits v1 " * 100, "digits", 1).sha256
    d2 = reg.put_bundle(b"digits v2 " * 120, "digits", 2).sha256
    vit = reg.put_bundle(b"vit v1 " * 50, "vit", 1).sha256
    clock.now += 1
    reg.set_desired(d1, group="lab")
    clock.now += 1
    reg.set_desired(d2, group="lab")
    reg.set_desired(vit, devices=["gw-0"])
    clock.now += 1
    reg.rollback(devices=["gw-2"])  # gw-2 back to digits v1
    reg.clear_desired("digits", devices=["gw-1"])
    reg.rollback(devices=["gw-1"])  # and back again: gw-1 at digits v2
    clock.now += 1
    reg.set_reported("gw-0", _report({"digits": (2, d2, "committed"),
                                      "vit": (1, vit, "committed")}))
    reg.set_reported("gw-1", _report({"digits": (2, d2, "probation")}))
    reg.set_reported("gw-2", _report({"digits": (1, d1, "committed")}))
    reg.set_reported("cam-0", {"models": "garbage"})  # v1 stored any object it was given
    reg.set_online("gw-1", False)
    # As the v1 service stored a device's own event: under the device's kind, with
    # device_at. v1's was_desired took it for the server's: gw-1 could fetch vit.
    reg.add_event("desired.set", device="gw-1",
                  detail={"model": "vit", "before": None, "device_at": T0,
                          "after": {"version": 1, "bundle_sha256": vit}})
    reg.add_telemetry("gw-0", [_sample(1, T0 + 1, {"cpu": 0.5}),
                               _sample(2, T0 + 2, {"cpu": 0.25}),
                               _sample(3, T0 + 3, {"cpu": 0.125})])
    reg.add_event("note", detail={"k": [1, 2]})
    return {"open_token": open_token, "bundles": {"d1": d1, "d2": d2, "vit": vit}}


def _sample(seq: int, at: float, payload: dict[str, Any]) -> Any:
    return load_v1_registry().TelemetrySample(seq, at, payload)


def answers(reg: Any) -> dict[str, Any]:
    """What v1 answers about everything stored."""
    devices = reg.list_devices()
    return {
        "devices": [{
            "id": d.id, "group": d.group, "tags": list(d.tags), "profile": d.profile,
            "cert_fingerprint": d.cert_fingerprint, "enrolled_at": d.enrolled_at,
            "last_seen": d.last_seen, "online": d.online, "desired": d.desired_json(),
            "reported": dict(d.reported), "reported_at": d.reported_at,
            "converged": d.converged} for d in devices],
        "bundles": [{"sha256": b.sha256, "name": b.name, "version": b.version, "size": b.size,
                     "path": str(b.path), "created_at": b.created_at}
                    for b in reg.list_bundles()],
        "events": [{"id": e.id, "at": e.at, "device": e.device, "kind": e.kind,
                    "detail": dict(e.detail)} for e in reg.events(limit=10_000)],
        "telemetry": [{"device": t.device, "seq": t.seq, "at": t.at, "payload": t.payload}
                      for d in devices for t in reg.telemetry(d.id)],
        "was_desired": {f"{d.id} {b.sha256}": reg.was_desired(d.id, b.sha256)
                        for d in devices for b in reg.list_bundles()},
    }


def operate(reg: Any, clock: Clock, facts: dict[str, Any]) -> dict[str, Any]:
    """More v1 operations on the stored state, and their results."""
    clock.now = T0 + 100
    opened = reg.redeem_token(facts["open_token"], "gw-9")
    rolled = reg.rollback(group="lab", model="digits")
    try:
        reg.redeem_token(facts["open_token"], "gw-0")
        used_again = None
    except Exception as exc:
        used_again = str(exc)
    return {
        "redeem_open_token": opened,
        "rollback_lab_digits": [
            {"device": c.device, "model": c.model,
             "before": None if c.before is None else c.before.to_json(),
             "after": None if c.after is None else c.after.to_json()} for c in rolled],
        "desired_after": {d.id: d.desired_json() for d in reg.list_devices()},
        "redeem_open_token_again": used_again,
        "telemetry_resend_new": reg.add_telemetry("gw-0", [_sample(3, T0 + 3, {})]),
        "telemetry_next_new": reg.add_telemetry("gw-0", [_sample(4, T0 + 4, {})]),
    }


class _Tokens:
    """Stands in for the v1 module's ``secrets``: the same tokens on every run."""

    def __init__(self) -> None:
        self.issued = 0

    def token_urlsafe(self, nbytes: int) -> str:
        self.issued += 1
        digest = hashlib.sha256(f"v1 fixture token {self.issued}".encode()).digest()[:nbytes]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def run(url: str, blob_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    v1 = load_v1_registry()
    v1.secrets = _Tokens()  # type: ignore[attr-defined]
    clock = Clock()
    with v1.open_registry(url, blob_dir=blob_dir, clock=clock) as reg:
        facts = populate(reg, clock)
        return facts, answers(reg)


def main() -> None:
    v1 = load_v1_registry()
    shutil.rmtree(BLOB_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "registry_v1.sqlite"
        facts, before = run(str(db), BLOB_DIR)
        (HERE / "registry_v1.sqlite").write_bytes(db.read_bytes())
        # The operations run on a copy: the fixture is the state before them.
        clock = Clock()
        with v1.open_registry(str(db), blob_dir=BLOB_DIR, clock=clock) as reg:
            after = operate(reg, clock, facts)

    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {_SCHEMA} CASCADE")
        admin.execute(f"CREATE SCHEMA {_SCHEMA}")
        try:
            pg_facts, pg_before = run(with_search_path(PG_URL, _SCHEMA), BLOB_DIR)
            dump = subprocess.run(["pg_dump", "--inserts", "--no-owner", "--no-privileges",
                                   "--schema", _SCHEMA, PG_URL], capture_output=True,
                                  text=True, check=True).stdout
        finally:
            admin.execute(f"DROP SCHEMA {_SCHEMA} CASCADE")
    # Same calls, same clock: v1 answered the same on both (the tokens are random).
    assert pg_facts["bundles"] == facts["bundles"]
    assert pg_before == before, "v1 answered differently on SQLite and PostgreSQL"
    (HERE / "registry_v1.postgres.sql").write_text(_portable(dump), encoding="utf-8")
    assert pg_facts == facts
    (HERE / "expected.json").write_text(json.dumps(
        {"made_by": f"fleet_server/registry.py at {V1_COMMIT}", "facts": facts,
         "before": before, "after": after}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote the fixtures in {HERE}")


def _portable(dump: str) -> str:
    """The dump without its schema: it loads into the search_path's first schema."""
    skip = ("--", "CREATE SCHEMA", "SELECT pg_catalog.set_config('search_path'", "\\restrict",
            "\\unrestrict")
    lines = [line for line in dump.splitlines() if not line.startswith(skip)]
    body = re.sub(rf"\b{_SCHEMA}\.", "", "\n".join(lines))
    return ("-- pg_dump --inserts of a registry made by the v1 code (make_fixtures.py), without "
            "its schema's name\n" + re.sub(r"\n{3,}", "\n\n", body).strip() + "\n")


if __name__ == "__main__":
    main()

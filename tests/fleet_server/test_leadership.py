"""Leadership through a PostgreSQL advisory lock: one leader, and a take-over when its
session ends (a clean stop, or the session killed as a crash would)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from fleet_server.housekeeping import Housekeeping, Job
from fleet_server.leadership import AdvisoryLeadership, SoleLeadership, leadership_for, lock_key
from tests.postgres import PG_URL, postgres_schema

pytestmark = pytest.mark.integration


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_leader_and_a_take_over_when_it_stops_or_its_session_dies() -> None:
    fleet = f"f{time.monotonic_ns()}"  # a lock of this test's own
    changes: list[tuple[str, bool]] = []
    a = AdvisoryLeadership(PG_URL, fleet, interval_s=0.05,
                           on_change=lambda leader: changes.append(("a", leader)))
    b = AdvisoryLeadership(PG_URL, fleet, interval_s=0.05,
                           on_change=lambda leader: changes.append(("b", leader)))
    try:
        a.start()
        _wait(a.is_leader, "a to lead")
        b.start()
        time.sleep(0.5)
        assert not b.is_leader()
        a.stop()  # a clean stop hands over
        _wait(b.is_leader, "b to take over")
        assert changes == [("a", True), ("a", False), ("b", True)]
        a.start()
        time.sleep(0.3)
        assert not a.is_leader()
        # b's session dies as in a crash (the server terminates it): a takes over, and b,
        # at its next check, stops claiming.
        # pg_locks shows a bigint advisory key as two unsigned 32-bit halves (oids); a key
        # with its sign bit set does not fit one bigint comparison, so compare the halves.
        unsigned = lock_key(fleet, "public") & 0xFFFFFFFFFFFFFFFF
        with postgres_schema() as (_, admin):
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
                          "locktype = 'advisory' AND granted AND classid::bigint = %s "
                          "AND objid::bigint = %s", (unsigned >> 32, unsigned & 0xFFFFFFFF))
        _wait(a.is_leader, "a to take over")
        _wait(lambda: not b.is_leader(), "b to step down")
    finally:
        a.stop()
        b.stop()


def test_housekeeping_runs_only_on_the_leader() -> None:
    ran: list[float] = []
    job = Job("count", ran.append)
    follower = AdvisoryLeadership(PG_URL, "never-started")
    assert Housekeeping(follower, [job]).run_once() is False
    assert Housekeeping(SoleLeadership(), [job], clock=lambda: 5.0).run_once() is True
    assert ran == [5.0]


def test_sqlite_has_one_leader_postgresql_competes() -> None:
    assert isinstance(leadership_for(None, "f"), SoleLeadership)
    assert isinstance(leadership_for("sqlite:///x.db", "f"), SoleLeadership)
    assert isinstance(leadership_for(PG_URL, "f"), AdvisoryLeadership)

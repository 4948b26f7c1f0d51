"""The instance claim on a real PostgreSQL: one process per identity, the fleet's presence,
and the claim taken again after its database session ended (an outage)."""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import pytest

from fleet_server.errors import ServiceError
from fleet_server.instance_claim import InstanceClaim, application_name
from tests.postgres import postgres_schema

FLEET = "f1"
# Identities of their own: ending a claim's session goes by its connection's name, which
# other tests running at the same time (other schemas) must not share.
A, B = (f"fleet-server-{name}{secrets.token_hex(4)}" for name in "ab")


def _end_sessions(admin: psycopg.Connection[Any], identity: str) -> None:
    """What an outage does to a claim: its session is terminated and its locks freed."""
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                  "WHERE application_name = %s", (application_name(identity),))


def test_a_claim_lost_with_its_session_is_taken_again() -> None:
    with postgres_schema() as (url, admin):
        a = InstanceClaim.take(url, FLEET, A)
        b = InstanceClaim.take(url, FLEET, B)
        try:
            assert b.others_running() is True
            with pytest.raises(ServiceError, match=f"already runs as {A}"):
                InstanceClaim.take(url, FLEET, A)
            _end_sessions(admin, A)
            a.keep()  # the check every few seconds: the claim and the presence come back
            with pytest.raises(ServiceError, match=f"already runs as {A}"):
                InstanceClaim.take(url, FLEET, A)
            assert b.others_running() is True
            # others_running takes its own claim again first, rather than answer "none".
            _end_sessions(admin, B)
            assert b.others_running() is True
            a.release()
            assert b.others_running() is False
        finally:
            a.release()
            b.release()


def test_a_claim_another_process_took_meanwhile_is_not_taken_twice(
        caplog: pytest.LogCaptureFixture) -> None:
    with postgres_schema() as (url, admin):
        a = InstanceClaim.take(url, FLEET, A)
        _end_sessions(admin, A)
        other = InstanceClaim.take(url, FLEET, A)  # e.g. a restarted copy
        try:
            with caplog.at_level("ERROR", logger="fleet_server.instance_claim"):
                a.keep()
            assert "cannot be taken again" in caplog.text
            assert f"already runs as {A}" in caplog.text
        finally:
            a.release()
            other.release()

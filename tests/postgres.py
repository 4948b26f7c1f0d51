"""PostgreSQL for tests: a fresh schema per test on the machine's server.

CI has PostgreSQL (trust auth on 127.0.0.1:5432, database ``test``); set
EDGEFLEET_TEST_POSTGRES_URL to use another. An unreachable server fails the test rather than
skipping it: the suite must prove both registry backends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:5432/test")


def with_search_path(url: str, schema: str) -> str:
    """``url`` with its search_path set to ``schema``."""
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def postgres_schema() -> Iterator[tuple[str, psycopg.Connection[Any]]]:
    """A URL whose search_path is a fresh schema (dropped on exit), and an admin connection."""
    schema = f"t_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} ({exc}); start it or set "
                    "EDGEFLEET_TEST_POSTGRES_URL")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield with_search_path(PG_URL, schema), admin
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")

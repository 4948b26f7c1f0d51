"""Fixtures of the registry tests: a fake clock and registries on both databases.

Every test that takes ``reg`` or ``opener`` runs twice: on SQLite in a temporary file and on
PostgreSQL on this machine (``db_url``, tests/fleet_server/conftest.py), each in a fresh
schema. When PostgreSQL is not reachable those tests fail rather than skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet_server.registry import Registry, open_registry
from tests.fleet_server.registry.helpers import Clock


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

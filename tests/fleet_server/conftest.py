"""Fixtures of the fleet service, API and CLI tests (helpers: server_env.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bundle.signing import ArtifactInput
from fleet_server.service import FleetService, ServiceConfig
from tests.bundle.repo import Repo, spec
from tests.fleet_server.server_env import (
    protocol_bytes,
    service_config,
    write_keys,
)
from tests.mqtt_broker import Recorder
from tests.postgres import postgres_schema


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The registry URL for a test: SQLite in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    with postgres_schema() as (url, _):
        yield url


@pytest.fixture(scope="session")
def repo() -> Repo:
    """The fleet's signing keys (in memory); bundles built with it verify against its root."""
    return Repo()


@pytest.fixture(scope="session")
def bundles(repo: Repo) -> dict[str, bytes]:
    """Signed bundles: digits v1 and v2 (2 KB, 3 KB artifacts), and a big one of ~600 KB
    (several chunks)."""
    big = protocol_bytes(600_000)
    return {
        "v1": repo.build(spec("digits", 1)),
        "v2": repo.build(spec("digits", 2)),
        "big": repo.build(spec("speech", 1, artifacts=[
            ArtifactInput("model.onnx", big, "onnx", "fp32")])),
    }


@pytest.fixture
def config(tmp_path: Path, db_url: str, repo: Repo) -> ServiceConfig:
    """A service in tmp_path/server on the test's database, trusting ``repo``'s root."""
    return service_config(tmp_path / "server", write_keys(tmp_path / "keys", repo), db_url)


@pytest.fixture
def service(config: ServiceConfig) -> Iterator[FleetService]:
    """A started service (broker included), stopped after the test."""
    with FleetService(config) as started:
        yield started


@pytest.fixture
def clients() -> Iterator[list[Recorder]]:
    """Recorders to close at the end of the test (append them)."""
    made: list[Recorder] = []
    yield made
    for recorder in made:
        recorder.close()

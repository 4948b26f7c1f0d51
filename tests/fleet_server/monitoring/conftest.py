"""The registry tests' fixtures (a settable clock, registries on SQLite and PostgreSQL)."""

from __future__ import annotations

from tests.fleet_server.registry.conftest import clock, opener, reg

__all__ = ["clock", "opener", "reg"]

"""Schema v7: experiments (issue 15): A/B tests and bandits over a fleet's devices.

- ``experiments``: one row per experiment, by name (never reused); ``spec`` is its
  declaration as devices receive it (``experiments.spec.spec_to_json``), ``detail`` what
  only the server needs (each arm's bundle, the selection, the metric and alpha, the
  winner); ``version`` counts the deltas applied (the merged posterior's version).
- ``experiment_arms``: the merged posterior, per arm the sums of every applied delta.
- ``experiment_devices``: the devices taking part, each with the last of its delta numbers
  applied (``experiments.posterior.apply_delta``: a repeat is ignored, a gap refused).
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Add the tables."""
    for statement in (
        """CREATE TABLE IF NOT EXISTS experiments (
            name TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            version BIGINT NOT NULL,
            spec TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS experiments_status ON experiments (status, model)",
        """CREATE TABLE IF NOT EXISTS experiment_arms (
            experiment TEXT NOT NULL REFERENCES experiments (name),
            arm TEXT NOT NULL,
            n BIGINT NOT NULL,
            total DOUBLE PRECISION NOT NULL,
            total_sq DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (experiment, arm))""",
        """CREATE TABLE IF NOT EXISTS experiment_devices (
            experiment TEXT NOT NULL REFERENCES experiments (name),
            device TEXT NOT NULL,
            applied_seq BIGINT NOT NULL,
            PRIMARY KEY (experiment, device))""",
        "CREATE INDEX IF NOT EXISTS experiment_devices_device ON experiment_devices (device)",
    ):
        tx.run(statement)

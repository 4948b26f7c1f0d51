"""Experiments as stored: the declaration, the merged posterior's arm sums, and each
taking-part device's last applied delta number (schema v7).

A delta is applied by :func:`apply_delta` with the pure core's rule
(``experiments.posterior.apply_delta``): it reads the arm sums and the device's number with
row locks, applies, and writes back, inside the caller's transaction (the ingest batch that
stores the telemetry sample carrying it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.errors import InvalidExperimentData
from experiments.posterior import Delta, DeltaVerdict, FleetPosterior, Merged
from experiments.posterior import apply_delta as apply_to_posterior
from fleet_server.errors import RegistryError
from stats.bandit import ArmStats

from .database import Tx
from .values import check_label, dumps

__all__ = [
    "ExperimentRecord",
    "apply_delta",
    "arm_sums",
    "create_experiment",
    "declarations_of",
    "list_experiments",
    "load_experiment",
    "participants",
    "push_for",
    "set_status",
]

_COLUMNS = "name, model, status, created_at, updated_at, version, spec, detail"


@dataclass(frozen=True)
class ExperimentRecord:
    """A stored experiment: ``spec`` as devices get it, ``detail`` the server's own part."""

    name: str
    model: str
    status: str  # running | stopped | promoted
    created_at: float
    updated_at: float
    version: int
    spec: Mapping[str, Any]
    detail: Mapping[str, Any]


def _record(row: tuple[Any, ...]) -> ExperimentRecord:
    return ExperimentRecord(row[0], row[1], row[2], float(row[3]), float(row[4]), int(row[5]),
                            json.loads(row[6]), json.loads(row[7]))


def create_experiment(tx: Tx, record: ExperimentRecord, arms: Sequence[str],
                      devices: Sequence[str]) -> None:
    """Store a new experiment with empty arm sums and its devices at delta number 0.
    RegistryError if the name was ever used."""
    check_label("experiment name", record.name)
    if tx.one("SELECT 1 FROM experiments WHERE name = ?", (record.name,)) is not None:
        raise RegistryError(f"experiment {record.name} exists already (names are never "
                            "reused: choose another)")
    tx.run(f"INSERT INTO experiments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
           (record.name, record.model, record.status, record.created_at, record.updated_at,
            record.version, dumps(record.spec, "experiment spec"),
            dumps(record.detail, "experiment detail")))
    tx.many("INSERT INTO experiment_arms (experiment, arm, n, total, total_sq) "
            "VALUES (?, ?, 0, 0, 0)", [(record.name, arm) for arm in arms])
    tx.many("INSERT INTO experiment_devices (experiment, device, applied_seq) "
            "VALUES (?, ?, 0)", [(record.name, d) for d in devices])


def load_experiment(tx: Tx, name: str) -> ExperimentRecord | None:
    """The experiment, or None."""
    row = tx.one(f"SELECT {_COLUMNS} FROM experiments WHERE name = ?", (name,))
    return None if row is None else _record(row)


def list_experiments(tx: Tx, status: str | None, limit: int) -> list[ExperimentRecord]:
    """Experiments, newest first, optionally only those with ``status``."""
    where, params = ("WHERE status = ?", (status,)) if status else ("", ())
    rows = tx.all(f"SELECT {_COLUMNS} FROM experiments {where} "
                  "ORDER BY created_at DESC, name LIMIT ?", (*params, limit))
    return [_record(r) for r in rows]


def set_status(tx: Tx, name: str, status: str, now: float,
               detail: Mapping[str, Any]) -> None:
    """End (or otherwise move) an experiment, replacing its detail."""
    tx.run("UPDATE experiments SET status = ?, updated_at = ?, detail = ? WHERE name = ?",
           (status, now, dumps(detail, "experiment detail"), name))


def arm_sums(tx: Tx, name: str, *, lock: bool = False) -> dict[str, ArmStats]:
    """The merged posterior's arm sums."""
    rows = tx.all("SELECT arm, n, total, total_sq FROM experiment_arms WHERE experiment = ? "
                  "ORDER BY arm" + (tx.dialect.for_update if lock else ""), (name,))
    return {r[0]: ArmStats(int(r[1]), float(r[2]), float(r[3])) for r in rows}


def participants(tx: Tx, name: str) -> list[str]:
    """The devices taking part, sorted."""
    return [r[0] for r in tx.all("SELECT device FROM experiment_devices WHERE experiment = ? "
                                 "ORDER BY device", (name,))]


def declarations_of(tx: Tx, device: str) -> list[dict[str, Any]]:
    """The declarations of the running experiments ``device`` takes part in, by name."""
    rows = tx.all("SELECT e.spec FROM experiments e JOIN experiment_devices d "
                  "ON d.experiment = e.name WHERE d.device = ? AND e.status = 'running' "
                  "ORDER BY e.name", (device,))
    return [json.loads(r[0]) for r in rows]


def apply_delta(tx: Tx, delta: Delta) -> DeltaVerdict:
    """Apply a device's delta once (``experiments.posterior.apply_delta``'s rule).

    InvalidExperimentData for an experiment that is not running or a device not in it,
    or arms it does not have; OutOfOrderDelta for a gap. Nothing changes then."""
    row = tx.one("SELECT version, status FROM experiments WHERE name = ?"
                 + tx.dialect.for_update, (delta.experiment,))
    if row is None or row[1] != "running":
        raise InvalidExperimentData(f"experiment {delta.experiment!r} is not running; its "
                                    "deltas are not counted")
    seq = tx.one("SELECT applied_seq FROM experiment_devices WHERE experiment = ? AND "
                 "device = ?" + tx.dialect.for_update, (delta.experiment, delta.device))
    if seq is None:
        raise InvalidExperimentData(f"device {delta.device!r} does not take part in "
                                    f"experiment {delta.experiment!r}")
    state = FleetPosterior(delta.experiment, arm_sums(tx, delta.experiment, lock=True),
                           {delta.device: int(seq[0])}, int(row[0]))
    after, verdict = apply_to_posterior(state, delta)
    if verdict == "applied":
        tx.many("UPDATE experiment_arms SET n = ?, total = ?, total_sq = ? "
                "WHERE experiment = ? AND arm = ?",
                [(s.n, s.total, s.total_sq, delta.experiment, arm)
                 for arm, s in after.arms.items() if arm in delta.arms])
        tx.run("UPDATE experiment_devices SET applied_seq = ? WHERE experiment = ? AND "
               "device = ?", (delta.seq, delta.experiment, delta.device))
        tx.run("UPDATE experiments SET version = ? WHERE name = ?",
               (after.version, delta.experiment))
    return verdict


def push_for(tx: Tx, name: str, device: str) -> Merged | None:
    """The merged posterior to push to ``device``, or None if it does not take part."""
    row = tx.one("SELECT e.version, d.applied_seq FROM experiments e JOIN experiment_devices "
                 "d ON d.experiment = e.name WHERE e.name = ? AND d.device = ?",
                 (name, device))
    if row is None:
        return None
    return Merged(name, int(row[0]), arm_sums(tx, name), int(row[1]))

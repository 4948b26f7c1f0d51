"""Desired state: which stored bundle each device should run per model, and rollback.

Each change of one device's model pushes the previous value onto ``desired_history``;
rollback pops it. ``ever_desired`` remembers every bundle a device was ever asked to run:
the bundles the server lets it fetch. Rows of a selection are locked in id order, so two
concurrent changes of overlapping groups on PostgreSQL neither lose an update nor deadlock.

What the desired-state messages of many devices are made of is read set-based
(:func:`desired_states_of`, :func:`desired_states_page`): three queries for a page of
devices, not a few per device, so publishing to 10,000 devices is a few dozen queries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.errors import RegistryError
from protocol.messages import DesiredModel, ModelReport

from .bundles import require_bundle
from .database import Tx
from .devices import desired_by_device
from .events import EVENT_INSERT
from .records import DesiredChange, DesiredState, desired_extras, desired_json
from .values import SHA256_HEX, dumps

__all__ = ["clear_desired", "desired_states_of", "desired_states_page", "roll_back",
           "set_desired", "set_models", "was_desired"]

#: SQLite allows 32766 host parameters per statement (999 before 3.32); stay well below.
_IN_CHUNK = 500

_Targets = list[tuple[str, dict[str, DesiredModel]]]


def set_desired(tx: Tx, now: float, bundle_sha256: str, devices: Sequence[str] | None,
                group: str | None) -> list[DesiredChange]:
    """Ask the devices (or the group) to run this stored bundle; returns the changes."""
    bundle = require_bundle(tx, bundle_sha256)
    return _change(tx, now, _lock_targets(tx, devices, group), model=bundle.name,
                   target=bundle.desired, kind="desired.set")


def set_models(tx: Tx, now: float, model: str,
               targets: Mapping[str, DesiredModel | None]) -> list[DesiredChange]:
    """Set ``model`` on each device to its own target (None: not desired), with whatever
    the target carries (a shadow candidate, ``compare_previous``); every bundle named must
    be stored. Returns the changes (devices already at their target are left alone)."""
    named = {sha for t in targets.values() if t is not None
             for sha in (t.bundle_sha256, *(() if t.shadow is None else (t.shadow.bundle_sha256,)))}
    for sha in sorted(named):  # once per bundle, however many devices
        bundle = require_bundle(tx, sha)
        if bundle.name != model:
            raise RegistryError(f"bundle {sha[:12]} is {bundle.name}, not {model}")
    locked = _lock_targets(tx, list(targets), None) if targets else []
    changes = [DesiredChange(device_id, model, desired.get(model), targets[device_id])
               for device_id, desired in locked if desired.get(model) != targets[device_id]]
    _push_history(tx, now, model, changes)
    _write(tx, now, changes, "desired.set")
    return changes


def clear_desired(tx: Tx, now: float, model: str, devices: Sequence[str] | None,
                  group: str | None) -> list[DesiredChange]:
    """Stop asking the devices (or the group) to run ``model``; returns the changes."""
    return _change(tx, now, _lock_targets(tx, devices, group), model=model, target=None,
                   kind="desired.cleared")


def roll_back(tx: Tx, now: float, devices: Sequence[str] | None, group: str | None,
              model: str | None, *, dry_run: bool = False,
              substitute: Mapping[str, DesiredModel] | None = None) -> list[DesiredChange]:
    """Undo each device's last change (of ``model`` only, if given); RegistryError if no
    selected device has one. ``dry_run``: only say what would change. ``substitute``: for
    each bundle (sha256) to go back to, what to desire instead (its re-release);
    RegistryError, nothing changed, for a bundle it lacks (the history moved)."""
    targets = _lock_targets(tx, devices, group)
    model_filter = " AND model = ?" if model is not None else ""
    changes: list[DesiredChange] = []
    popped: list[tuple[int]] = []
    bundles: dict[str, DesiredModel] = {}
    for device_id, desired in targets:
        params = (device_id, model) if model is not None else (device_id,)
        top = tx.one("SELECT id, model, previous_sha256 FROM desired_history "
                     f"WHERE device_id = ?{model_filter} ORDER BY id DESC LIMIT 1", params)
        if top is None:
            continue
        entry_id, entry_model, previous = top
        if previous is not None and previous not in bundles:
            bundles[previous] = require_bundle(tx, previous).desired
        after = None if previous is None else bundles[previous]
        if substitute is not None and previous is not None:
            if previous not in substitute:
                raise RegistryError(f"the desired state of {device_id} changed while the "
                                    "rollback was prepared; roll back again")
            after = substitute[previous]
        changes.append(DesiredChange(device_id, entry_model, desired.get(entry_model), after))
        popped.append((entry_id,))
    if not changes:
        what = f"model {model!r} of " if model is not None else ""
        raise RegistryError(f"nothing to roll back: {what}the selected devices have no "
                            "earlier desired state")
    if dry_run:
        return changes
    _write(tx, now, changes, "desired.rolled_back")
    tx.many("DELETE FROM desired_history WHERE id = ?", popped)
    return changes


def was_desired(tx: Tx, device_id: str, bundle_sha256: str) -> bool:
    """Whether this bundle is, or at some time was, in the device's desired state."""
    sha = bundle_sha256.lower()
    if not SHA256_HEX.fullmatch(sha):
        return False
    return tx.one("SELECT 1 FROM ever_desired WHERE device_id = ? AND bundle_sha256 = ?",
                  (device_id, sha)) is not None


def bundle_access(tx: Tx, device_id: str, bundle_sha256: str) -> tuple[str, bool] | None:
    """(the fingerprint of the device's enrolled certificate, whether this bundle is or was
    in its desired state) in one query; None for an unknown device and for a reset one: a
    reset keeps the old fingerprint (for the record) until the id is enrolled again, and
    that certificate must be refused from the moment of the reset."""
    sha = bundle_sha256.lower()
    row = tx.one("SELECT cert_fingerprint, EXISTS (SELECT 1 FROM ever_desired WHERE "
                 "device_id = devices.id AND bundle_sha256 = ?) FROM devices WHERE id = ? "
                 "AND reset_at IS NULL",
                 (sha if SHA256_HEX.fullmatch(sha) else "", device_id))
    return None if row is None else (str(row[0]), bool(row[1]))


def desired_states_of(tx: Tx, device_ids: Sequence[str]) -> list[DesiredState]:
    """The desired states of the enrolled devices among ``device_ids``, in id order
    (unknown ids are left out)."""
    wanted = sorted(set(device_ids))
    states: list[DesiredState] = []
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        ids = [r[0] for r in tx.all(f"SELECT id FROM devices WHERE id IN ({marks}) "
                                    "ORDER BY id", chunk)]
        states += _states(tx, ids, f"IN ({marks})", chunk)
    return states


def desired_states_page(tx: Tx, group: str | None, after: str,
                        limit: int) -> list[DesiredState]:
    """The desired states of ``group``'s devices (None: every device) with ids after
    ``after``, the first ``limit`` in id order: a page (the next one is after the last id
    of this one; an empty page is the end)."""
    in_group = "" if group is None else " AND group_name = ?"
    params: tuple[Any, ...] = (after,) if group is None else (after, group)
    ids = [r[0] for r in tx.all(f"SELECT id FROM devices WHERE id > ?{in_group} "
                                "ORDER BY id LIMIT ?", (*params, limit))]
    if not ids:
        return []
    # A range of the primary keys rather than a list of ids: no bound on parameters, and
    # rows of other groups' devices in the range are dropped by _states.
    return _states(tx, ids, "BETWEEN ? AND ?", (ids[0], ids[-1]))


def _states(tx: Tx, ids: Sequence[str], where: str,
            params: Sequence[Any]) -> list[DesiredState]:
    """The desired states of ``ids``; ``where`` (with ``params``) selects at least their
    rows by device id in the other tables."""
    desired = desired_by_device(tx, f"WHERE device_id {where}", params)
    running: dict[str, dict[str, ModelReport]] = {}
    for device_id, model, version, sha, state in tx.all(
            "SELECT device_id, model, version, bundle_sha256, state FROM reported_models "
            f"WHERE device_id {where}", params):
        running.setdefault(device_id, {})[model] = ModelReport(int(version), sha, state)
    experiments: dict[str, list[Mapping[str, Any]]] = {}
    specs: dict[str, Mapping[str, Any]] = {}  # decoded once: many devices share one
    for device_id, spec in tx.all(
            "SELECT d.device, e.spec FROM experiment_devices d JOIN experiments e "
            f"ON e.name = d.experiment WHERE e.status = 'running' AND d.device {where} "
            "ORDER BY d.device, e.name", params):
        if spec not in specs:
            specs[spec] = json.loads(spec)
        experiments.setdefault(device_id, []).append(specs[spec])
    return [DesiredState(i, desired.get(i, {}), running.get(i, {}),
                         tuple(experiments.get(i, ()))) for i in ids]


def _lock_targets(tx: Tx, devices: Sequence[str] | None, group: str | None) -> _Targets:
    """(id, desired) of the selected devices, rows locked, in id order."""
    lock = tx.dialect.for_update
    if (devices is None) == (group is None):
        raise RegistryError("select devices either by a list of ids or by a group, not both "
                            "and not neither")
    if group is not None:
        ids = [r[0] for r in tx.all(f"SELECT id FROM devices WHERE group_name = ? "
                                    f"ORDER BY id{lock}", (group,))]
        if not ids:
            raise RegistryError(f"group {group!r} has no devices; check the group name")
        desired = desired_by_device(
            tx, "WHERE device_id IN (SELECT id FROM devices WHERE group_name = ?)", (group,))
        return [(i, desired.get(i, {})) for i in ids]
    assert devices is not None
    if isinstance(devices, str):
        # A bare string is a sequence of characters: almost certainly devices=["id"] meant.
        raise RegistryError(f"devices must be a list of ids, got the string {devices!r}")
    wanted = sorted(set(devices))
    if not wanted:
        raise RegistryError("no devices given; pass at least one device id or a group")
    ids = []
    desired = {}
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start:start + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        ids += [r[0] for r in tx.all(f"SELECT id FROM devices WHERE id IN ({marks}) "
                                     f"ORDER BY id{lock}", chunk)]
        desired.update(desired_by_device(tx, f"WHERE device_id IN ({marks})", chunk))
    missing = sorted(set(wanted) - set(ids))
    if missing:
        raise RegistryError(f"unknown device(s): {', '.join(missing)}; enroll them first or "
                            "fix the list (nothing was changed)")
    return [(i, desired.get(i, {})) for i in ids]


def _change(tx: Tx, now: float, targets: _Targets, *, model: str,
            target: DesiredModel | None, kind: str) -> list[DesiredChange]:
    """Set ``model`` to ``target`` on each device, pushing the old value onto the history."""
    changes = [DesiredChange(device_id, model, desired.get(model), target)
               for device_id, desired in targets if desired.get(model) != target]
    _push_history(tx, now, model, changes)
    _write(tx, now, changes, kind)
    return changes


def _push_history(tx: Tx, now: float, model: str, changes: list[DesiredChange]) -> None:
    tx.many("INSERT INTO desired_history (device_id, model, previous_sha256, at) "
            "VALUES (?, ?, ?, ?)",
            [(c.device, model, None if c.before is None else c.before.bundle_sha256, now)
             for c in changes])


def _write(tx: Tx, now: float, changes: list[DesiredChange], kind: str) -> None:
    """Apply ``changes`` (at most one per device and model), with an event each."""
    tx.many("DELETE FROM desired_models WHERE device_id = ? AND model = ?",
            [(c.device, c.model) for c in changes if c.after is None])
    rows = [(c.device, c.model, c.after.bundle_sha256, desired_extras(c.after))
            for c in changes if c.after is not None]
    tx.many("INSERT INTO desired_models (device_id, model, bundle_sha256, extras) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (device_id, model) DO UPDATE SET "
            "bundle_sha256 = excluded.bundle_sha256, extras = excluded.extras", rows)
    # A shadow candidate is fetched too: the device may ask for its chunks.
    tx.many("INSERT INTO ever_desired (device_id, bundle_sha256) VALUES (?, ?) "
            "ON CONFLICT (device_id, bundle_sha256) DO NOTHING",
            [(c.device, sha) for c in changes if c.after is not None
             for sha in (c.after.bundle_sha256, *(() if c.after.shadow is None
                                                  else (c.after.shadow.bundle_sha256,)))])
    tx.many(EVENT_INSERT, [(now, c.device, kind, dumps({
        "model": c.model,
        "before": None if c.before is None else desired_json(c.before),
        "after": None if c.after is None else desired_json(c.after)}, "event detail"))
        for c in changes])

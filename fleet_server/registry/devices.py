"""Devices: enrollment, group and tags, online state, and what each one reports running.

A device's report is stored by :mod:`.device_messages` with the rest of what devices send:
the models it runs go to ``reported_models`` (typed: what convergence reads), the report
itself, the JSON object the device sent, to ``devices.reported`` for display.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fleet_server.errors import RegistryError
from protocol.messages import DesiredModel, ModelReport

from .database import Tx
from .events import log_event
from .records import Device, Enrolled, desired_from_row
from .tokens import TokenClaim
from .values import SHA256_HEX, check_device_id, check_label, clean_tags

__all__ = ["desired_by_device", "device_filter", "enroll_device", "enroll_with_token",
           "load_device", "load_devices", "lock_device", "presence", "reset_device",
           "set_online", "update_device"]

_COLUMNS = ("id, group_name, profile, cert_fingerprint, enrolled_at, last_seen, online, "
            "reported, reported_at, encryption_key, reset_at")
#: base64 of a 32-byte X25519 public key.
_X25519_B64 = re.compile(r"[A-Za-z0-9+/]{43}=")
#: A desired model is a row of desired_models with its bundle's version and size.
_DESIRED_COLUMNS = "device_id, model, version, sha256, size, extras"
_DESIRED_FROM = "desired_models JOIN bundles ON sha256 = bundle_sha256"


def enroll_device(tx: Tx, now: float, device_id: str, *, group: str, profile: str,
                  cert_fingerprint: str, tags: Iterable[str],
                  encryption_key: str | None = None, only_new: bool = False) -> Device:
    """A new device, or a known one enrolling again: identity (and encryption key)
    replaced, a reset cleared, models kept. With ``only_new``, RegistryError if the id was
    enrolled meanwhile (a concurrent enrollment won)."""
    check_device_id(device_id)
    check_label("group", group)
    check_label("profile", profile)
    fingerprint = cert_fingerprint.lower()
    if not SHA256_HEX.fullmatch(fingerprint):
        raise RegistryError(f"certificate fingerprint {cert_fingerprint!r} is not a "
                            "SHA-256 hex digest (64 hex digits)")
    if encryption_key is not None and not _X25519_B64.fullmatch(encryption_key):
        raise RegistryError("the encryption key must be an X25519 public key: 32 bytes in "
                            "base64 (44 characters)")
    tag_list = clean_tags(tags)
    known = tx.one("SELECT id FROM devices WHERE id = ?", (device_id,)) is not None
    on_conflict = ("DO NOTHING" if only_new else
                   "DO UPDATE SET group_name = excluded.group_name, "
                   "profile = excluded.profile, cert_fingerprint = excluded.cert_fingerprint, "
                   "enrolled_at = excluded.enrolled_at, "
                   "encryption_key = excluded.encryption_key, reset_at = NULL")
    written = tx.run("INSERT INTO devices (id, group_name, profile, cert_fingerprint, "
                     "enrolled_at, last_seen, online, reported, reported_at, encryption_key, "
                     "reset_at) VALUES (?, ?, ?, ?, ?, NULL, ?, '{}', NULL, ?, NULL) "
                     f"ON CONFLICT (id) {on_conflict}",
                     (device_id, group, profile, fingerprint, now, False, encryption_key))
    if written != 1:
        raise RegistryError(f"device {device_id!r} was enrolled at the same moment by another "
                            "request; ask the operator whether that was this device")
    _replace_tags(tx, device_id, tag_list)
    log_event(tx, now, device_id, "device.enrolled",
              {"group": group, "profile": profile, "cert_fingerprint": fingerprint,
               "tags": list(tag_list), "again": known,
               "encryption_key": encryption_key is not None})
    device = load_device(tx, device_id)
    assert device is not None  # written in this transaction
    return device


def enroll_with_token(tx: Tx, now: float, claim: TokenClaim, device_id: str, *,
                      profile: str, cert_fingerprint: str, tags: Iterable[str],
                      encryption_key: str | None) -> Enrolled:
    """Enroll ``device_id`` with a token redeemed in this transaction (``claim``).

    An enrolled device id is taken only with a token issued for that id or after
    :func:`reset_device`: a group's token cannot take over a device. RegistryError then,
    which undoes the redemption with the rest of the transaction."""
    current = tx.one("SELECT cert_fingerprint, reset_at FROM devices "
                     f"WHERE id = ?{tx.dialect.for_update}", (device_id,))
    if current is not None and current[1] is None and claim.device != device_id:
        raise RegistryError(
            f"device {device_id!r} is enrolled already, and this token is for group "
            f"{claim.group!r}, not for that device: a token cannot take over an enrolled "
            f"device. To enroll it again (a re-imaged or replaced device), issue a token for "
            f"it (`fleet enroll-token --device {device_id}`) or reset it first (`fleet device "
            f"reset {device_id}`)")
    device = enroll_device(tx, now, device_id, group=claim.group, profile=profile,
                           cert_fingerprint=cert_fingerprint, tags=tags,
                           encryption_key=encryption_key, only_new=current is None)
    # A reset device's certificate was revoked by the reset already.
    replaced = None if (current is None or current[1] is not None
                        or current[0] == device.cert_fingerprint) else str(current[0])
    return Enrolled(device, replaced)


def reset_device(tx: Tx, now: float, device_id: str) -> Device:
    """Mark the device reset: any valid token may enroll its id again (group, tags and
    desired state kept until then). The device as it was enrolled (its certificate is the
    caller's to revoke). RegistryError if unknown."""
    lock_device(tx, device_id)
    tx.run("UPDATE devices SET reset_at = ?, online = ? WHERE id = ?", (now, False, device_id))
    device = load_device(tx, device_id)
    assert device is not None  # locked in this transaction
    log_event(tx, now, device_id, "device.reset",
              {"cert_fingerprint": device.cert_fingerprint})
    return device


def update_device(tx: Tx, now: float, device_id: str, *, group: str | None,
                  tags: Iterable[str] | None, profile: str | None) -> Device:
    """Change a device's group, tags (replaced as a whole) or profile."""
    lock_device(tx, device_id)
    changes: dict[str, Any] = {}
    for column, key, value in (("group_name", "group", group), ("profile", "profile", profile)):
        if value is not None:
            check_label(key, value)
            tx.run(f"UPDATE devices SET {column} = ? WHERE id = ?", (value, device_id))
            changes[key] = value
    if tags is not None:
        changes["tags"] = list(_replace_tags(tx, device_id, clean_tags(tags)))
    if changes:
        log_event(tx, now, device_id, "device.updated", changes)
    device = load_device(tx, device_id)
    assert device is not None  # written in this transaction
    return device


def set_online(tx: Tx, now: float, device_id: str, online: bool) -> None:
    """A connect (also bumps ``last_seen``) or a disconnect; an event when it changes."""
    was = lock_device(tx, device_id)
    if online:
        tx.run("UPDATE devices SET online = ?, last_seen = ? WHERE id = ?",
               (True, now, device_id))
    else:
        tx.run("UPDATE devices SET online = ? WHERE id = ?", (False, device_id))
    if was != online:
        log_event(tx, now, device_id, "device.online" if online else "device.offline", {})


def lock_device(tx: Tx, device_id: str) -> bool:
    """Lock the device's row; returns its online flag. RegistryError if it is unknown."""
    row = tx.one(f"SELECT online FROM devices WHERE id = ?{tx.dialect.for_update}",
                 (device_id,))
    if row is None:
        raise RegistryError(f"unknown device {device_id!r}; it must enroll first")
    return bool(row[0])


def device_filter(*, group: str | None, tag: str | None,
                  online: bool | None) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause over ``devices`` (and its parameters) for ``list_devices``."""
    clauses: list[str] = []
    params: list[Any] = []
    if group is not None:
        clauses.append("group_name = ?")
        params.append(group)
    if tag is not None:
        clauses.append("id IN (SELECT device_id FROM device_tags WHERE tag = ?)")
        params.append(tag)
    if online is not None:
        clauses.append("online = ?")
        params.append(online)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def load_device(tx: Tx, device_id: str) -> Device | None:
    """The device with this id, or None."""
    found = _load(tx, "WHERE id = ?", "WHERE device_id = ?", (device_id,), one_query=True)
    return found[0] if found else None


def presence(tx: Tx) -> list[tuple[str, str, float | None]]:
    """(id, group, last_seen) of every device, in id order: one query, nothing decoded."""
    return [(r[0], r[1], None if r[2] is None else float(r[2]))
            for r in tx.all("SELECT id, group_name, last_seen FROM devices ORDER BY id")]


def load_devices(tx: Tx, where: str, params: Sequence[Any]) -> list[Device]:
    """The devices ``where`` selects (a WHERE clause over ``devices``), in id order."""
    # The other tables' rows of the same devices: all of them when none is filtered out.
    among = f"WHERE device_id IN (SELECT id FROM devices {where})" if where else ""
    return _load(tx, where, among, params, one_query=False)


def _load(tx: Tx, where: str, among: str, params: Sequence[Any], *,
          one_query: bool) -> list[Device]:
    rows = tx.all(f"SELECT {_COLUMNS} FROM devices {where} ORDER BY id", params)
    if not rows:
        return []
    # Tags, desired and reported models: for one device in one query (a round trip saved);
    # for many, a query each (a UNION of many rows costs more than the round trips).
    parts = [f"SELECT 't', device_id, tag, NULL, NULL, NULL, NULL FROM device_tags {among}",
             f"SELECT 'd', {_DESIRED_COLUMNS} FROM {_DESIRED_FROM} {among}",
             "SELECT 'r', device_id, model, version, bundle_sha256, NULL, state "
             f"FROM reported_models {among}"]
    related = (tx.all(" UNION ALL ".join(parts), (*params, *params, *params)) if one_query
               else [row for part in parts for row in tx.all(part, params)])
    tags: dict[str, list[str]] = {}
    desired: dict[str, dict[str, DesiredModel]] = {}
    running: dict[str, dict[str, ModelReport]] = {}
    for kind, device_id, name, version, sha, size, state in related:
        if kind == "t":
            tags.setdefault(device_id, []).append(name)
        elif kind == "d":
            desired.setdefault(device_id, {})[name] = desired_from_row(version, sha, size,
                                                                       state)
        else:
            running.setdefault(device_id, {})[name] = ModelReport(int(version), sha, state)
    return [Device(id=r[0], group=r[1], tags=tuple(sorted(tags.get(r[0], ()))), profile=r[2],
                   cert_fingerprint=r[3], enrolled_at=float(r[4]),
                   last_seen=None if r[5] is None else float(r[5]), online=bool(r[6]),
                   desired=desired.get(r[0], {}), running=running.get(r[0], {}),
                   reported=json.loads(r[7]),
                   reported_at=None if r[8] is None else float(r[8]), encryption_key=r[9],
                   reset_at=None if r[10] is None else float(r[10]))
            for r in rows]


def desired_by_device(tx: Tx, where: str, params: Sequence[Any],
                      ) -> dict[str, dict[str, DesiredModel]]:
    """The desired models of the devices ``where`` selects (a WHERE clause over
    ``desired_models``), by device id; a model's version and size are its bundle's."""
    desired: dict[str, dict[str, DesiredModel]] = {}
    for device_id, model, version, sha, size, extras in tx.all(
            f"SELECT {_DESIRED_COLUMNS} FROM {_DESIRED_FROM} {where}", params):
        desired.setdefault(device_id, {})[model] = desired_from_row(version, sha, size, extras)
    return desired


def _replace_tags(tx: Tx, device_id: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    tx.run("DELETE FROM device_tags WHERE device_id = ?", (device_id,))
    tx.many("INSERT INTO device_tags (device_id, tag) VALUES (?, ?)",
            [(device_id, t) for t in tags])
    return tags

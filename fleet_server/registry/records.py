"""What the registry returns: frozen records, and the one rule for convergence.

What a device should run and what it reports running are the protocol's own records
(:class:`protocol.messages.DesiredModel`, :class:`protocol.messages.ModelReport`, parsed
once when the report arrives), so the server publishes and judges exactly what travels on
the wire. The records here add what only the registry knows: enrollment, stored bundles,
the event log's ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocol.install_states import InstallState
from protocol.messages import DesiredModel, DesiredShadow, ModelReport, Telemetry

__all__ = ["BundleRecord", "DeltaRecord", "DesiredChange", "DesiredState", "Device",
           "DeviceModels", "Enrolled", "EventRecord", "TelemetryRecord", "desired_extras",
           "desired_from_row", "desired_json", "is_converged"]


@dataclass(frozen=True)
class Device:
    """One enrolled device, as the registry last recorded it.

    ``desired`` is what the server wants it to run (model name -> the bundle, as published);
    ``running`` is what the device last reported running (model name -> its report), and
    ``reported`` that whole report as JSON, for display (``{}`` before the first one).
    """

    id: str
    group: str
    tags: tuple[str, ...]
    profile: str
    cert_fingerprint: str
    enrolled_at: float
    last_seen: float | None
    online: bool
    desired: Mapping[str, DesiredModel]
    running: Mapping[str, ModelReport]
    reported: Mapping[str, Any]
    reported_at: float | None
    #: The public half of the device's X25519 key (base64 of 32 raw bytes), which bundles
    #: are encrypted for; None for a device enrolled without one.
    encryption_key: str | None = None
    #: When the operator reset the device (its certificate revoked, its id free for any
    #: token); None once it enrolled again, or if it never was.
    reset_at: float | None = None

    @property
    def converged(self) -> bool:
        """Whether the device reports running everything it is asked to run. A device that
        never reported has not converged, even to an empty desired state: nothing says it
        runs what it should."""
        return self.reported_at is not None and is_converged(self.desired, self.running)

    def online_at(self, now: float, offline_after_s: float) -> bool:
        """Whether the device counts as online at ``now``: connected by its last word and
        heard from within ``offline_after_s`` (a lost will or a server that was down could
        otherwise leave it online forever)."""
        return (self.online and self.last_seen is not None
                and now - self.last_seen <= offline_after_s)

    def desired_json(self) -> dict[str, dict[str, Any]]:
        """The desired models as the JSON object published to the device."""
        return {name: desired_json(d) for name, d in sorted(self.desired.items())}


@dataclass(frozen=True)
class DesiredChange:
    """One device's desired state for one model went from ``before`` to ``after``.

    ``None`` means the model was absent (not desired)."""

    device: str
    model: str
    before: DesiredModel | None
    after: DesiredModel | None


@dataclass(frozen=True)
class BundleRecord:
    """A stored bundle: the blob is ``path``, named by its content hash."""

    sha256: str
    name: str
    version: int
    size: int
    path: Path
    created_at: float
    #: The version of the bundle's TUF timestamp, snapshot and targets metadata (0: stored
    #: before the registry recorded it).
    metadata_version: int = 0
    #: For a re-release (a rollback): the version whose contents it carries.
    rollback_of: int | None = None

    @property
    def desired(self) -> DesiredModel:
        """This bundle as a device's desired model."""
        return DesiredModel(self.version, self.sha256, self.size)


@dataclass(frozen=True)
class DeltaRecord:
    """A stored delta bundle of the full bundle ``bundle_sha256``: it carries the deltas
    from ``base_version`` of the same model (docs/bundle-format.md §8)."""

    sha256: str
    bundle_sha256: str
    base_version: int
    size: int
    path: Path
    created_at: float


@dataclass(frozen=True)
class Enrolled:
    """What an enrollment did: the device as now recorded, and the certificate it replaced
    (its fingerprint; None for a new or a reset device), which must be revoked."""

    device: Device
    replaced_fingerprint: str | None


@dataclass(frozen=True)
class EventRecord:
    """One entry of the append-only event log. ``device`` is None for fleet-wide events.

    Not the protocol's :class:`~protocol.messages.Event`: the log also holds the server's own
    events (enrollments, desired-state changes), stamped with the server's clock and an id
    to poll from; a device's event is stored with its own time as ``detail.device_at``."""

    id: int
    at: float
    device: str | None
    kind: str
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class TelemetryRecord:
    """A stored telemetry sample, as the device sent it, and the device it came from."""

    device: str
    sample: Telemetry


def desired_json(model: DesiredModel) -> dict[str, Any]:
    """A desired model as JSON: as the device receives it in its ``desired`` message."""
    # Spelled out rather than dataclasses.asdict, which deep-copies and is ten times slower:
    # a group rollout writes two of these per device into its events.
    out: dict[str, Any] = {"version": model.version, "bundle_sha256": model.bundle_sha256,
                           "size": model.size}
    if model.shadow is not None:
        s = model.shadow
        out["shadow"] = {"version": s.version, "bundle_sha256": s.bundle_sha256,
                         "size": s.size, "sample_rate": s.sample_rate}
    if model.compare_previous:
        out["compare_previous"] = model.compare_previous
    if model.delta is not None:  # as encode() writes it: only when there is one
        out["delta"] = {"bundle_sha256": model.delta.bundle_sha256, "size": model.delta.size,
                        "base_version": model.delta.base_version}
    return out


def desired_extras(model: DesiredModel) -> str | None:
    """What ``model`` carries beyond its bundle, as ``desired_models.extras`` stores it
    (None for a plain model)."""
    extras = {k: v for k, v in desired_json(model).items()
              if k not in ("version", "bundle_sha256", "size")}
    return json.dumps(extras, sort_keys=True) if extras else None


class DeviceModels(Protocol):
    """What checks of a publish read of a device: a :class:`Device` or a
    :class:`DesiredState`."""

    @property
    def id(self) -> str:
        """The device id."""
        ...

    @property
    def desired(self) -> Mapping[str, DesiredModel]:
        """What it should run, by model."""
        ...

    @property
    def running(self) -> Mapping[str, ModelReport]:
        """What it reports running, by model."""
        ...


@dataclass(frozen=True)
class DesiredState:
    """What a device's desired-state message is made of, read for many devices at once
    (:meth:`Registry.desired_states`): what it should run, what it reports running (the
    base of a delta) and the declarations of the running experiments it takes part in."""

    id: str
    desired: Mapping[str, DesiredModel]
    running: Mapping[str, ModelReport]
    experiments: tuple[Mapping[str, Any], ...] = ()


def desired_from_row(version: int, sha256: str, size: int, extras: str | None) -> DesiredModel:
    """A desired model from its bundle's columns and its ``extras``."""
    if extras is None:
        return DesiredModel(int(version), sha256, int(size))
    obj = json.loads(extras)
    s = obj.get("shadow")
    shadow = None if s is None else DesiredShadow(int(s["version"]), str(s["bundle_sha256"]),
                                                  int(s["size"]), float(s["sample_rate"]))
    return DesiredModel(int(version), sha256, int(size), shadow,
                        float(obj.get("compare_previous", 0.0)))


def is_converged(desired: Mapping[str, DesiredModel],
                 running: Mapping[str, ModelReport]) -> bool:
    """Whether a device running ``running`` runs every desired model, committed.

    Each desired model must be reported at the desired version, in state ``committed`` (a
    model still in probation may yet roll back) and, when the device names its bundle, from
    the desired bundle. Models the device runs but that are not desired do not count. No
    desired models: converged.
    """
    for name, want in desired.items():
        got = running.get(name)
        if got is None or got.version != want.version or got.state != InstallState.COMMITTED:
            return False
        if got.bundle_sha256 is not None and got.bundle_sha256 != want.bundle_sha256:
            return False
    return True

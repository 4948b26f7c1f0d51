"""Delta or full, per device: which bundle of a release each device is offered, and the
bytes that saves.

A release is one full bundle and, optionally, delta bundles that rebuild its artifacts from
earlier versions (docs/bundle-format.md §8). A device that reports running one of those
base versions is offered the matching delta beside the full bundle in its desired state
(:func:`offer_for`); the device takes the delta if it still holds an intact base, else the
full bundle. :func:`plan_transfers` sums what a publish (or a rollout step) sends: what
``fleet publish`` prints, and what the rollout code can call for its steps. Pure: the
caller passes the records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from protocol.messages import DeltaOffer, DesiredModel, ModelReport

from .registry import DeltaRecord, DeviceModels

__all__ = ["TransferPlan", "offer_for", "plan_transfers"]


def offer_for(desired: DesiredModel, running: ModelReport | None,
              deltas: Sequence[DeltaRecord]) -> DesiredModel:
    """``desired`` with the delta from the version the device runs, if there is one (and the
    device runs an older version of the model, not the desired one)."""
    if running is None or running.version >= desired.version:
        return desired
    delta = next((d for d in deltas if d.base_version == running.version
                  and d.bundle_sha256 == desired.bundle_sha256), None)
    if delta is None:
        return desired
    return replace(desired, delta=DeltaOffer(delta.sha256, delta.size, delta.base_version))


@dataclass(frozen=True)
class TransferPlan:
    """What a publish sends: per device, the full bundle or a delta (expected; a device
    whose base turns out damaged fetches the full bundle instead)."""

    #: Devices offered a delta, by base version: version -> device ids.
    by_delta: dict[int, tuple[str, ...]]
    #: Devices that get the full bundle.
    full: tuple[str, ...]
    #: Bytes if every device fetched the full bundle, and the bytes expected.
    full_bytes: int
    wire_bytes: int

    @property
    def saved_bytes(self) -> int:
        """Bytes the deltas save."""
        return self.full_bytes - self.wire_bytes

    def as_json(self) -> dict[str, Any]:
        """The plan as the API returns it (schema ``TransferPlan``)."""
        return {"delta_devices": {str(v): list(d) for v, d in sorted(self.by_delta.items())},
                "full_devices": list(self.full), "full_bytes": self.full_bytes,
                "wire_bytes": self.wire_bytes, "saved_bytes": self.saved_bytes}


def plan_transfers(desired: DesiredModel, model: str, devices: Iterable[DeviceModels],
                   deltas: Sequence[DeltaRecord]) -> TransferPlan:
    """What sending ``desired`` (model ``model``) to ``devices`` costs, given the
    release's ``deltas``: devices already running it are not counted."""
    by_delta: dict[int, list[str]] = {}
    full: list[str] = []
    full_bytes = wire = 0
    for device in devices:
        running = device.running.get(model)
        if running is not None and running.bundle_sha256 == desired.bundle_sha256:
            continue
        offered = offer_for(desired, running, deltas)
        full_bytes += desired.size
        if offered.delta is None:
            full.append(device.id)
            wire += desired.size
        else:
            by_delta.setdefault(offered.delta.base_version, []).append(device.id)
            wire += offered.delta.size
    return TransferPlan({v: tuple(d) for v, d in by_delta.items()}, tuple(full), full_bytes,
                        wire)

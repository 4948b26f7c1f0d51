"""The fleet at a glance, pure: devices online, versions running per group, convergence.

Computed from the registry's devices (what each reports running and is asked to run) by
:func:`overview`; read by ``/metrics``, the dashboard and ``GET /api/overview``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fleet_server.registry.records import Device

__all__ = ["GroupOverview", "Overview", "overview"]


@dataclass
class GroupOverview:
    """One group: how many devices, online, converged; devices per (model, version)."""

    devices: int = 0
    online: int = 0
    converged: int = 0
    #: model -> version (0: served without a bundle) -> devices reporting it
    running: dict[str, dict[int, int]] = field(default_factory=dict)
    #: model -> the version desired of most devices of the group
    desired: dict[str, int] = field(default_factory=dict)

    @property
    def convergence(self) -> float | None:
        """Share of the group's devices that run what they are asked to (None: empty)."""
        return self.converged / self.devices if self.devices else None

    def to_json(self) -> dict[str, Any]:
        """The group as the API shows it."""
        return {"devices": self.devices, "online": self.online, "converged": self.converged,
                "convergence": self.convergence,
                "running": {m: {str(v): n for v, n in sorted(vs.items())}
                            for m, vs in sorted(self.running.items())},
                "desired": dict(sorted(self.desired.items()))}


@dataclass
class Overview:
    """The fleet: per group, and totals."""

    groups: dict[str, GroupOverview]

    @property
    def devices(self) -> int:
        """Enrolled devices."""
        return sum(g.devices for g in self.groups.values())

    @property
    def online(self) -> int:
        """Devices online now."""
        return sum(g.online for g in self.groups.values())

    @property
    def converged(self) -> int:
        """Devices running what they are asked to."""
        return sum(g.converged for g in self.groups.values())

    def to_json(self) -> dict[str, Any]:
        """The overview as the API shows it (schema ``Overview``)."""
        return {"devices": self.devices, "online": self.online, "converged": self.converged,
                "groups": {name: g.to_json() for name, g in sorted(self.groups.items())}}


def overview(devices: Iterable[Device], now: float, offline_after_s: float) -> Overview:
    """The overview of ``devices`` at ``now``."""
    groups: dict[str, GroupOverview] = {}
    wanted: dict[str, dict[str, dict[int, int]]] = {}
    for device in devices:
        group = groups.setdefault(device.group, GroupOverview())
        group.devices += 1
        group.online += device.online_at(now, offline_after_s)
        group.converged += device.converged
        for name, report in device.running.items():
            versions = group.running.setdefault(name, {})
            versions[report.version] = versions.get(report.version, 0) + 1
        for name, desired in device.desired.items():
            counts = wanted.setdefault(device.group, {}).setdefault(name, {})
            counts[desired.version] = counts.get(desired.version, 0) + 1
    for name, models in wanted.items():
        groups[name].desired = {m: max(vs, key=lambda v: (vs[v], v))
                                for m, vs in models.items()}
    return Overview(groups)

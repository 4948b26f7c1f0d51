"""Which devices each rollout step takes: deterministic, stratified by firmware profile.

Each device's place in line is :func:`common.unit_hash.unit_hash` of the rollout id and the
device id (SHA-256, as experiments assign arms): the same rollout always picks the same
devices (a restarted server picks exactly what it picked before), and another rollout
picks others. Devices are lined up per firmware profile and each step
takes the first ``ceil(share x count)`` of every profile, at least one: so every kind of
device is in the first step, where a model that fails on one kind is caught while few
devices have it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.unit_hash import unit_hash
from fleet_server.errors import RolloutError

__all__ = ["Target", "allowed", "check_steps", "plan_steps"]

#: Steps a rollout may have; more would only make it slower.
MAX_STEPS = 20


@dataclass(frozen=True)
class Target:
    """A device the rollout may reach, and its firmware profile."""

    device: str
    profile: str


def check_steps(steps: Sequence[float]) -> tuple[float, ...]:
    """Validate percentages: increasing, above 0, ending at 100. RolloutError otherwise."""
    got = tuple(float(s) for s in steps)
    if not got or len(got) > MAX_STEPS:
        raise RolloutError(f"give 1 to {MAX_STEPS} steps (percentages such as 5,25,100)")
    if any(not 0.0 < s <= 100.0 for s in got) or any(b <= a for a, b in itertools.pairwise(got)):
        raise RolloutError(f"steps {','.join(f'{s:g}' for s in got)} must be increasing "
                           "percentages above 0 and at most 100")
    if got[-1] != 100.0:
        raise RolloutError(f"the last step must be 100 (all devices), not {got[-1]:g}; "
                           "add 100 to --steps")
    return got


def _count(share: float, size: int) -> int:
    """How many of ``size`` devices of one profile a step of ``share`` percent takes."""
    if share >= 100.0:
        return size
    # The tiny epsilon keeps 25% of 4 at 1 when floating point makes it 1.0000000000000002.
    return min(size, max(1, math.ceil(share * size / 100.0 - 1e-9)))


def plan_steps(rollout_id: str, targets: Sequence[Target],
               steps: Sequence[float]) -> tuple[tuple[str, ...], ...]:
    """The devices each step adds (step k's devices are those of steps 0..k)."""
    by_profile: dict[str, list[str]] = {}
    for target in targets:
        by_profile.setdefault(target.profile, []).append(target.device)
    added: list[list[str]] = [[] for _ in steps]
    for profile in sorted(by_profile):
        line = sorted(by_profile[profile], key=lambda d: (unit_hash(rollout_id, d), d))
        taken = 0
        for k, share in enumerate(steps):
            upto = _count(share, len(line))
            added[k] += line[taken:upto]
            taken = max(taken, upto)
    return tuple(tuple(sorted(a)) for a in added)


def allowed(targets: Sequence[Target], share: float) -> int:
    """The most devices a step of ``share`` percent may have reached."""
    sizes: dict[str, int] = {}
    for target in targets:
        sizes[target.profile] = sizes.get(target.profile, 0) + 1
    return sum(_count(share, n) for n in sizes.values())

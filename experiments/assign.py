"""Which arm serves a unit: a device, or one request (sticky per client key when given).

Assignment by hash makes the choice a pure function of the experiment and the unit: the
device, the server's status page and a test all compute the same arm without talking to
each other, a restart does not move a device to another arm, and a client that sends the
same key gets the same arm on every request. The hash is :func:`common.unit_hash.unit_hash`
of the experiment and the unit (as rollout plans use it), so two experiments split the same
fleet independently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.unit_hash import unit_hash
from experiments.errors import InvalidExperimentData

__all__ = ["arm_for_key", "check_split", "device_arm", "request_arm"]

MAX_ARMS = 16


def check_split(split: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """The split as ``(arm, share)`` pairs whose shares sum to 1, or InvalidExperimentData."""
    if not 1 <= len(split) <= MAX_ARMS:
        raise InvalidExperimentData(f"an experiment needs 1 to {MAX_ARMS} arms, not "
                                    f"{len(split)}")
    names = [name for name, _ in split]
    if len(set(names)) != len(names):
        raise InvalidExperimentData(f"arm names must differ: {', '.join(names)}")
    weights = [float(w) for _, w in split]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidExperimentData(f"split weights must be non-negative with a positive sum, "
                                    f"not {weights}; e.g. --split 50,50")
    total = sum(weights)
    return tuple((name, w / total) for name, w in zip(names, weights, strict=True))


def arm_for_key(experiment: str, key: str, split: Sequence[tuple[str, float]]) -> str:
    """The arm of ``key`` in ``experiment``: the same every time, in proportion to the split."""
    return _pick(check_split(split), unit_hash(experiment, key))


def device_arm(experiment: str, device: str, split: Sequence[tuple[str, float]]) -> str:
    """Device units: the one arm this device serves for the whole experiment."""
    return arm_for_key(experiment, f"device:{device}", split)


def request_arm(experiment: str, split: Sequence[tuple[str, float]],
                rng: np.random.Generator, client_key: str | None = None) -> str:
    """Request units: a fresh draw per request, or sticky per ``client_key`` when given."""
    if client_key is not None:
        return arm_for_key(experiment, f"client:{client_key}", split)
    return _pick(check_split(split), float(rng.random()))


def _pick(split: tuple[tuple[str, float], ...], u: float) -> str:
    edge = 0.0
    for name, share in split:
        edge += share
        if u < edge:
            return name
    # u is below 1 and the shares sum to 1 up to rounding: the last arm with a share.
    return next(name for name, share in reversed(split) if share > 0)

"""One bandit posterior learnt by a whole fleet, each observation counted exactly once.

Every device counts its own rewards per arm (:class:`stats.bandit.ArmStats`, which add). At
each report it closes the open interval into a :class:`Delta` with the next sequence number;
the delta travels in the durable outbox with telemetry. The server (:class:`FleetPosterior`)
applies a device's deltas in sequence order, each once: a repeated sequence number (a
redelivery) is ignored, a skipped one is refused until the gap arrives. It pushes back a
:class:`Merged` posterior: the sum of everything applied, plus, for the receiving device, the
last of *its* sequence numbers included.

The device (:class:`DeviceLearner`) serves from ``merged + its deltas above that number +
its open interval``: its own counts are in the merged sum or in its local part, never both.
Offline, no push arrives, so it keeps learning from its own counts on top of the last merged
posterior; when it reconnects, its deltas are applied once and drop out of the local part
when a push says they are in. A push older than the one held is ignored. A device that lost
its state (re-imaged) learns from the push which sequence number to continue after.

All functions return new records; the agent and the server persist them and move them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from experiments.assign import MAX_ARMS
from experiments.errors import InvalidExperimentData, OutOfOrderDelta
from stats.bandit import ArmStats

__all__ = [
    "Delta",
    "DeltaVerdict",
    "DeviceLearner",
    "FleetPosterior",
    "Merged",
    "apply_delta",
    "close_interval",
    "decode_delta",
    "encode_delta",
    "learner_from_json",
    "learner_to_json",
    "local_posterior",
    "observe",
    "push_for",
    "receive",
    "take_resend",
    "total",
]

# One device reports at most this many observations per arm in one delta: far above any
# real interval, low enough that a corrupt message cannot swamp the fleet's posterior.
MAX_DELTA_COUNT = 10_000_000

DeltaVerdict = Literal["applied", "duplicate"]
Arms = Mapping[str, ArmStats]


@dataclass(frozen=True)
class Delta:
    """What one device learnt in one interval, numbered 1, 2, ... per device and experiment."""

    experiment: str
    device: str
    seq: int
    arms: Mapping[str, ArmStats]


@dataclass(frozen=True)
class Merged:
    """The fleet's posterior as pushed to one device: ``applied_seq`` of its deltas are in."""

    experiment: str
    version: int
    arms: Mapping[str, ArmStats]
    applied_seq: int


@dataclass(frozen=True)
class FleetPosterior:
    """Server side: the sum of every applied delta, and each device's last applied number."""

    experiment: str
    arms: Mapping[str, ArmStats]
    applied: Mapping[str, int] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def start(cls, experiment: str, arm_names: tuple[str, ...]) -> FleetPosterior:
        """A new experiment's posterior: nothing observed yet on any arm."""
        return cls(experiment, {name: ArmStats() for name in arm_names})


@dataclass(frozen=True)
class DeviceLearner:
    """Device side: the last merged posterior, its own closed deltas not yet in it, and the
    open interval."""

    experiment: str
    base: Mapping[str, ArmStats]
    base_version: int = 0
    base_applied_seq: int = 0
    pending: tuple[Delta, ...] = ()
    current: Mapping[str, ArmStats] = field(default_factory=dict)
    next_seq: int = 1
    # The first pending number to send again (0: none). Set by a push that did not include
    # every pending delta: one of them may have been lost, and the server refuses every
    # later one until the gap is filled. A delta merely in transit is then sent twice,
    # which the server ignores as a repeat.
    resend_from: int = 0

    @classmethod
    def start(cls, experiment: str, arm_names: tuple[str, ...]) -> DeviceLearner:
        """A device that has seen nothing and heard nothing from the server yet."""
        return cls(experiment, {name: ArmStats() for name in arm_names})


def total(*parts: Arms) -> dict[str, ArmStats]:
    """The arm-by-arm sum of several summaries (arms missing from one count as empty)."""
    out: dict[str, ArmStats] = {}
    for part in parts:
        for name, s in part.items():
            out[name] = out.get(name, ArmStats()) + s
    return out


# -- device side ---------------------------------------------------------------------------

def observe(learner: DeviceLearner, arm: str, reward: float) -> DeviceLearner:
    """The learner after one reward on ``arm`` (an arm the experiment declares)."""
    if arm not in learner.base:
        raise InvalidExperimentData(f"arm {arm!r} is not in experiment {learner.experiment!r} "
                                    f"(arms: {', '.join(sorted(learner.base))})")
    if not math.isfinite(reward):
        raise InvalidExperimentData(f"a reward must be a finite number, not {reward!r}")
    current = dict(learner.current)
    current[arm] = current.get(arm, ArmStats()).add(reward)
    return replace(learner, current=current)


def close_interval(learner: DeviceLearner, device: str) -> tuple[DeviceLearner, Delta | None]:
    """Close the open interval into the next delta to send (None if nothing was observed)."""
    if not any(s.n for s in learner.current.values()):
        return learner, None
    delta = Delta(learner.experiment, device, learner.next_seq, dict(learner.current))
    return replace(learner, pending=(*learner.pending, delta), current={},
                   next_seq=learner.next_seq + 1), delta


def receive(learner: DeviceLearner, merged: Merged) -> DeviceLearner:
    """Take a pushed posterior: newer than the one held replaces it, and the deltas it
    includes leave the local part; an older version changes nothing. Pending deltas that a
    newer or the same version does not include are marked to send again (take_resend)."""
    if merged.experiment != learner.experiment or merged.version < learner.base_version:
        return learner
    if merged.version == learner.base_version:
        # The same state again (the server's periodic push): it has applied nothing since,
        # so what is pending past its number has not reached it: send that again.
        lacking = [d.seq for d in learner.pending if d.seq > merged.applied_seq]
        return replace(learner, resend_from=lacking[0] if lacking else 0)
    pending = tuple(d for d in learner.pending if d.seq > merged.applied_seq)
    # The server applied numbers this device no longer has: its state was lost; continue
    # after them so that new deltas are not ignored as repeats.
    next_seq = max(learner.next_seq, merged.applied_seq + 1)
    return replace(learner, base=dict(merged.arms), base_version=merged.version,
                   base_applied_seq=merged.applied_seq, pending=pending, next_seq=next_seq,
                   resend_from=pending[0].seq if pending else 0)


def take_resend(learner: DeviceLearner, limit: int) -> tuple[DeviceLearner, tuple[Delta, ...]]:
    """The pending deltas to send again (at most ``limit``, oldest first, so that the
    server's gap fills in order), and the learner that remembers where to go on."""
    if not learner.resend_from:
        return learner, ()
    due = tuple(d for d in learner.pending if d.seq >= learner.resend_from)[:limit]
    rest = [d.seq for d in learner.pending if d.seq > (due[-1].seq if due else 0)]
    return replace(learner, resend_from=rest[0] if due and rest else 0), due


def local_posterior(learner: DeviceLearner) -> dict[str, ArmStats]:
    """What the device serves from: merged + own deltas not yet merged + the open interval."""
    return total(learner.base, *(d.arms for d in learner.pending), learner.current)


# -- server side ---------------------------------------------------------------------------

def apply_delta(state: FleetPosterior,
                delta: Delta) -> tuple[FleetPosterior, DeltaVerdict]:
    """Add a device's delta once. A repeat is ignored ("duplicate"); a skipped number raises
    OutOfOrderDelta (transient: the device resends from the gap); unknown arms raise
    InvalidExperimentData and change nothing."""
    if delta.experiment != state.experiment:
        raise InvalidExperimentData(f"delta for experiment {delta.experiment!r} given to "
                                    f"{state.experiment!r}")
    unknown = set(delta.arms) - set(state.arms)
    if unknown:
        raise InvalidExperimentData(f"delta from {delta.device!r} names arms not in "
                                    f"{state.experiment!r}: {', '.join(sorted(unknown))}")
    last = state.applied.get(delta.device, 0)
    if delta.seq <= last:
        return state, "duplicate"
    if delta.seq != last + 1:
        raise OutOfOrderDelta(f"delta {delta.seq} from {delta.device!r} arrived before "
                              f"{last + 1}; the device must resend from {last + 1}")
    applied = {**state.applied, delta.device: delta.seq}
    return replace(state, arms=total(state.arms, delta.arms), applied=applied,
                   version=state.version + 1), "applied"


def push_for(state: FleetPosterior, device: str) -> Merged:
    """The merged posterior to push to ``device``."""
    return Merged(state.experiment, state.version, dict(state.arms),
                  state.applied.get(device, 0))


# -- wire form -----------------------------------------------------------------------------

def encode_delta(delta: Delta) -> dict[str, Any]:
    """The JSON-ready form a device sends: arms as ``[n, sum, sum of squares]``."""
    return {"experiment": delta.experiment, "seq": delta.seq, "arms": _arms_json(delta.arms)}


def decode_delta(obj: object, device: str) -> Delta:
    """Parse and bound a delta received from ``device``; InvalidExperimentData if malformed."""
    if not isinstance(obj, dict):
        raise InvalidExperimentData("an experiment delta must be a JSON object")
    experiment, seq, arms = obj.get("experiment"), obj.get("seq"), obj.get("arms")
    if not isinstance(experiment, str) or not 0 < len(experiment) <= 128:
        raise InvalidExperimentData("delta 'experiment' must be a name of 1 to 128 characters")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**62:
        raise InvalidExperimentData(f"delta 'seq' must be a positive integer, not {seq!r}")
    if not isinstance(arms, dict) or not 0 < len(arms) <= MAX_ARMS:
        raise InvalidExperimentData(f"delta 'arms' must map 1 to {MAX_ARMS} arm names to "
                                    "[n, sum, sum_sq]")
    parsed: dict[str, ArmStats] = {}
    for name, value in arms.items():
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
            raise InvalidExperimentData(f"delta arm {name!r} must be [n, sum, sum_sq] numbers")
        n, s, sq = value
        if not isinstance(n, int) or not 0 <= n <= MAX_DELTA_COUNT:
            raise InvalidExperimentData(f"delta arm {name!r}: n must be an integer in 0.."
                                        f"{MAX_DELTA_COUNT}, not {n!r}")
        try:
            parsed[name] = ArmStats(n, float(s), float(sq))
        except ValueError as exc:
            raise InvalidExperimentData(f"delta arm {name!r}: {exc}") from exc
    return Delta(experiment, device, seq, parsed)


def learner_to_json(learner: DeviceLearner) -> dict[str, Any]:
    """The learner as the device persists it (so a restart loses nothing it counted)."""
    return {"experiment": learner.experiment, "base": _arms_json(learner.base),
            "base_version": learner.base_version, "base_applied_seq": learner.base_applied_seq,
            "pending": [encode_delta(d) for d in learner.pending],
            "current": _arms_json(learner.current), "next_seq": learner.next_seq}


def learner_from_json(obj: Any, device: str) -> DeviceLearner:
    """Read a persisted learner back; InvalidExperimentData if the file is damaged."""
    try:
        return DeviceLearner(
            experiment=str(obj["experiment"]), base=_arms_from(obj["base"]),
            base_version=int(obj["base_version"]),
            base_applied_seq=int(obj["base_applied_seq"]),
            pending=tuple(decode_delta(d, device) for d in obj["pending"]),
            current=_arms_from(obj["current"]), next_seq=int(obj["next_seq"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidExperimentData(f"saved experiment state is damaged ({exc!r}); delete it "
                                    "to start the experiment's local counts afresh") from exc


def _arms_json(arms: Arms) -> dict[str, list[float]]:
    return {name: [s.n, s.total, s.total_sq] for name, s in arms.items()}


def _arms_from(obj: Any) -> dict[str, ArmStats]:
    return {str(name): ArmStats(int(v[0]), float(v[1]), float(v[2])) for name, v in obj.items()}

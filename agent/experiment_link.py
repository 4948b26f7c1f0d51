"""The fleet's experiments, from MQTT to :class:`~agent.experiments.DeviceExperiments`.

The desired state declares the experiments this device takes part in
(:attr:`protocol.messages.Desired.experiments`): :meth:`ExperimentLink.follow` starts each
new or changed one, and stops those no longer declared, so the public model name is served
directly again. The server pushes each experiment's merged posterior, retained, on
``inbox/experiments/{experiment}`` (:data:`protocol.topics.EXPERIMENT_PUSH_LEAF`);
:meth:`ExperimentLink.on_push` hands it to the device's learner, which keeps the newest and
ignores older ones. An empty retained message means the experiment ended.

A declaration the agent cannot parse is skipped (the others still apply) and raised as a
ProtocolError once the rest is done, so the fleet link reports it like any bad message;
serving never stops over one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from experiments.errors import InvalidExperimentData
from experiments.posterior import Merged
from experiments.spec import ExperimentSpec, spec_from_json
from protocol.errors import ProtocolError
from protocol.experiment_messages import decode_posterior_push
from protocol.messages import Desired
from protocol.topics import EXPERIMENT_PUSH_LEAF
from stats.bandit import ArmStats

from .experiments import DeviceExperiments

__all__ = ["ExperimentLink"]

log = logging.getLogger(__name__)


class ExperimentLink:
    """Drives ``experiments`` from desired states and pushes; does nothing without one.

    ``topic(leaf)`` is the device's own topic of a leaf (the fleet link's)."""

    def __init__(self, experiments: DeviceExperiments | None,
                 topic: Callable[[str], str]) -> None:
        self.experiments = experiments
        self._prefix = topic(EXPERIMENT_PUSH_LEAF) + "/"
        self._running: dict[str, ExperimentSpec] = {}  # by public model name
        # The newest push of each experiment: a retained push may arrive before the desired
        # state that declares its experiment, and is given to it when it starts.
        self._pushes: dict[str, Merged] = {}

    def subscriptions(self) -> list[tuple[str, int]]:
        """The (topic filter, QoS) pairs to subscribe to on every connection."""
        return [] if self.experiments is None else [(self._prefix + "+", 1)]

    def follow(self, desired: Desired) -> None:
        """Start the declared experiments that are new or changed, stop the others.

        ProtocolError, after applying the rest, if a declaration does not parse."""
        if self.experiments is None:
            return
        declared: dict[str, ExperimentSpec] = {}
        bad = []
        for obj in desired.experiments:
            try:
                spec = spec_from_json(obj)
            except InvalidExperimentData as exc:
                bad.append(f"{obj.get('name')!r}: {exc}")
                continue
            declared[spec.model] = spec
        for model in [m for m in self._running if m not in declared]:
            log.info("experiment %s ended; serving %s directly",
                     self._running.pop(model).name, model)
            self.experiments.stop(model)
        for model, spec in declared.items():
            if self._running.get(model) != spec:
                self.experiments.stop(model)  # a changed one resumes its saved counts
                self.experiments.start(spec)
                if spec.name in self._pushes:
                    self.experiments.receive(self._pushes[spec.name])
                self._running[model] = spec
                log.info("experiment %s on %s: arms %s (%s, %s)", spec.name, model,
                         dict(spec.arms), spec.unit, spec.strategy)
        if bad:
            raise ProtocolError("experiment declaration(s) skipped: " + "; ".join(bad))

    def is_push(self, topic: str) -> bool:
        """Whether ``topic`` is one of this device's posterior pushes."""
        return self.experiments is not None and topic.startswith(self._prefix)

    def on_push(self, topic: str, payload: bytes) -> None:
        """Give a pushed posterior to its experiment's learner (ProtocolError if bad)."""
        if self.experiments is None:
            return
        if not payload:  # an ended experiment's push, cleared
            self._pushes.pop(topic.removeprefix(self._prefix), None)
            return
        push = decode_posterior_push(payload)
        if push.experiment != topic.removeprefix(self._prefix):
            raise ProtocolError(f"push of experiment {push.experiment!r} arrived on {topic}")
        merged = Merged(push.experiment, push.version,
                        {arm: ArmStats(n, total, total_sq) for arm, (n, total, total_sq)
                         in push.arms.items()}, push.applied_seq)
        held = self._pushes.get(merged.experiment)
        if held is None or merged.version > held.version:
            self._pushes[merged.experiment] = merged
        self.experiments.receive(merged)

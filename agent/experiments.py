"""The experiments this device takes part in, between the local API and the runtime.

For a model name under an experiment, :meth:`DeviceExperiments.infer` picks the arm
(``experiments.assign`` for splits, Thompson sampling on the local posterior for bandits),
runs the arm's installed model, and answers with a fresh response id remembered with the
arm and the predicted class. :meth:`DeviceExperiments.feedback` turns an app's report into
a reward on that arm (clipped to the experiment's reward range, which the always-valid
decision assumes). :meth:`DeviceExperiments.report` closes every experiment's interval into
deltas for telemetry; :meth:`DeviceExperiments.receive` takes the server's merged posterior.

Every learner is saved (atomically) after each change, so counts survive a restart and
nothing learnt offline is lost. Models outside any experiment pass straight through.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_atomic
from experiments.assign import device_arm, request_arm
from experiments.errors import InvalidExperimentData
from experiments.feedback import (
    ResponseLog,
    Served,
    new_response_id,
    parse_feedback,
    reward_of,
)
from experiments.posterior import (
    DeviceLearner,
    Merged,
    close_interval,
    encode_delta,
    learner_from_json,
    learner_to_json,
    local_posterior,
    observe,
    receive,
    take_resend,
)
from experiments.spec import ExperimentSpec
from stats.bandit import thompson_choose

from .runtime import Runtime

__all__ = ["DeviceExperiments"]

log = logging.getLogger(__name__)

# Pending deltas sent again per experiment and telemetry sample: with the new one, 4 per
# experiment, so 16 experiments (the desired state's limit) fit the server's 64 per sample.
RESEND_PER_REPORT = 3


class DeviceExperiments:
    """Arm choice, response ids, feedback and local learning for one device."""

    def __init__(self, device: str, state_dir: Path | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: np.random.Generator | None = None,
                 responses: ResponseLog | None = None) -> None:
        self.device = device
        self._dir = None if state_dir is None else state_dir / "experiments"
        self._clock = clock
        self._rng = rng or np.random.default_rng()
        self._responses = responses or ResponseLog()
        self._lock = threading.Lock()
        self._specs: dict[str, ExperimentSpec] = {}      # by public model name
        self._learners: dict[str, DeviceLearner] = {}    # by experiment name

    def start(self, spec: ExperimentSpec) -> None:
        """Take part in ``spec`` (resuming saved counts for it, if any)."""
        with self._lock:
            learner = self._load(spec) or DeviceLearner.start(spec.name, spec.arm_names)
            self._specs[spec.model] = spec
            self._learners[spec.name] = learner

    def stop(self, model: str) -> None:
        """Leave the experiment on ``model``; the model name is served directly again."""
        with self._lock:
            spec = self._specs.pop(model, None)
            if spec is not None:
                self._learners.pop(spec.name, None)

    def representative(self, model: str) -> str:
        """The installed model that stands for ``model`` in metadata and request checks:
        its experiment's first arm's model, or ``model`` itself outside any experiment."""
        spec = self._specs.get(model)
        return model if spec is None else spec.arms[0][1]

    def route(self, model: str, client_key: str | None = None) -> tuple[str | None, str]:
        """The arm (None outside any experiment) and the installed model to run for one
        request to ``model``."""
        spec = self._specs.get(model)
        if spec is None:
            return None, model
        arm = self._choose(spec, client_key)
        return arm, spec.served_model(arm)

    def record(self, model: str, arm: str | None, outputs: Mapping[str, np.ndarray],
               response_id: str | None = None) -> str:
        """Remember one answer of ``model`` (served by ``arm``) for feedback; its id.

        ``response_id`` is the request's own id when the app sent one (Open Inference
        Protocol: the answer repeats it); otherwise a fresh one is made.
        """
        response_id = response_id or new_response_id()
        with self._lock:
            predicted, classes = _predicted(outputs)
            self._responses.record(response_id, Served(model, arm, predicted, self._clock(),
                                                       classes))
        return response_id

    def infer(self, runtime: Runtime, model: str, inputs: Mapping[str, np.ndarray],
              client_key: str | None = None, response_id: str | None = None,
              ) -> tuple[dict[str, np.ndarray], str]:
        """Run ``model`` (through its experiment's arm, if any); outputs and a response id."""
        arm, served_model = self.route(model, client_key)
        outputs = runtime.infer(served_model, inputs)
        return outputs, self.record(model, arm, outputs, response_id)

    def feedback(self, model: str, body: bytes) -> float:
        """Learn from an app's outcome report; the reward learnt.

        InvalidExperimentData (the adapter's 400) for a malformed report, UnknownResponse
        (404) for an id not issued for ``model``, expired or already reported.
        """
        report = parse_feedback(body)
        with self._lock:
            served = self._responses.take(report.response_id, model, self._clock())
            try:
                reward = reward_of(report, served)
            except InvalidExperimentData:
                # A report that does not fit the answer does not use up its id.
                self._responses.record(report.response_id, served)
                raise
            spec = self._specs.get(model)
            if spec is not None and served.arm is not None:
                clipped = min(max(reward, spec.low), spec.high)
                learner = observe(self._learners[spec.name], served.arm, clipped)
                self._learners[spec.name] = learner
                self._save(learner)
        return reward

    def report(self) -> list[dict[str, Any]]:
        """Close every experiment's interval: the deltas to send with telemetry (saved
        first, so a delta that is lost in transit is still pending), preceded by pending
        ones a push showed the server lacks (at most RESEND_PER_REPORT per experiment, so
        that a long gap fills over a few samples without outgrowing one)."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for name, before in list(self._learners.items()):
                after, again = take_resend(before, RESEND_PER_REPORT)
                after, delta = close_interval(after, self.device)
                if after is not before:
                    self._learners[name] = after
                    self._save(after)
                out.extend(encode_delta(d) for d in (*again, *(() if delta is None
                                                               else (delta,))))
        return out

    def receive(self, merged: Merged) -> None:
        """Take the server's merged posterior for one experiment."""
        with self._lock:
            learner = self._learners.get(merged.experiment)
            if learner is not None:
                learner = receive(learner, merged)
                self._learners[merged.experiment] = learner
                self._save(learner)

    def posterior(self, experiment: str) -> DeviceLearner:
        """The learner of ``experiment`` (for status and tests)."""
        return self._learners[experiment]

    def _choose(self, spec: ExperimentSpec, client_key: str | None) -> str:
        if spec.unit == "device":
            return device_arm(spec.name, self.device, spec.split)
        # Under the lock: the API's threads share one random generator, and numpy's
        # generators are not thread-safe.
        with self._lock:
            if spec.strategy == "thompson":
                return thompson_choose(local_posterior(self._learners[spec.name]), self._rng,
                                       spec.family, low=spec.low, high=spec.high)
            return request_arm(spec.name, spec.split, self._rng, client_key)

    def _path(self, experiment: str) -> Path | None:
        return None if self._dir is None else self._dir / f"{experiment}.json"

    def _save(self, learner: DeviceLearner) -> None:
        path = self._path(learner.experiment)
        if path is not None:
            write_atomic(path, json.dumps(learner_to_json(learner)).encode())

    def _load(self, spec: ExperimentSpec) -> DeviceLearner | None:
        path = self._path(spec.name)
        if path is None or not path.is_file():
            return None
        try:
            learner = learner_from_json(json.loads(path.read_bytes()), self.device)
        except (ValueError, InvalidExperimentData) as exc:
            # Bad state never stops serving: start the counts afresh and say so.
            log.warning("experiment %s: %s; starting its local counts afresh", spec.name, exc)
            return None
        if set(learner.base) != set(spec.arm_names):
            log.warning("experiment %s: saved arms %s differ from %s; starting afresh",
                        spec.name, sorted(learner.base), list(spec.arm_names))
            return None
        return learner


def _predicted(outputs: Mapping[str, np.ndarray]) -> tuple[int | None, int | None]:
    """The predicted class of a single-row classification answer and the number of
    classes, else (None, None)."""
    first = next(iter(outputs.values()), None)
    if first is None or first.ndim != 2 or first.shape[0] != 1 or first.shape[1] < 2:
        return None, None
    return int(np.argmax(first[0])), int(first.shape[1])

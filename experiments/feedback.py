"""Outcome feedback: which served response an app's reward belongs to.

Every inference answer carries a fresh id; the agent remembers, for a bounded time and a
bounded number of ids, which model and arm served it and which class it predicted. An app
reports the outcome later with ``{"id": ..., "reward": number}`` or ``{"id": ...,
"label": class}`` (a label becomes reward 1 when it equals the predicted class, else 0).
Each id takes one report. The adapter (the agent's HTTP API) maps
:class:`~experiments.errors.InvalidExperimentData` to 400 and
:class:`~experiments.errors.UnknownResponse` to 404; the reward then goes to
``experiments.posterior.observe``.
"""

from __future__ import annotations

import json
import math
import secrets
from collections import OrderedDict
from dataclasses import dataclass

from experiments.errors import InvalidExperimentData, UnknownResponse

__all__ = ["Feedback", "ResponseLog", "Served", "new_response_id", "parse_feedback",
           "reward_of"]

MAX_BODY = 4096
MAX_ID = 64


@dataclass(frozen=True)
class Served:
    """What answered one request: the model name, the experiment arm (None outside an
    experiment), the predicted class (None if the output is not a classification) and how
    many classes there were."""

    model: str
    arm: str | None
    predicted: int | None
    at: float
    classes: int | None = None


@dataclass(frozen=True)
class Feedback:
    """One outcome report: a reward, or a label to compare with the prediction."""

    response_id: str
    reward: float | None
    label: int | None


def new_response_id() -> str:
    """A fresh, unguessable response id (96 random bits, hex)."""
    return secrets.token_hex(12)


class ResponseLog:
    """Recently served responses by id, at most ``capacity`` of them for ``ttl_s`` seconds.

    Not thread-safe; the adapter holds its lock around calls. The time is passed in.
    """

    def __init__(self, capacity: int = 100_000, ttl_s: float = 86_400.0) -> None:
        if capacity < 1 or not ttl_s > 0:
            raise InvalidExperimentData(f"a response log needs capacity >= 1 and ttl > 0, not "
                                        f"{capacity}, {ttl_s}")
        self.capacity, self.ttl_s = capacity, ttl_s
        self._served: OrderedDict[str, Served] = OrderedDict()

    def __len__(self) -> int:
        return len(self._served)

    def record(self, response_id: str, served: Served) -> None:
        """Remember one answer; the oldest is forgotten beyond the capacity."""
        self._served[response_id] = served
        self._served.move_to_end(response_id)
        while len(self._served) > self.capacity:
            self._served.popitem(last=False)

    def take(self, response_id: str, model: str, now: float) -> Served:
        """The answer ``response_id`` was, for feedback on ``model``; each id once.

        UnknownResponse when it was never issued for that model, expired or already used.
        """
        served = self._served.get(response_id)
        if served is not None and now - served.at > self.ttl_s:
            del self._served[response_id]
            served = None
        if served is not None and served.model != model:
            # Under an experiment the answer names the arm's model, but the outcome
            # belongs to the name the app asked for: say which.
            raise UnknownResponse(f"response {response_id!r} was answered under model "
                                  f"{served.model!r}: post its feedback to "
                                  f"/v2/models/{served.model}/feedback")
        if served is None:
            raise UnknownResponse(f"no response {response_id!r} of model {model!r} awaits "
                                  f"feedback: ids are kept {self.ttl_s:g} s, in memory (an "
                                  "agent restart forgets them), and take one report; send "
                                  "the id from the inference answer")
        del self._served[response_id]
        return served


def parse_feedback(body: bytes) -> Feedback:
    """Parse ``{"id": str, "reward": number}`` or ``{"id": str, "label": int}``."""
    if len(body) > MAX_BODY:
        raise InvalidExperimentData(f"feedback body is {len(body)} bytes; at most {MAX_BODY}")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidExperimentData(f"feedback must be a JSON object ({exc})") from exc
    if not isinstance(obj, dict):
        raise InvalidExperimentData('feedback must be a JSON object like {"id": ..., '
                                    '"reward": 1}')
    response_id = obj.get("id")
    if not isinstance(response_id, str) or not 0 < len(response_id) <= MAX_ID:
        raise InvalidExperimentData(f"feedback 'id' must be the response's id string (at most "
                                    f"{MAX_ID} characters)")
    reward, label = obj.get("reward"), obj.get("label")
    if (reward is None) == (label is None):
        raise InvalidExperimentData("feedback needs exactly one of 'reward' (a number) or "
                                    "'label' (the true class)")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)
                               or not math.isfinite(reward)):
        raise InvalidExperimentData(f"feedback 'reward' must be a finite number, not {reward!r}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise InvalidExperimentData(f"feedback 'label' must be a class index, not {label!r}")
    return Feedback(response_id, None if reward is None else float(reward), label)


def reward_of(feedback: Feedback, served: Served) -> float:
    """The reward to learn from: as reported, or 1/0 for a label equal to the prediction."""
    if feedback.reward is not None:
        return feedback.reward
    if served.predicted is None:
        raise InvalidExperimentData(f"model {served.model!r} did not answer with a class; "
                                    "report a 'reward' instead of a 'label'")
    if served.classes is not None and not 0 <= (feedback.label or 0) < served.classes:
        raise InvalidExperimentData(f"label {feedback.label} is not a class of model "
                                    f"{served.model!r}: give a class index 0 to "
                                    f"{served.classes - 1}")
    return 1.0 if feedback.label == served.predicted else 0.0

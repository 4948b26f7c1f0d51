"""The experiment payloads of the fleet protocol: the declarations a desired state carries
(:attr:`protocol.messages.Desired.experiments`) and the retained posterior push on
``inbox/experiments/{experiment}`` (docs/experiments.md, docs/transport.md). Encoded with
:func:`protocol.messages.encode`, like every JSON message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .fields import as_dict, dict_field, float_field, int_field, message_object
from .names import is_valid_name

__all__ = ["MAX_DESIRED_EXPERIMENTS", "MAX_EXPERIMENT_ARMS", "MAX_EXPERIMENT_BYTES",
           "MAX_PUSH_BYTES", "PosteriorPush", "decode_posterior_push",
           "experiment_declarations"]

#: Bounds on the experiments a desired state declares: how many, each one's JSON size, and
#: the arms of one experiment (as ``experiments.assign.MAX_ARMS``); and a push's size.
MAX_DESIRED_EXPERIMENTS = 16
MAX_EXPERIMENT_BYTES = 4 * 1024
MAX_EXPERIMENT_ARMS = 16
MAX_PUSH_BYTES = 16 * 1024


@dataclass(frozen=True)
class PosteriorPush:
    """The fleet's merged posterior of one experiment, as pushed to one device
    (``experiments.posterior.Merged``): per arm ``(n, sum, sum of squares)``; ``version``
    grows with every delta the server applies; ``applied_seq`` is the last of this
    device's own delta numbers included."""

    experiment: str
    version: int
    applied_seq: int
    arms: Mapping[str, tuple[int, float, float]]


def experiment_declarations(value: Any) -> tuple[dict[str, Any], ...]:
    """The desired state's experiment declarations: bounded JSON objects with valid,
    distinct ``name`` and ``model`` (one experiment per public model name)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_DESIRED_EXPERIMENTS:
        raise ProtocolError(f"experiments must be a list of at most "
                            f"{MAX_DESIRED_EXPERIMENTS} objects")
    names: set[str] = set()
    models: set[str] = set()
    for i, raw in enumerate(value):
        spec = as_dict(raw, f"experiments[{i}]")
        if len(json.dumps(spec, separators=(",", ":"))) > MAX_EXPERIMENT_BYTES:
            raise ProtocolError(f"experiments[{i}] exceeds {MAX_EXPERIMENT_BYTES} bytes")
        name, model = spec.get("name"), spec.get("model")
        if not is_valid_name(name) or not is_valid_name(model):
            raise ProtocolError(f"experiments[{i}] needs a valid 'name' and 'model', not "
                                f"{name!r}, {model!r}"[:200])
        if name in names or model in models:
            raise ProtocolError(f"experiments[{i}] repeats experiment {name!r} or model "
                                f"{model!r}: one experiment per name and per model")
        names.add(str(name))
        models.add(str(model))
    return tuple(value)


def decode_posterior_push(payload: bytes) -> PosteriorPush:
    """Parse a posterior push (``inbox/experiments/{experiment}``)."""
    obj = message_object(payload, "posterior push", MAX_PUSH_BYTES)
    experiment = obj.get("experiment")
    if not is_valid_name(experiment):
        raise ProtocolError(f"push 'experiment' {str(experiment)[:80]!r} is not a valid name")
    arms = dict_field(obj, "arms")
    if not 0 < len(arms) <= MAX_EXPERIMENT_ARMS:
        raise ProtocolError(f"push 'arms' must map 1 to {MAX_EXPERIMENT_ARMS} arms to "
                            "[n, sum, sum_sq]")
    parsed: dict[str, tuple[int, float, float]] = {}
    for arm, value in arms.items():
        if not isinstance(value, list) or len(value) != 3:
            raise ProtocolError(f"push arm {arm[:80]!r} must be [n, sum, sum_sq]")
        sums = dict(zip(("n", "sum", "sum_sq"), value, strict=True))
        if float_field(sums, "sum_sq") < 0.0:
            raise ProtocolError(f"push arm {arm[:80]!r}: sum_sq must not be negative")
        if not is_valid_name(arm):
            raise ProtocolError(f"push arm name {arm[:80]!r} is not valid")
        parsed[arm] = (int_field(sums, "n"), float_field(sums, "sum"), float_field(sums, "sum_sq"))
    return PosteriorPush(experiment=str(experiment), version=int_field(obj, "version"),
                         applied_seq=int_field(obj, "applied_seq"), arms=parsed)

"""An experiment's declaration, as the server stores it and a device receives it.

One public model name, two or more arms each served by a model the device has installed,
how units are assigned (``device``: one arm per device by hash; ``request``: per request,
sticky per client key when given), the strategy (``split``: a fixed split, the A/B test;
``thompson``: a bandit), and how rewards are read (range, direction, posterior family).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from experiments.assign import MAX_ARMS, check_split
from experiments.errors import InvalidExperimentData
from protocol.names import is_valid_name

__all__ = ["ExperimentSpec", "spec_from_json", "spec_to_json"]

Unit = Literal["device", "request"]
Strategy = Literal["split", "thompson"]


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiment; validated on construction."""

    name: str
    model: str
    arms: tuple[tuple[str, str], ...]          # (arm, served model name)
    split: tuple[tuple[str, float], ...]       # (arm, share); shares sum to 1
    unit: Unit = "device"
    strategy: Strategy = "split"
    low: float = 0.0
    high: float = 1.0
    higher_is_better: bool = True
    family: Literal["beta", "normal"] = "beta"

    def __post_init__(self) -> None:
        for what, value in (("experiment", self.name), ("model", self.model),
                            *(("arm", a) for a, _ in self.arms),
                            *(("served model", m) for _, m in self.arms)):
            if not is_valid_name(value):
                raise InvalidExperimentData(f"{what} name {value!r} is not valid (1 to 64 "
                                            "letters, digits, '.', '_', '-')")
        if not 2 <= len(self.arms) <= MAX_ARMS:
            raise InvalidExperimentData(f"an experiment needs 2 to {MAX_ARMS} arms, not "
                                        f"{len(self.arms)}")
        if [a for a, _ in self.split] != [a for a, _ in self.arms]:
            raise InvalidExperimentData("the split must give one share per arm, in arm order")
        check_split(self.split)
        if self.unit not in ("device", "request"):
            raise InvalidExperimentData(f"unit must be device or request, not {self.unit!r}")
        if self.strategy not in ("split", "thompson"):
            raise InvalidExperimentData(f"strategy must be split or thompson, not "
                                        f"{self.strategy!r}")
        if self.strategy == "thompson" and self.unit != "request":
            raise InvalidExperimentData("a Thompson bandit chooses per request: use "
                                        "--unit request")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise InvalidExperimentData(f"reward bounds need finite low < high, not "
                                        f"[{self.low}, {self.high}]")
        if self.family not in ("beta", "normal"):
            raise InvalidExperimentData(f"family must be beta or normal, not {self.family!r}")

    @property
    def arm_names(self) -> tuple[str, ...]:
        """The arms in declaration order."""
        return tuple(a for a, _ in self.arms)

    def served_model(self, arm: str) -> str:
        """The installed model that serves ``arm``."""
        return dict(self.arms)[arm]


def spec_to_json(spec: ExperimentSpec) -> dict[str, Any]:
    """The JSON form (desired state, registry)."""
    return {"name": spec.name, "model": spec.model,
            "arms": [{"arm": a, "model": m, "share": w}
                     for (a, m), (_, w) in zip(spec.arms, spec.split, strict=True)],
            "unit": spec.unit, "strategy": spec.strategy, "low": spec.low, "high": spec.high,
            "higher_is_better": spec.higher_is_better, "family": spec.family}


def spec_from_json(obj: Any) -> ExperimentSpec:
    """Parse the JSON form; InvalidExperimentData names what is wrong."""
    if not isinstance(obj, dict):
        raise InvalidExperimentData("an experiment must be a JSON object")
    arms = obj.get("arms")
    if not isinstance(arms, list) or not 0 < len(arms) <= MAX_ARMS or not all(
            isinstance(a, dict) and isinstance(a.get("arm"), str)
            and isinstance(a.get("model"), str) and _number(a.get("share", 1.0)) for a in arms):
        raise InvalidExperimentData(f"experiment 'arms' must list 2 to {MAX_ARMS} objects "
                                    '{"arm": name, "model": name, "share": number}')
    for key in ("name", "model", "unit", "strategy", "family"):
        if not isinstance(obj.get(key, ""), str):
            raise InvalidExperimentData(f"experiment {key!r} must be a string")
    for key in ("low", "high"):
        if not _number(obj.get(key, 0.0)):
            raise InvalidExperimentData(f"experiment {key!r} must be a number")
    if not isinstance(obj.get("higher_is_better", True), bool):
        raise InvalidExperimentData("experiment 'higher_is_better' must be true or false")
    return ExperimentSpec(
        name=obj.get("name", ""), model=obj.get("model", ""),
        arms=tuple((a["arm"], a["model"]) for a in arms),
        split=tuple((a["arm"], float(a.get("share", 1.0))) for a in arms),
        unit=obj.get("unit", "device"), strategy=obj.get("strategy", "split"),
        low=float(obj.get("low", 0.0)), high=float(obj.get("high", 1.0)),
        higher_is_better=obj.get("higher_is_better", True), family=obj.get("family", "beta"))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

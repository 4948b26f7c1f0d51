"""A bundle's optional declaration that one model name is served by several members.

Carried in the manifest's ``composite`` field (absent in ordinary bundles, whose bytes do
not change). Two kinds:

- ``ensemble``: every member runs; ``combiner`` is ``mean`` (of probabilities), ``weighted``
  (``weights``, one per member) or ``vote`` (majority of top classes).
- ``cascade``: exactly two members, cheap first; the expensive one runs only for requests
  whose cheap top probability is at or below ``threshold``.

Members name artifacts of the same bundle (``artifacts/<file>``); all take the same inputs
and give the same outputs. ``output`` is the output holding class scores and ``scores``
says whether they are ``logits`` (softmaxed before combining) or ``probabilities``; the
composite answers with probabilities under that output's name. The arithmetic is in
``experiments.composite``; this module is the data model and its strict parser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import MalformedBundleError

__all__ = ["CompositeDecl", "composite_from_obj", "composite_to_obj"]

MAX_MEMBERS = 8
KINDS = ("ensemble", "cascade")
COMBINERS = ("mean", "weighted", "vote")
SCORES = ("logits", "probabilities")


@dataclass(frozen=True)
class CompositeDecl:
    """One model name served by several member artifacts of the bundle."""

    kind: str
    members: tuple[str, ...]
    output: str
    scores: str = "logits"
    combiner: str | None = None
    weights: tuple[float, ...] | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        _check(len(set(self.members)) == len(self.members), "members", "must differ")
        _check(self.scores in SCORES, "scores", f"must be one of {', '.join(SCORES)}")
        _check(0 < len(self.output) <= 128, "output", "must name the class-score output")
        if self.kind == "ensemble":
            _check(2 <= len(self.members) <= MAX_MEMBERS, "members",
                   f"an ensemble needs 2 to {MAX_MEMBERS} members")
            _check(self.combiner in COMBINERS, "combiner",
                   f"an ensemble needs one of {', '.join(COMBINERS)}")
            _check(self.threshold is None, "threshold", "only a cascade has a threshold")
            if self.combiner == "weighted":
                _check(self.weights is not None and len(self.weights) == len(self.members)
                       and all(math.isfinite(w) and w >= 0 for w in self.weights)
                       and sum(self.weights) > 0, "weights",
                       "need one non-negative weight per member with a positive sum")
            else:
                _check(self.weights is None, "weights", "only a weighted ensemble has weights")
        else:
            _check(len(self.members) == 2, "members",
                   "a cascade has two members: the cheap one, then the expensive one")
            _check(self.threshold is not None and 0.0 <= self.threshold <= 1.0, "threshold",
                   "a cascade needs a threshold in [0, 1]")
            _check(self.combiner is None and self.weights is None, "combiner",
                   "a cascade has no combiner or weights")

    def check_members(self, artifact_paths: set[str]) -> None:
        """Raise MalformedBundleError unless every member is an artifact of the bundle."""
        missing = [m for m in self.members if m not in artifact_paths]
        _check(not missing, "members", f"{', '.join(missing)} not among the bundle's artifacts")


def composite_to_obj(decl: CompositeDecl) -> dict[str, Any]:
    """The JSON form in the manifest (unset optional fields omitted)."""
    obj: dict[str, Any] = {"kind": decl.kind, "members": list(decl.members),
                           "output": decl.output, "scores": decl.scores}
    if decl.combiner is not None:
        obj["combiner"] = decl.combiner
    if decl.weights is not None:
        obj["weights"] = list(decl.weights)
    if decl.threshold is not None:
        obj["threshold"] = decl.threshold
    return obj


def composite_from_obj(obj: Any) -> CompositeDecl:
    """Parse the manifest's ``composite`` object; MalformedBundleError names what is wrong."""
    _check(isinstance(obj, dict), "", "must be a JSON object")
    members = obj.get("members")
    _check(isinstance(members, list) and 0 < len(members) <= MAX_MEMBERS
           and all(isinstance(m, str) for m in members), "members",
           f"must be a list of 1 to {MAX_MEMBERS} artifact paths")
    for key in ("kind", "output", "scores", "combiner"):
        _check(obj.get(key) is None or isinstance(obj.get(key), str), key, "must be a string")
    weights = obj.get("weights")
    _check(weights is None or (isinstance(weights, list) and len(weights) <= MAX_MEMBERS
                               and all(_number(w) for w in weights)), "weights",
           "must be a list of numbers")
    threshold = obj.get("threshold")
    _check(threshold is None or _number(threshold), "threshold", "must be a number")
    return CompositeDecl(
        kind=str(obj.get("kind")), members=tuple(members), output=str(obj.get("output") or ""),
        scores=str(obj.get("scores", "logits")), combiner=obj.get("combiner"),
        weights=None if weights is None else tuple(float(w) for w in weights),
        threshold=None if threshold is None else float(threshold))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        where = f"composite.{key}" if key else "composite"
        raise MalformedBundleError(f"manifest field {where!r}: {what}; rebuild the bundle")

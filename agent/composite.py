"""A composite model (ensemble or cascade) served as one session from member sessions.

The runtime serves :class:`agent.sessions.Session` objects behind :class:`ServedModel`;
a :class:`CompositeSession` is one more session, so request figures, probation, hot-swap
and the local API treat a composite like any model. What it does per request is decided by
``experiments.composite`` (pure); the declaration is the bundle's ``composite`` field
(``bundle.composite.CompositeDecl``).

- Ensemble: every member runs on the whole batch (members after the first on a thread of
  their own, so onnxruntime, which releases the GIL, runs them at the same time); the
  combiner merges their probabilities.
- Cascade: the cheap member runs on the whole batch; only the rows it is unsure of are
  sliced out and sent to the expensive one.

The composite answers every output of the members; the class-score output holds the
combined probabilities, the others come from the first member (the cheap one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from bundle.composite import CompositeDecl
from experiments.composite import cascade, combine, needs_expensive, probabilities

from .errors import ModelLoadError
from .served_model import ServedModel
from .sessions import Session

if TYPE_CHECKING:  # the runtime serves composites from installed bundles: it imports us
    from .runtime import Runtime

__all__ = ["CompositeSession", "serve_composite"]


class CompositeSession:
    """Members run as one session, per the declaration."""

    def __init__(self, decl: CompositeDecl, members: Sequence[Session]) -> None:
        if len(members) != len(decl.members):
            raise ModelLoadError(f"composite declares {len(decl.members)} members, "
                                 f"{len(members)} were loaded")
        first = members[0]
        signature = ([(t.name, t.dtype) for t in first.inputs],
                     [t.name for t in first.outputs])
        for i, member in enumerate(members[1:], 1):
            other = ([(t.name, t.dtype) for t in member.inputs], [t.name for t in member.outputs])
            if other != signature:
                raise ModelLoadError(f"composite member {decl.members[i]} has inputs/outputs "
                                     f"{other}, the first member {signature}; members must share "
                                     "one signature")
        if decl.output not in signature[1]:
            raise ModelLoadError(f"composite output {decl.output!r} is not an output of the "
                                 f"members ({', '.join(signature[1])})")
        self.decl = decl
        self.members = tuple(members)
        self.inputs = first.inputs
        self.outputs = first.outputs
        self.backend = f"composite:{decl.kind}(" + ", ".join(m.backend for m in members) + ")"
        self.fallback = next((m.fallback for m in members if m.fallback), None)
        # Where the members run, each device once in member order (e.g. "cpu" or "cpu+NPU").
        self.device = "+".join(dict.fromkeys(m.device for m in members))
        self._index = signature[1].index(decl.output)
        self._pool = (ThreadPoolExecutor(len(members) - 1, thread_name_prefix="ensemble")
                      if decl.kind == "ensemble" else None)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs in ``outputs`` order, the class-score output combined."""
        if self._pool is not None:
            return self._ensemble(feeds)
        return self._cascade(feeds)

    def _scores(self, outputs: list[np.ndarray]) -> np.ndarray:
        return probabilities(outputs[self._index], self.decl.scores)  # type: ignore[arg-type]

    def _ensemble(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        assert self._pool is not None
        others = [self._pool.submit(m.run, feeds) for m in self.members[1:]]
        first = self.members[0].run(feeds)
        answers = [first, *(f.result() for f in others)]
        combined = combine([self._scores(a) for a in answers],
                           self.decl.combiner,  # type: ignore[arg-type]
                           self.decl.weights)
        first[self._index] = combined.astype(first[self._index].dtype, copy=False)
        return first

    def _cascade(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cheap_out = self.members[0].run(feeds)
        cheap = self._scores(cheap_out)
        assert self.decl.threshold is not None
        mask = needs_expensive(cheap, self.decl.threshold)
        if mask.any():
            rows = {name: value[mask] for name, value in feeds.items()}
            expensive = self._scores(self.members[1].run(rows))
            cheap = cascade(cheap, expensive.astype(cheap.dtype, copy=False), mask)
        cheap_out[self._index] = cheap.astype(cheap_out[self._index].dtype, copy=False)
        return cheap_out


def serve_composite(runtime: Runtime, name: str, decl: CompositeDecl,
                    member_names: Sequence[str]) -> ServedModel:
    """Serve ``name`` as the composite of models the runtime already serves (by name, in the
    declaration's member order), with the runtime's usual atomic swap."""
    sessions = [runtime.served(m).session for m in member_names]
    served = ServedModel(name, None, CompositeSession(decl, sessions),
                         f"{decl.kind} of {', '.join(member_names)}")
    runtime.swap(name, served)
    return served

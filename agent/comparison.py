"""A second model run on a share of live requests and compared with the served answers.

Rollouts need to know whether a candidate answers like the model it would replace before
anyone depends on it (issue 14): a **shadow** candidate is loaded beside the served model
and never serves; after an install the **previous** version stays loaded (blue-green) and
is compared with the new one. Both are a :class:`Comparison`, a
:class:`~agent.side_runner.SideTask`: on the side runner's thread it runs its model on the
sampled request's inputs, times it and compares the first compared output with what the
served model answered, with :mod:`stats.outputs`' kernels (top-1 agreement for a
classifier's scores, cosine similarity otherwise; :func:`comparison_report` turns the
tallies into the telemetry entry, docs/telemetry.md).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from stats.outputs import AGREE_COSINE, confidence, cosine_similarity, top1_agreement

from .sessions import Session
from .side_process import run_many
from .side_runner import Request, batch_size

__all__ = ["COMPARE_BATCH", "Candidate", "Comparison", "Tally", "compared_output",
           "comparison_report"]

#: Sampled requests handed to a comparison together (fewer for large tensors:
#: :func:`~agent.side_runner.batch_size`): each wake-up of the side thread contends for the
#: GIL with the request threads, which shows in their p99 (docs/benchmarks.md, shadow).
COMPARE_BATCH = 16
# Latencies kept per interval for p50/p99: enough for a p99, bounded.
_KEEP_LATENCIES = 1024


@dataclass
class Tally:
    """One interval's counters of a comparison (all per interval)."""

    requests: int = 0
    errors: int = 0
    dropped: int = 0
    n: int = 0  # compared samples (rows)
    agree: int = 0
    score_sum: float = 0.0  # sum of per-row agreement (0/1) or cosine
    confidence_diff_sum: float = 0.0  # candidate minus served, classifier rows only
    confidence_rows: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP_LATENCIES))


def comparison_report(version: int | None, metric: str, tally: Tally) -> dict[str, Any]:
    """The ``shadow`` / ``previous`` entry of a telemetry sample from one interval's tally."""
    latencies = np.array(tally.latencies_ms)
    p50, p99 = (np.percentile(latencies, [50, 99]) if len(latencies) else (None, None))
    return {
        "version": version, "requests": tally.requests, "errors": tally.errors,
        "dropped": tally.dropped,
        "p50_ms": None if p50 is None else round(float(p50), 3),
        "p99_ms": None if p99 is None else round(float(p99), 3),
        "agreement": {"metric": metric, "n": tally.n, "agree": tally.agree,
                      "mean": round(tally.score_sum / tally.n, 6) if tally.n else None},
        "confidence_shift": (round(tally.confidence_diff_sum / tally.confidence_rows, 6)
                             if tally.confidence_rows else None)}


class Candidate(Protocol):
    """What a comparison runs: a loaded model version."""

    version: int | None
    session: Session


class Comparison:
    """Runs ``model`` on sampled requests and compares its output at ``position`` with the
    served model's output ``output``.

    ``metric`` is ``top1`` (classifier scores) or ``cosine``. Thread-safe.
    """

    def __init__(self, role: str, model: Candidate, output: str, position: int,
                 metric: str, *, request_bytes: int = 0, session: Session | None = None,
                 ) -> None:
        self.role = role
        self.model = model
        self.version = model.version
        #: What runs the compared model: its own session unless another is given (the same
        #: file in a side process, :class:`~agent.side_process.MovingSession`).
        self.session = model.session if session is None else session
        self.output = output
        self.position = position
        self.metric = metric
        #: Requests handed over together (:class:`~agent.side_runner.SideTask`).
        self.batch = batch_size(request_bytes, COMPARE_BATCH)
        self._lock = threading.Lock()
        self._tally = Tally()

    def handle(self, requests: Sequence[Request]) -> None:
        """Run the candidate on each request's inputs (in one round trip when it runs in a
        side process), then compare its answers with the served ones all at once (the
        kernels' cost per call is paid once per batch)."""
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        latencies, errors = [], 0
        results = run_many(self.session, [inputs for inputs, _ in requests])
        for (_, outputs), (answers, _, took_ms) in zip(requests, results, strict=True):
            served = outputs.get(self.output)
            if answers is None:  # the candidate's fault, counted: it never reaches an app
                errors += 1
                continue
            latencies.append(took_ms)
            answer = answers[self.position] if self.position < len(answers) else None
            if (served is None or answer is None or answer.shape != served.shape
                    or answer.size == 0):
                errors += 1  # an answer that cannot be compared is a wrong answer
                continue
            pairs.append((answer, served))
        figures = self._compare(pairs) if pairs else (0, 0, 0.0, 0.0, 0)
        with self._lock:
            tally = self._tally
            tally.requests += len(requests)
            tally.errors += errors
            tally.latencies_ms.extend(latencies)
            n, agree, score, conf_diff, conf_rows = figures
            tally.n += n
            tally.agree += agree
            tally.score_sum += score
            tally.confidence_diff_sum += conf_diff
            tally.confidence_rows += conf_rows

    def _compare(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                 ) -> tuple[int, int, float, float, int]:
        """(rows, rows that agree, sum of agreement, sum of confidence differences,
        classifier rows) over ``pairs`` of (candidate, served) answers of one shape each."""
        rows = [(c[None], s[None]) if c.ndim < 2 else (c, s) for c, s in pairs]
        if len({c.shape[1:] for c, _ in rows}) > 1:  # shapes vary by request: one by one
            totals = [self._compare([pair]) for pair in pairs]
            return (sum(t[0] for t in totals), sum(t[1] for t in totals),
                    sum(t[2] for t in totals), sum(t[3] for t in totals),
                    sum(t[4] for t in totals))
        candidate = np.concatenate([c for c, _ in rows])
        served = np.concatenate([s for _, s in rows])
        if self.metric == "top1":
            same = top1_agreement(candidate, served)
            diff = float(np.sum(confidence(candidate) - confidence(served)))
            return len(same), int(same.sum()), float(same.sum()), diff, len(same)
        cosine = cosine_similarity(candidate, served)
        return (len(cosine), int(np.count_nonzero(cosine >= AGREE_COSINE)),
                float(cosine.sum()), 0.0, 0)

    def dropped(self, count: int) -> None:
        """Sampled requests that found the side runner busy."""
        with self._lock:
            self._tally.dropped += count

    def report(self) -> dict[str, Any]:
        """This interval's entry; the counters restart from zero."""
        with self._lock:
            tally, self._tally = self._tally, Tally()
        return comparison_report(self.version, self.metric, tally)


def compared_output(kinds: Sequence[tuple[str, str]]) -> tuple[str, int, str]:
    """Which output a comparison judges, from the served model's (name, kind) outputs:
    the first classifier output (``top1``), else the first output (``cosine``)."""
    for position, (name, kind) in enumerate(kinds):
        if kind == "classes":
            return name, position, "top1"
    name = kinds[0][0] if kinds else ""
    return name, 0, "cosine"

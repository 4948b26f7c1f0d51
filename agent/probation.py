"""Probation: after a swap, is the new model healthy enough to keep? A pure judgement."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProbationPolicy", "Verdict", "judge"]


@dataclass(frozen=True)
class ProbationPolicy:
    """Thresholds for rolling back a freshly activated model."""

    window_s: float = 60.0  # how long the new model is watched before it is committed
    min_requests: int = 20  # fewer requests than this say nothing about rates or p99
    max_error_rate: float = 0.05
    max_latency_ratio: float = 2.0  # new p99 over the previous model's p99
    # Absolute slack so a sub-millisecond model is not rolled back for scheduler noise: on a
    # busy device a request preempted once waits a scheduler slice (milliseconds), and the
    # old model's p99 was taken at another time. 1 ms rolled back a good 0.75 ms model at
    # 1.86 ms on a loaded 2-core machine (fleet demo).
    latency_slack_ms: float = 5.0
    # A p99 over fewer latencies is dominated by the swap's own hiccup (warm caches, the
    # loader thread): judge latency only on this many samples or more.
    min_latency_samples: int = 200


@dataclass(frozen=True)
class Verdict:
    """``commit``, ``roll_back`` or ``wait``, and why."""

    decision: str
    reason: str


def judge(policy: ProbationPolicy, elapsed_s: float, *, requests: int, errors: int,
          p99_ms: float | None, baseline_p99_ms: float | None,
          latency_samples: int = 0, final: bool = False) -> Verdict:
    """The verdict on a model after ``elapsed_s`` of probation with these request figures.

    ``baseline_p99_ms`` is the previous model's p99 (None when it had too little traffic to
    tell, which skips the latency check); ``p99_ms`` is measured over ``latency_samples``.
    Breaches roll back as soon as there are enough requests to judge; a model with no breach
    is committed when the window ends, traffic or not: it already passed its self-test, and
    a device whose apps are idle must not keep an install open for ever. The reason then
    says plainly that the model was not exercised (no requests) or too little to judge
    (fewer than ``min_requests``), so the fleet does not read it as a health check passed.
    ``final``: the window is over now whatever ``elapsed_s`` (a newer version replaces it).
    """
    if requests >= policy.min_requests:
        rate = errors / requests
        if rate > policy.max_error_rate:
            return Verdict("roll_back", f"error rate {rate:.1%} over {policy.max_error_rate:.1%} "
                           f"({errors} of {requests} requests failed)")
        if (p99_ms is not None and baseline_p99_ms is not None
                and latency_samples >= policy.min_latency_samples):
            limit = max(baseline_p99_ms * policy.max_latency_ratio,
                        baseline_p99_ms + policy.latency_slack_ms)
            if p99_ms > limit:
                return Verdict("roll_back", f"p99 latency {p99_ms:.2f} ms over the limit "
                               f"{limit:.2f} ms (previous model {baseline_p99_ms:.2f} ms)")
    if elapsed_s >= policy.window_s or final:
        watched = f"{elapsed_s:.0f} s"
        if requests == 0:
            return Verdict("commit", f"not exercised: no requests in {watched} of "
                           "probation; committed on its self-test alone")
        if requests < policy.min_requests:
            return Verdict("commit", f"barely exercised: {requests} requests ({errors} "
                           f"errors) in {watched}, fewer than the {policy.min_requests} "
                           "needed to judge; committed on its self-test")
        p99 = "n/a" if p99_ms is None else f"{p99_ms:.2f} ms"
        return Verdict("commit", f"healthy for {watched}: {requests} requests, "
                       f"{errors} errors, p99 {p99}")
    return Verdict("wait", f"{elapsed_s:.1f} of {policy.window_s:g} s")

"""A model being served under a name: its session, identity and request figures.

:class:`ServedModel` is what the :class:`~agent.runtime.Runtime`'s name -> model table
holds and what a request runs on; :class:`RequestStats` counts its requests (thread-safe,
read by the API's statistics and by telemetry); :class:`ModelInfo` is what the API says
about it. :func:`self_test` runs a bundle's golden samples on a session before it may
serve.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bundle.manifest import Manifest

from .errors import AgentError, InstallError, InvalidInputError
from .model_store import StoredModel
from .monitor import ModelMonitor, MonitorPlan, monitor_plan
from .sessions import Session, TensorInfo
from .side_runner import SideChannel
from .tensors import check_feeds, from_manifest_tensor

__all__ = ["ModelInfo", "RequestStats", "ServedModel", "StatTotals", "request_bytes",
           "self_test"]


@dataclass(frozen=True)
class ModelInfo:
    """What is known about one served model (the API's model metadata)."""

    name: str
    version: int | None  # None for a model file served without a bundle
    backend: str
    fallback: str | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    source: str
    state: str  # "serving" or "probation"
    device: str = "cpu"  # what actually runs it (Session.device)


@dataclass(frozen=True)
class StatTotals:
    """A model's cumulative figures since it was loaded (the statistics extension's)."""

    successes: int
    failures: int
    success_s: float  # summed run time of the successful requests
    failure_s: float
    last_at: float | None  # wall-clock time (epoch seconds) of the last request, if any


class RequestStats:
    """Counts and recent latencies of one loaded model; thread-safe."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._success_s = 0.0
        self._failure_s = 0.0
        # perf_counter() of the last request's end; turned into wall-clock time when read,
        # so the hot path pays for one clock, not two.
        self._last: float | None = None
        self._latencies: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float, end: float) -> None:
        """A successful request that took ``seconds`` and ended at perf_counter() ``end``."""
        with self._lock:
            self.requests += 1
            self._success_s += seconds
            self._last = end
            self._latencies.append(seconds)

    def record_error(self, seconds: float, end: float) -> None:
        """A failed request that took ``seconds`` and ended at perf_counter() ``end``."""
        with self._lock:
            self.requests += 1
            self.errors += 1
            self._failure_s += seconds
            self._last = end

    def read(self) -> tuple[int, int, tuple[float, ...]]:
        """Requests, errors and the recent latencies (seconds), read together so they agree."""
        with self._lock:
            return self.requests, self.errors, tuple(self._latencies)

    def totals(self) -> StatTotals:
        """The cumulative figures, read together."""
        with self._lock:
            last = self._last
            totals = StatTotals(self.requests - self.errors, self.errors, self._success_s,
                                self._failure_s, None)
        if last is None:
            return totals
        return replace(totals, last_at=time.time() - (time.perf_counter() - last))

    def snapshot(self) -> dict[str, Any]:
        """Requests, errors and p50/p99 in milliseconds (None without samples)."""
        with self._lock:
            latencies = np.array(self._latencies)
            requests, errors = self.requests, self.errors
        p50, p99 = (np.percentile(latencies, [50, 99]) * 1e3 if len(latencies)
                    else (None, None))
        return {"requests": requests, "errors": errors, "samples": len(latencies),
                "p50_ms": None if p50 is None else float(p50),
                "p99_ms": None if p99 is None else float(p99)}


class ServedModel:
    """A loaded model under a name: one session, its identity and its request figures."""

    def __init__(self, name: str, version: int | None, session: Session, source: str,
                 stored: StoredModel | None = None) -> None:
        self.name = name
        self.version = version
        self.session = session
        self.source = source
        self.stored = stored
        self.stats = RequestStats()
        self.output_names = [o.name for o in session.outputs]
        baseline = stored.manifest.baseline if stored is not None else {}
        #: What the monitor counts, from the bundle's baseline (outputs' kinds besides).
        self.plan: MonitorPlan = monitor_plan(baseline, session.inputs, session.outputs)
        #: This version's sampled statistics; None while monitoring is off.
        self.monitor: ModelMonitor | None = None
        #: Hands sampled requests to the watchers; None when nothing watches.
        self.side: SideChannel | None = None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request. The runtime checks the feeds; ours are checked only on failure,
        to explain it, which keeps the successful path as short as a bare session call."""
        start = time.perf_counter()
        try:
            outputs = self.session.run(inputs)
        except Exception as exc:  # whatever the runtime raises, explain it
            problem = check_feeds(self.session.inputs, inputs)
            if problem is not None:
                raise InvalidInputError(f"model {self.name}: {problem}") from None
            end = time.perf_counter()
            self.stats.record_error(end - start, end)
            raise AgentError(f"model {self.name} v{self.version}: inference failed "
                             f"({exc})") from exc
        end = time.perf_counter()
        self.stats.record(end - start, end)
        result = dict(zip(self.output_names, outputs, strict=True))
        side = self.side
        if side is not None:
            side.offer(inputs, result)
        return result

    @property
    def figures(self) -> dict[str, Any]:
        """Requests, errors, latency samples and p50/p99 (ms) so far."""
        return self.stats.snapshot()

    def info(self, state: str) -> ModelInfo:
        """What the API says about this model, in ``state``."""
        return ModelInfo(self.name, self.version, self.session.backend, self.session.fallback,
                         self.session.inputs, self.session.outputs, self.source, state,
                         self.session.device)


def request_bytes(session: Session) -> int:
    """About how many bytes one request's tensors take (dynamic dimensions counted as 1)."""
    total = 0
    for info in (*session.inputs, *session.outputs):
        elements = 1
        for dim in info.shape:
            elements *= dim or 1
        try:
            total += elements * np.dtype(info.dtype).itemsize
        except TypeError:
            total += elements * 8  # a dtype numpy does not name: guess wide
    return total


def self_test(session: Session, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """Run the manifest's golden cases; raises InstallError on a mismatch. Returns the first
    case's feeds, for warm-up."""
    first = None
    for number, case in enumerate(manifest.self_test, 1):
        feeds = {name: from_manifest_tensor(t) for name, t in case.inputs.items()}
        try:
            outputs = session.run(feeds)
        except Exception as exc:
            raise InstallError("self_test_failed", f"{manifest.name} v{manifest.version}: "
                               f"self-test case {number} did not run ({exc})") from exc
        names = [o.name for o in session.outputs]
        for position, (name, tensor) in enumerate(case.expected_outputs.items()):
            # A converted artifact may rename outputs (TFLite's Identity); order is kept.
            got = outputs[names.index(name) if name in names else position]
            expected = from_manifest_tensor(tensor)
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=case.rtol,
                                                               atol=case.atol):
                deviation = (float(np.max(np.abs(got - expected)))
                             if got.shape == expected.shape else float("inf"))
                raise InstallError("self_test_failed", f"{manifest.name} v{manifest.version}: "
                                   f"self-test case {number} output {name} deviates by "
                                   f"{deviation:.3g} (tolerance {case.atol:g}); the artifact "
                                   "does not compute what was signed off")
        first = first or feeds
    return first

"""Telemetry: what a sample holds, and the thread that takes one every interval.

:class:`TelemetryCollector` builds one sample's metrics from a :class:`~agent.runtime.Runtime`
and the system: it reads and remembers, while the arithmetic (deltas across model swaps,
histograms, rounding) is :mod:`agent.metrics`' and psutil is :mod:`agent.system_probe`'s.
:class:`TelemetrySampler` calls a collector on its own schedule, on its own thread, and
stores each sample in the durable :class:`~agent.outbox.Outbox`; publishing happens
elsewhere (:mod:`agent.publisher`), so neither a slow or half-open broker link nor an
install can hold a sample up. A sample that is due and not stored (the sampler was held up,
collecting failed, the disk is full) is counted as dropped, durably, and announced by the
next one::

    outbox = Outbox.open_in(state_dir)
    sampler = TelemetrySampler(TelemetryCollector(runtime), outbox, interval_s=30)
    sampler.start()        # ... sampler.stop()
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from common.periodic import Periodic
from protocol.messages import Telemetry

from .errors import ModelNotFoundError
from .loss_counter import Tally
from .metrics import (
    DEFAULT_BUCKETS_MS,
    Counts,
    ModelReading,
    SystemReading,
    counter_delta,
    model_metrics,
    new_latencies,
    system_metrics,
)
from .outbox import Outbox, OutboxError
from .system_probe import SystemProbe

if TYPE_CHECKING:
    from .runtime import RequestStats, Runtime

__all__ = ["TelemetryCollector", "TelemetrySampler", "TelemetrySource", "next_slot"]

log = logging.getLogger(__name__)


class TelemetrySource(Protocol):
    """Where a sample's metrics come from (a :class:`TelemetryCollector`)."""

    def collect(self) -> Mapping[str, Any]:
        """The metrics of one sample, as a JSON object."""
        ...


def next_slot(due: float, now: float, interval_s: float) -> tuple[int, float]:
    """The sampling schedule: a sample was due at ``due`` and is taken at ``now``.

    Returns how many slots after ``due`` passed as well (samples missed: the sampler was
    held up for that long) and when the next one is due. Slots stay on the grid
    ``due + k * interval_s``, so a late sample does not shift the ones after it.
    """
    missed = max(0, math.floor((now - due) / interval_s))
    return missed, due + (missed + 1) * interval_s


def _read_stats(stats: RequestStats) -> tuple[Counts, Sequence[float]]:
    """Counters and recent latencies (seconds) read together, so they agree."""
    requests, errors, latencies = stats.read()
    return Counts(requests, errors), latencies


class TelemetryCollector:
    """Builds the metrics of one sample from a runtime and the system.

    Counts are per interval: each :meth:`collect` reports the requests and errors since the
    previous one (the first: since each model was loaded). A model swapped in (install,
    rollback) brings new counters; the collector reads the outgoing model's counters until
    they go quiet, so requests still finishing on the old session are counted too.

    ``system`` reads the system (default: a :class:`~agent.system_probe.SystemProbe`);
    tests pass a fake. Not thread-safe: call :meth:`collect` from one thread (the
    sampler's).
    """

    def __init__(self, runtime: Runtime, *, system: Callable[[], SystemReading] | None = None,
                 buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.buckets_ms = tuple(buckets_ms)
        self._monotonic = monotonic
        self._previous: float | None = None
        installer = getattr(runtime, "installer", None)
        disk = None if installer is None else installer.dirs.root
        self._system = system or SystemProbe(disk).read
        # Counters as last read, per RequestStats object (a model swapped back in keeps its
        # old counters), and per model name the objects still to read.
        self._seen: weakref.WeakKeyDictionary[RequestStats, Counts] = (
            weakref.WeakKeyDictionary())
        self._tracked: dict[str, tuple[ModelReading, list[RequestStats]]] = {}

    def collect(self) -> dict[str, Any]:
        """The metrics of one sample (see docs/telemetry.md for the fields)."""
        now = self._monotonic()
        interval = None if self._previous is None else round(now - self._previous, 3)
        self._previous = now
        models: dict[str, Any] = {}
        tracked: dict[str, tuple[ModelReading, list[RequestStats]]] = {}
        for info in self.runtime.models():
            try:
                served = self.runtime.served(info.name)
            except ModelNotFoundError:
                continue  # unloaded since models(); the next sample reports it
            stats = served.stats
            figures = stats.snapshot()
            reading = ModelReading(info.version, info.state, info.backend, info.fallback,
                                   figures["p50_ms"], figures["p99_ms"], info.device)
            previous = self._tracked.pop(info.name, (reading, []))[1]
            delta, latencies, keep = self._read(stats, previous)
            entry = model_metrics(reading, delta, latencies, self.buckets_ms)
            self.runtime.flush_watchers(info.name)
            if served.monitor is not None:
                entry["monitor"] = served.monitor.report()
            for role, comparison in self.runtime.comparisons(info.name).items():
                entry[role] = comparison.report()
            models[info.name] = entry
            tracked[info.name] = (reading, keep)
        for name, (last, previous) in self._tracked.items():  # no longer served
            delta, latencies, keep = self._read(None, previous)
            if delta.requests:
                gone = ModelReading(last.version, "unloaded", last.backend, last.fallback,
                                    device=last.device)
                models[name] = model_metrics(gone, delta, latencies, self.buckets_ms)
            if keep:
                tracked[name] = (last, keep)
        self._tracked = tracked
        return {"interval_s": interval, "system": system_metrics(self._system()),
                "models": models, "latency_buckets_ms": list(self.buckets_ms)}

    def _read(self, current: RequestStats | None, previous: list[RequestStats],
              ) -> tuple[Counts, list[float], list[RequestStats]]:
        """Sum the counters of ``current`` and the outgoing objects in ``previous``; keep
        reading an outgoing one while its counters still move."""
        total = Counts()
        latencies: list[float] = []
        keep = [] if current is None else [current]
        for stats in ([] if current is None else [current]) + [
                s for s in previous if s is not current]:
            counts, recent = _read_stats(stats)
            before = self._seen.get(stats)
            delta = counter_delta(before, counts)
            latencies.extend(new_latencies(before, counts, recent))
            self._seen[stats] = counts
            total += delta
            if stats is not current and delta.requests:
                keep.append(stats)
        return total, latencies, keep


class TelemetrySampler:
    """Takes a sample from ``source`` every ``interval_s`` seconds into ``outbox``, on its
    own thread.

    ``on_sample`` is called (on that thread) with every sample stored, for example to wake
    whoever publishes the outbox; it must not block. A slot missed, a collection that
    raised and a sample the outbox could not store are counted in the outbox as dropped
    samples (:meth:`Outbox.count_lost <agent.outbox.Outbox.count_lost>`), so the fleet
    learns of every gap from the next sample's ``dropped``.
    """

    def __init__(self, source: TelemetrySource, outbox: Outbox, interval_s: float, *,
                 on_sample: Callable[[Telemetry], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"the telemetry interval must be a positive number of seconds, "
                             f"not {interval_s!r}")
        self.source = source
        self.outbox = outbox
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.clock = clock
        self.monotonic = monotonic
        self._due = 0.0
        self._periodic = Periodic("edgefleet-telemetry", self._slot, interval_s)

    def start(self) -> None:
        """Take the first sample now and then one every interval, until :meth:`stop`."""
        self._due = self.monotonic()
        self._periodic.start()

    def stop(self) -> None:
        """Stop sampling; returns once a sample being taken is stored."""
        self._periodic.stop()

    def sample(self) -> Telemetry | None:
        """Take one sample now; None if it was lost (logged and counted as dropped)."""
        try:
            metrics = self.source.collect()
            sample = self.outbox.add_sample(self.clock(), metrics)
        except OutboxError as exc:  # the outbox counted it
            log.error("telemetry sample lost and counted as dropped: %s", exc)
            return None
        except Exception:  # a collector bug or bad metrics must not stop sampling
            log.exception("telemetry sample lost and counted as dropped")
            self.outbox.count_lost(Tally(samples=1))
            return None
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    def _slot(self) -> float:
        """The sample due now, and the wait until the next slot of the grid."""
        missed, self._due = next_slot(self._due, self.monotonic(), self.interval_s)
        if missed:
            log.warning("telemetry sampling was held up: %d sample(s) not taken, "
                        "counted as dropped", missed)
            self.outbox.count_lost(Tally(samples=missed))
        self.sample()
        return self._due - self.monotonic()

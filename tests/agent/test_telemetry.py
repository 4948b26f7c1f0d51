"""Telemetry: the collector (a fake runtime's swappable counters, then a real Runtime
serving the digits model) and the sampler's schedule and loss counting."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ModelNotFoundError
from agent.metrics import DEFAULT_BUCKETS_MS, SystemReading
from agent.outbox import Outbox
from agent.runtime import ModelInfo, RequestStats, Runtime
from agent.telemetry import TelemetryCollector, TelemetrySampler, next_slot
from protocol.messages import Telemetry, decode_telemetry, encode

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
T0 = 1_700_000_000.0


# -- the collector on runtimes -----------------------------------------------------------


def _fixed_system() -> SystemReading:
    return SystemReading(cpu_percent=1.0)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Served:
    stats: RequestStats


class _FakeRuntime:
    """Just what the collector reads: models() and served(name).stats, swappable."""

    def __init__(self) -> None:
        self.serving: dict[str, tuple[int, RequestStats]] = {}

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name, version, "onnxruntime", None, (), (), "test", "serving")
                for name, (version, _) in sorted(self.serving.items())]

    def served(self, name: str) -> _Served:
        if name not in self.serving:
            raise ModelNotFoundError(name)
        return _Served(self.serving[name][1])


def _requests(stats: RequestStats, ok: int, failed: int = 0) -> None:
    for _ in range(ok):
        stats.record(0.003, 1.0)
    for _ in range(failed):
        stats.record_error(0.001, 1.0)


def _collector(runtime: Any, clock: _Clock | None = None) -> TelemetryCollector:
    return TelemetryCollector(runtime, system=_fixed_system,
                              monotonic=clock or _Clock())


def test_counts_are_per_interval_across_swaps_rollbacks_and_unloads() -> None:
    runtime = _FakeRuntime()
    v1, v2 = RequestStats(), RequestStats()
    runtime.serving["m"] = (1, v1)
    collector = _collector(runtime)
    _requests(v1, 5, 1)

    def m(metrics: dict[str, Any]) -> tuple[Any, ...] | None:
        entry = metrics["models"].get("m")
        return None if entry is None else (entry["version"], entry["state"],
                                           entry["requests"], entry["errors"],
                                           sum(entry["latency_hist"]))

    assert m(collector.collect()) == (1, "serving", 6, 1, 5)  # since load
    assert m(collector.collect()) == (1, "serving", 0, 0, 0)
    _requests(v1, 2)
    runtime.serving["m"] = (2, v2)  # install: new counters
    _requests(v2, 3)
    _requests(v1, 1)  # a request that was in flight on the old session
    assert m(collector.collect()) == (2, "serving", 6, 0, 6)
    _requests(v1, 1)  # still finishing on the old one
    assert m(collector.collect()) == (2, "serving", 1, 0, 1)
    runtime.serving["m"] = (1, v1)  # rollback: the old counters are back, not new
    _requests(v1, 4, 2)
    _requests(v2, 1)
    assert m(collector.collect()) == (1, "serving", 7, 2, 5)
    del runtime.serving["m"]
    _requests(v1, 2)
    assert m(collector.collect()) == (1, "unloaded", 2, 0, 2)  # its last requests
    assert m(collector.collect()) is None


def test_interval_and_layout() -> None:
    clock = _Clock()
    collector = _collector(_FakeRuntime(), clock)
    first = collector.collect()
    clock.now += 10.5
    second = collector.collect()
    assert first == {"interval_s": None, "system": {"cpu_percent": 1.0}, "models": {},
                     "latency_buckets_ms": list(DEFAULT_BUCKETS_MS)}
    assert second["interval_s"] == 10.5


def test_collecting_from_a_real_runtime_serving_digits(tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    runtime = Runtime()
    request.addfinalizer(runtime.close)
    runtime.load_file(DIGITS, "digits")
    x = np.load(ROOT / "models" / "digits_data.npz")["eval_x"][:1]
    collector = TelemetryCollector(runtime)  # psutil
    for _ in range(20):
        runtime.infer("digits", {"input": x})
    metrics = collector.collect()

    digits = metrics["models"]["digits"]
    assert (digits["version"], digits["state"], digits["requests"], digits["errors"]) == (
        None, "serving", 20, 0)
    assert sum(digits["latency_hist"]) == 20
    assert 0 < digits["p50_ms"] <= digits["p99_ms"] < 1000
    assert digits["backend"] == runtime.model("digits").backend
    system = metrics["system"]
    assert {"cpu_percent", "process_cpu_percent", "rss_bytes", "memory_percent"} <= set(system)
    assert system["rss_bytes"] > 10_000_000
    if hasattr(os, "getloadavg"):
        assert len(system["load_avg"]) == 3
    assert ("temp_c" in system) == ("temp_sensor" in system)

    runtime.load_file(DIGITS, "digits")  # hot-swap: counters restart on the new model
    runtime.infer("digits", {"input": x})
    assert collector.collect()["models"]["digits"]["requests"] == 1

    with Outbox(tmp_path / "outbox.db") as outbox:  # the sample stores and goes on the wire
        sample = outbox.add_sample(T0, metrics)
        assert decode_telemetry(encode(sample)).metrics == json.loads(json.dumps(metrics))
        assert len(encode(sample)) < 2000


# -- the sampler -----------------------------------------------------------------------------


def test_next_slot_keeps_the_grid_and_counts_the_slots_passed() -> None:
    assert next_slot(10.0, 10.0, 2.0) == (0, 12.0)  # on time
    assert next_slot(10.0, 11.9, 2.0) == (0, 12.0)  # late, within its slot
    assert next_slot(10.0, 12.0, 2.0) == (1, 14.0)  # one whole slot went by
    assert next_slot(10.0, 17.5, 2.0) == (3, 18.0)
    assert next_slot(10.0, 9.0, 2.0) == (0, 12.0)  # early (a wait woke too soon)


@given(st.floats(0, 1e6), st.floats(0, 1e4), st.floats(0.01, 100))
def test_next_slot_is_due_after_now_and_on_the_grid(due: float, late: float,
                                                    interval: float) -> None:
    now = due + late
    missed, following = next_slot(due, now, interval)
    assert missed >= 0
    assert following > now - 1e-6 * max(1.0, now)  # float rounding
    assert math.isclose(following, due + (missed + 1) * interval, rel_tol=1e-9)


class _Source:
    """Metrics on demand; the test decides what each collect does."""

    def __init__(self, behaviour: Callable[[int], None] = lambda call: None) -> None:
        self.calls = 0
        self.behaviour = behaviour

    def collect(self) -> Mapping[str, Any]:
        self.calls += 1
        self.behaviour(self.calls)
        return {"call": self.calls}


def _sample_until(sampler: TelemetrySampler, count: int) -> list[Telemetry]:
    """Run ``sampler`` until it stored ``count`` samples; they, in order."""
    samples: list[Telemetry] = []
    enough = threading.Event()

    def stored(sample: Telemetry) -> None:
        samples.append(sample)
        if len(samples) >= count:
            enough.set()

    sampler.on_sample = stored
    sampler.start()
    try:
        assert enough.wait(30), f"{count} samples were not taken"
    finally:
        sampler.stop()
    return samples


def test_slots_missed_while_the_sampler_was_held_up_are_counted(tmp_path: Path) -> None:
    """The second collect holds the sampler up for 3.5 intervals (a jump of its monotonic
    clock): the two slots that passed meanwhile were never sampled, and the next sample
    says so."""
    interval = 0.5
    offset = [0.0]

    def stall(call: int) -> None:
        if call == 2:
            offset[0] += 3.5 * interval

    with Outbox(tmp_path / "outbox.db") as outbox:
        sampler = TelemetrySampler(_Source(stall), outbox, interval,
                                   monotonic=lambda: time.monotonic() + offset[0])
        samples = _sample_until(sampler, 3)
        # Two, or more if this machine held the sampler up for real as well.
        dropped = [s.metrics.get("dropped", 0) for s in samples]
        assert dropped[2] >= 2
        assert sum(dropped) == outbox.dropped().samples


def test_a_collect_that_raises_is_a_sample_counted_as_dropped(tmp_path: Path) -> None:
    def fail_once(call: int) -> None:
        if call == 1:
            raise RuntimeError("the runtime fell over")

    with Outbox(tmp_path / "outbox.db") as outbox:
        [sample] = _sample_until(TelemetrySampler(_Source(fail_once), outbox, 0.2), 1)
        assert sample.metrics["call"] == 2
        assert sample.metrics["dropped"] >= 1  # more if a slot went by meanwhile
        assert sample.metrics["dropped"] == outbox.dropped().samples


def test_a_sample_the_outbox_cannot_store_is_counted_and_sampling_goes_on(
        tmp_path: Path) -> None:
    seq_file = tmp_path / "outbox.seq"
    seq_file.mkdir()  # the seq reservation cannot be written: every add fails

    def repair(call: int) -> None:
        if call == 3:
            seq_file.rmdir()

    with Outbox(tmp_path / "outbox.db") as outbox:
        [sample] = _sample_until(TelemetrySampler(_Source(repair), outbox, 0.2), 1)
        assert sample.metrics["call"] == 3
        assert sample.metrics["dropped"] >= 2  # more if a slot went by meanwhile
        assert sample.metrics["dropped"] == outbox.dropped().samples


def test_the_interval_must_be_positive(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as outbox:
        for bad in (0.0, -1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="positive number of seconds"):
                TelemetrySampler(_Source(), outbox, bad)

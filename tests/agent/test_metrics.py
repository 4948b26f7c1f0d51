"""The arithmetic of telemetry: pure functions, driven directly."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from agent.metrics import (
    DEFAULT_BUCKETS_MS,
    Counts,
    ModelReading,
    SystemReading,
    counter_delta,
    latency_histogram,
    model_metrics,
    new_latencies,
    system_metrics,
)


def test_counter_delta_subtracts_and_treats_a_drop_as_a_restart() -> None:
    assert counter_delta(None, Counts(5, 1)) == Counts(5, 1)
    assert counter_delta(Counts(5, 1), Counts(9, 1)) == Counts(4, 0)
    assert counter_delta(Counts(5, 1), Counts(3, 0)) == Counts(3, 0)
    assert counter_delta(Counts(5, 2), Counts(7, 1)) == Counts(7, 1)


def test_new_latencies_are_the_tail_of_the_successful_requests() -> None:
    recent = [0.1, 0.2, 0.3, 0.4]
    assert list(new_latencies(Counts(2, 0), Counts(4, 0), recent)) == [0.3, 0.4]
    assert list(new_latencies(Counts(2, 0), Counts(5, 1), recent)) == [0.3, 0.4]  # 1 failed
    assert list(new_latencies(Counts(0, 0), Counts(99, 0), recent)) == recent  # capped
    assert list(new_latencies(Counts(4, 0), Counts(4, 0), recent)) == []
    assert list(new_latencies(Counts(4, 0), Counts(5, 1), recent)) == []
    assert list(new_latencies(None, Counts(1, 0), recent)) == [0.4]


@given(st.lists(st.floats(0, 5000, allow_nan=False)))
def test_latency_histogram_puts_each_value_in_its_bucket(values: list[float]) -> None:
    counts = latency_histogram(values)
    assert len(counts) == len(DEFAULT_BUCKETS_MS) + 1
    assert sum(counts) == len(values)
    edges = [0.0, *DEFAULT_BUCKETS_MS, math.inf]
    for i, count in enumerate(counts):
        low = -math.inf if i == 0 else edges[i]
        assert count == sum(low < v <= edges[i + 1] for v in values)


def test_model_metrics() -> None:
    reading = ModelReading(version=3, state="probation", backend="onnxruntime:CPU",
                           fallback="OpenVINO failed", p50_ms=0.123456, p99_ms=None)
    entry = model_metrics(reading, Counts(10, 2), [0.0004, 0.003, 0.003], edges_ms=(1, 5))
    assert entry == {"version": 3, "state": "probation", "backend": "onnxruntime:CPU",
                     "fallback": "OpenVINO failed", "requests": 10, "errors": 2,
                     "p50_ms": 0.123, "p99_ms": None, "latency_hist": [1, 2, 0]}
    plain = model_metrics(ModelReading(None, "serving", "onnxruntime"), Counts(), [])
    assert "fallback" not in plain
    assert plain["latency_hist"] == [0] * (len(DEFAULT_BUCKETS_MS) + 1)


def test_system_metrics_rounds_and_leaves_out_what_is_unknown() -> None:
    full = SystemReading(cpu_percent=12.345, process_cpu_percent=0.04, rss_bytes=50_000_000,
                         memory_percent=41.25, load_avg=(0.111, 0.5, 1.0),
                         temperatures_c={"coretemp/Core 0": 48.0, "acpitz/0": 51.26,
                                         "bad/0": math.nan},
                         disk_free_bytes=7_000_000_000, disk_percent=63.44)
    assert system_metrics(full) == {"cpu_percent": 12.3, "process_cpu_percent": 0.0,
                                    "rss_bytes": 50_000_000, "memory_percent": 41.2,
                                    "disk_percent": 63.4, "disk_free_bytes": 7_000_000_000,
                                    "load_avg": [0.11, 0.5, 1.0], "temp_c": 51.3,
                                    "temp_sensor": "acpitz/0"}
    assert system_metrics(SystemReading()) == {}
    assert system_metrics(SystemReading(temperatures_c={})) == {}

"""Run a model over a dataset, and time it.

:func:`run_dataset` feeds a bound dataset through a :class:`~compressor.runner.ModelRunner`:
stateless data in chunks of the model's own batch size (fixed-batch models get exactly that,
the last chunk padded and the padding dropped from the outputs), stateful data call by call
with each sequence's state carried from one call to the next. Outputs come back batch-first,
one row per sample (or per call, for sequences), ready for :mod:`compressor.metrics`.
Latency is single-call, timed interleaved across candidates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .dataset import Binding, Dataset
from .runner import ModelRunError, ModelRunner

__all__ = ["DEFAULT_BATCH", "MAX_CHUNK_BYTES", "LatencyStats", "Outputs", "calibration_calls",
           "first_call", "matched", "measure_latency", "measure_latency_interleaved", "run_dataset",
           "summarize_latency"]

log = logging.getLogger(__name__)

#: Outputs by name, batch-first: one row per sample (stateless) or per call (sequences).
Outputs = dict[str, np.ndarray]

DEFAULT_BATCH = 64
#: A chunk of a dynamic-batch model's input is kept under this size (large inputs, few rows).
MAX_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class LatencyStats:
    """Latency of single-call inference, in milliseconds."""

    p50_ms: float
    p99_ms: float
    mean_ms: float
    iterations: int


def batch_size(binding: Binding, data: Dataset) -> int:
    """The model's fixed batch, or as many samples as fit a bounded chunk (at most 64)."""
    varying = binding.varying(data)
    fixed = [b for n in varying if (b := binding.signature.input(n).fixed_batch) is not None]
    if fixed:
        return min(fixed)
    row_bytes = sum(v[0].nbytes for v in varying.values()) or 1
    return max(1, min(DEFAULT_BATCH, MAX_CHUNK_BYTES // row_bytes))


def run_dataset(runner: ModelRunner, binding: Binding, data: Dataset) -> Outputs:
    """Every output of ``runner`` over ``data``; raises ModelRunError when the model fails."""
    if binding.sequences:
        return _run_sequences(runner, binding, data, record=None)
    return _run_batches(runner, binding, data)


def _run_batches(runner: ModelRunner, binding: Binding, data: Dataset) -> Outputs:
    varying = binding.varying(data)
    total = len(data)
    size = batch_size(binding, data)
    fixed = any(binding.signature.input(n).fixed_batch for n in varying)
    axes = {o.name: binding.signature.output_batch_axis(o) for o in binding.signature.outputs}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in axes}
    start = 0
    while start < total:
        rows = min(size, total - start)
        feeds = {n: _rows(v, start, rows, size if fixed else rows) for n, v in varying.items()}
        feeds.update(data.constants)
        try:
            outputs = runner.run(feeds)
        except ModelRunError:
            if fixed or size == 1:
                raise
            # Some exports declare a dynamic batch their graph does not support (a Reshape
            # with a literal 1): go on one sample per call rather than fail the model.
            log.info("a batch of %d failed; running one sample per call", size)
            size = 1
            continue
        for name, value in outputs.items():
            if name in chunks:
                chunks[name].append(np.moveaxis(value, axes[name], 0)[:rows])
        start += rows
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _rows(value: np.ndarray, start: int, rows: int, size: int) -> np.ndarray:
    """``rows`` rows from ``start``, padded to ``size`` by repeating the last row."""
    chunk = value[start:start + rows]
    if rows < size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - rows, axis=0)])
    return chunk


def _run_sequences(runner: ModelRunner, binding: Binding, data: Dataset,
                   record: list[dict[str, np.ndarray]] | None,
                   limit: int | None = None) -> Outputs:
    collected: dict[str, list[np.ndarray]] = {o.name: [] for o in binding.signature.outputs}
    for feeds in _sequence_calls(runner, binding, data, collected):
        if record is not None:
            record.append(feeds)
            if limit is not None and len(record) >= limit:
                break
    return {name: np.stack(values) for name, values in collected.items() if values}


def _sequence_calls(runner: ModelRunner, binding: Binding, data: Dataset,
                    collected: dict[str, list[np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Run every call of every sequence, yielding each call's feeds after it ran."""
    varying = binding.varying(data)
    sequences, steps = next(iter(varying.values())).shape[:2]
    for s in range(sequences):
        state = binding.initial_state(data)
        for t in range(steps):
            feeds = {n: v[s, t] for n, v in varying.items()}
            feeds.update(data.constants)
            feeds.update(state)
            outputs = runner.run(feeds)
            for name, value in outputs.items():
                collected[name].append(value)
            state = {p.input: outputs[p.output] for p in binding.state}
            yield feeds


def calibration_calls(runner: ModelRunner, binding: Binding, data: Dataset,
                      limit: int) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` complete model calls that represent ``data``, for calibration.

    Stateless: one sample per call (the model's fixed batch, when it has one). Stateful: the
    calls of the sequences in order, each with the state ``runner`` (the fp32 reference)
    carried into it, so state inputs are calibrated on the values they really take.
    """
    if binding.sequences:
        calls: list[dict[str, np.ndarray]] = []
        _run_sequences(runner, binding, data, record=calls, limit=limit)
        return calls
    varying = binding.varying(data)
    size = batch_size(binding, data) if any(
        binding.signature.input(n).fixed_batch for n in varying) else 1
    total = min(len(data), limit * size)
    return [{**{n: _rows(v, start, min(size, total - start), size) for n, v in varying.items()},
             **data.constants} for start in range(0, total, size)]


def first_call(binding: Binding, data: Dataset) -> dict[str, np.ndarray]:
    """One call's feeds (the first sample or step), for latency measurements."""
    varying = binding.varying(data)
    if binding.sequences:
        return {**{n: v[0, 0] for n, v in varying.items()}, **data.constants,
                **binding.initial_state(data)}
    size = batch_size(binding, data) if any(
        binding.signature.input(n).fixed_batch for n in varying) else 1
    return {**{n: _rows(v, 0, min(size, len(data)), size) for n, v in varying.items()},
            **data.constants}


def matched(outputs: Mapping[str, np.ndarray],
            want: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` under the names of ``want``: by name, else by position (a converted
    artifact may name its outputs otherwise; the agent matches them the same way)."""
    values = list(outputs.values())
    return {name: outputs[name] if name in outputs else values[i]
            for i, name in enumerate(want) if name in outputs or i < len(values)}


def summarize_latency(seconds: list[float]) -> LatencyStats:
    """Percentiles of per-call durations given in seconds."""
    if not seconds:
        raise ValueError("no latency samples")
    ms = np.asarray(seconds) * 1000.0
    return LatencyStats(p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
                        mean_ms=float(ms.mean()), iterations=len(seconds))


def measure_latency(runner: ModelRunner, feeds: Mapping[str, np.ndarray], warmup: int = 20,
                    iterations: int = 200) -> LatencyStats:
    """Time ``iterations`` calls after ``warmup`` untimed ones."""
    return measure_latency_interleaved({"": runner}, feeds, rounds=1,
                                       iterations=iterations, warmup=warmup)[""]


def measure_latency_interleaved(runners: Mapping[str, ModelRunner],
                                feeds: Mapping[str, np.ndarray], rounds: int = 5,
                                iterations: int = 20, *, warmup: int = 10,
                                budget_s: float | None = None) -> dict[str, LatencyStats]:
    """Time several models in alternating rounds so machine noise hits them all alike.

    Comparing candidates measured one after another lets a burst of load elsewhere decide
    the winner; interleaving rounds and taking percentiles over all of them does not.
    ``budget_s`` bounds each model's timed calls (at least 3 a round): a 100 ms model gets
    fewer calls than a 10 µs one instead of minutes of timing.
    """
    per_round = dict.fromkeys(runners, iterations)
    for name, runner in runners.items():
        started = time.perf_counter()
        runner.run(feeds)
        call_s = time.perf_counter() - started
        if budget_s is not None:
            per_round[name] = max(3, min(iterations, int(budget_s / rounds / call_s)))
        for _ in range(min(warmup, per_round[name]) - 1):
            runner.run(feeds)
    durations: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            for _ in range(per_round[name]):
                start = time.perf_counter()
                runner.run(feeds)
                durations[name].append(time.perf_counter() - start)
    return {name: summarize_latency(values) for name, values in durations.items()}

"""Telemetry: the durable outbox (unit, state-machine and kill -9 tests) and the collector
(pure functions directly, then a real Runtime serving the digits model)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent.errors import ModelNotFoundError
from agent.runtime import ModelInfo, RequestStats, Runtime
from agent.telemetry import (
    DEFAULT_BUCKETS_MS,
    Counts,
    ModelReading,
    SystemReading,
    TelemetryBuffer,
    TelemetryCollector,
    TelemetryError,
    counter_delta,
    latency_histogram,
    model_metrics,
    new_latencies,
    system_metrics,
)
from protocol.messages import decode_telemetry, encode

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
# Fast scratch space for the many small fsyncs of the property tests, when there is one.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
T0 = 1_700_000_000.0


def _open(path: Path, max_rows: int = 100) -> TelemetryBuffer:
    return TelemetryBuffer(path, max_rows=max_rows)


def _seqs(buffer: TelemetryBuffer) -> list[int]:
    return [s.seq for s in buffer.pending(10_000)]


# -- the buffer ------------------------------------------------------------------------


def test_append_returns_the_stored_sample_and_pending_gives_it_back(tmp_path: Path) -> None:
    with _open(tmp_path / "telemetry.db") as buffer:
        sample = buffer.append(T0 + 0.25, {"cpu": 1.5, "models": {"digits": {"requests": 3}}})
        assert sample.seq == math.floor((T0 + 0.25) * 1e6)
        assert buffer.pending(10) == [sample]
        assert len(buffer) == 1
        assert buffer.last_seq() == sample.seq
        assert decode_telemetry(encode(sample)) == sample  # what goes on the wire


def test_seq_is_microseconds_bumped_past_the_last_when_the_clock_stalls_or_steps_back(
        tmp_path: Path) -> None:
    with _open(tmp_path / "telemetry.db") as buffer:
        first = buffer.append(T0, {}).seq
        same = buffer.append(T0, {}).seq
        back = buffer.append(T0 - 3600, {}).seq
        later = buffer.append(T0 + 1, {}).seq
    assert (same, back) == (first + 1, first + 2)
    assert later == first + 1_000_000


def test_samples_and_seq_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        sent = [buffer.append(T0 + i, {"i": i}) for i in range(5)]
        buffer.ack(sent[1].seq)
    with _open(path) as buffer:
        assert buffer.pending(10) == sent[2:]
        assert buffer.last_seq() == sent[-1].seq
        # Even with the clock far behind, the next seq follows the last one.
        assert buffer.append(1.0, {}).seq == sent[-1].seq + 1


def test_pending_is_oldest_first_limited_and_can_skip_what_is_in_flight(tmp_path: Path) -> None:
    with _open(tmp_path / "telemetry.db") as buffer:
        sent = [buffer.append(T0 + i, {"i": i}) for i in range(6)]
        assert buffer.pending(2) == sent[:2]
        assert buffer.pending(2, after=sent[1].seq) == sent[2:4]
        assert buffer.pending(0) == []
        assert buffer.ack(sent[3].seq) == 4
        assert buffer.ack(sent[3].seq) == 0  # acknowledging twice is harmless
        assert buffer.pending(10) == sent[4:]


def test_a_full_buffer_drops_the_oldest_and_says_so(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "telemetry.db"
    with caplog.at_level(logging.WARNING, "agent.telemetry"), _open(path, max_rows=3) as buffer:
        sent = [buffer.append(T0 + i, {"i": i}) for i in range(7)]
        assert [s.metrics["i"] for s in buffer.pending(10)] == [4, 5, 6]
        assert "dropped" not in sent[2].metrics
        assert [s.metrics["dropped"] for s in sent[3:]] == [1, 1, 1, 2]
        # Sample 3 carried the first count and was dropped too: its count moved on, so the
        # counts of the samples that remain (1 + 1 + 2) still add up to the 4 dropped.
        assert buffer.dropped_total() == 4
    assert "is full" in caplog.text
    with _open(path, max_rows=3) as buffer:
        assert buffer.dropped_total() == 4  # persisted
        buffer.ack(buffer.last_seq() or 0)
        assert "dropped" not in buffer.append(T0 + 9, {}).metrics  # nothing new to report


def test_a_smaller_bound_on_reopening_drops_down_to_it(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path, max_rows=10) as buffer:
        for i in range(6):
            buffer.append(T0 + i, {"i": i})
    with _open(path, max_rows=2) as buffer:
        assert [s.metrics["i"] for s in buffer.pending(10)] == [4, 5]
        assert buffer.dropped_total() == 4
        newest = buffer.append(T0 + 6, {"i": 6})
        assert newest.metrics["dropped"] == 5
        assert [s.metrics["i"] for s in buffer.pending(10)] == [5, 6]


@pytest.mark.parametrize(("at", "metrics", "match"), [
    (float("nan"), {}, "finite"),
    (-1.0, {}, "non-negative"),
    (T0, {"dropped": 3}, "reserved"),
    (T0, {"buffer_reset": "x"}, "reserved"),
    (T0, {"p50": float("nan")}, "plain JSON"),
    (T0, {"blob": b"bytes"}, "plain JSON"),
])
def test_refused_samples_change_nothing(tmp_path: Path, at: float, metrics: dict[str, Any],
                                        match: str) -> None:
    with _open(tmp_path / "telemetry.db") as buffer:
        with pytest.raises(ValueError, match=match):
            buffer.append(at, metrics)
        assert (len(buffer), buffer.last_seq(), buffer.dropped_total()) == (0, None, 0)


def _delete(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_after_the_file_is_deleted_seq_starts_above_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        old = [buffer.append(T0 + i, {}).seq for i in range(3)]
        assert int(buffer.seq_path.read_text()) == old[0] + 3600 * 1_000_000
    _delete(path)
    with _open(path) as buffer:
        assert buffer.last_seq() is None
        # The clock is a day behind (no RTC, no NTP yet): seq still does not repeat.
        after = buffer.append(T0 - 86_400, {}).seq
        assert after == old[0] + 3600 * 1_000_000
        assert buffer.append(T0 - 86_400, {}).seq == after + 1
        # A clock past the reservation moves it on before the seq is used.
        later = buffer.append(T0 + 7200, {}).seq
        assert int(buffer.seq_path.read_text()) == later + 3600 * 1_000_000


def test_without_file_and_reservation_the_clock_alone_orders_seq(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   ) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        old = [buffer.append(T0, {}).seq for _ in range(1000)]  # run ahead of the clock
    _delete(path)
    path.with_suffix(".seq").write_text("garbage")
    with caplog.at_level(logging.WARNING, "agent.telemetry"), _open(path) as buffer:
        assert buffer.append(T0 + 0.01, {}).seq > max(old)
        assert buffer.append(T0 - 1, {}).seq == math.floor((T0 + 0.01) * 1e6) + 1
    assert "reservation" in caplog.text


def test_a_corrupt_file_is_set_aside_and_the_next_sample_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        buffer.append(T0, {"i": 0})
    path.write_bytes(b"\x13not a database" * 500)
    with caplog.at_level(logging.ERROR, "agent.telemetry"), _open(path) as buffer:
        assert len(buffer) == 0
        sample = buffer.append(T0 + 1, {"i": 1})
        assert sample.metrics == {"i": 1, "buffer_reset": "corrupt"}
        assert "buffer_reset" not in buffer.append(T0 + 2, {}).metrics
    assert "is corrupt" in caplog.text
    [aside] = tmp_path.glob("telemetry.db.*.corrupt")
    assert aside.read_bytes().startswith(b"\x13not a database")


def test_only_the_newest_corrupt_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    for _ in range(5):
        path.write_bytes(b"garbage" * 100)
        _open(path).close()
    assert len(list(tmp_path.glob("telemetry.db.*.corrupt"))) == 3


def test_corruption_found_while_running_keeps_seq_and_counts_the_lost(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        sent = [buffer.append(T0 + i, {"pad": "x" * 2000}) for i in range(40)]
        buffer.ack(sent[9].seq)
        # Damage the file under the open connection, and make SQLite read it again.
        buffer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with path.open("r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 4096 * 8)
        buffer._db.execute("PRAGMA shrink_memory")
        assert buffer.pending(100) == []
        after = buffer.append(T0 - 100, {})  # the clock is behind: seq still follows
        assert after.seq == sent[-1].seq + 1
        assert after.metrics["dropped"] == 30
        assert buffer.dropped_total() == 30
    assert list(tmp_path.glob("telemetry.db.*.corrupt"))


def test_an_unreadable_row_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    with _open(path) as buffer:
        first = buffer.append(T0, {"i": 0})
        second = buffer.append(T0 + 1, {"i": 1})
        db = sqlite3.connect(path)
        with db:
            db.execute("UPDATE samples SET metrics = '[not json' WHERE seq = ?", (first.seq,))
        db.close()
        assert buffer.pending(10) == [second]
        assert buffer.append(T0 + 2, {}).metrics["dropped"] == 1


def test_a_failed_append_raises_and_is_reported_with_the_next_sample(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _open(tmp_path / "telemetry.db") as buffer:
        def disk_full(*_: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        with monkeypatch.context() as patch:
            patch.setattr(buffer, "_append", disk_full)
            with pytest.raises(TelemetryError, match="disk is full"):
                buffer.append(T0, {})
        assert buffer.dropped_total() == 1
        assert buffer.append(T0 + 1, {}).metrics == {"dropped": 1}
        assert buffer.dropped_total() == 1


def test_a_buffer_that_cannot_be_created_raises_telemetry_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(TelemetryError, match="cannot create its directory"):
        TelemetryBuffer(tmp_path / "file" / "telemetry.db")
    with pytest.raises(ValueError, match="max_rows"):
        TelemetryBuffer(tmp_path / "telemetry.db", max_rows=0)


def test_appending_and_acknowledging_from_two_threads(tmp_path: Path) -> None:
    sent: list[int] = []
    acked: list[int] = []
    with _open(tmp_path / "telemetry.db", max_rows=100_000) as buffer:
        done = threading.Event()

        def sampler() -> None:
            for i in range(300):
                sent.append(buffer.append(T0, {"i": i}).seq)
            done.set()

        thread = threading.Thread(target=sampler)
        thread.start()
        while not (done.is_set() and len(buffer) == 0):
            batch = buffer.pending(7)
            if batch:
                assert [s.seq for s in batch] == sorted(s.seq for s in batch)
                acked.extend(s.seq for s in batch)
                buffer.ack(batch[-1].seq)
        thread.join()
        assert buffer.dropped_total() == 0
    assert acked == sent == list(range(sent[0], sent[0] + 300))


@dataclass
class _Sent:
    seq: int
    at: float
    metrics: dict[str, Any]
    dropped: int = 0
    reset: bool = False


@dataclass
class _FileModel:
    """What one buffer file should hold."""

    pending: list[_Sent] = field(default_factory=list)
    last_seq: int | None = None
    dropped_total: int = 0
    unreported: int = 0
    reset: bool = False
    dropped_delivered: int = 0  # sum of "dropped" over acknowledged samples


class BufferMachine(RuleBasedStateMachine):
    """Random appends, acks, reopenings (with another bound), overflows, deletions and
    corruptions of the file, checked against a model of what the buffer must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="telemetry-", dir=SCRATCH))
        self.path = self.dir / "telemetry.db"
        self.clock_us = int(T0 * 1e6)
        self.max_rows = 1
        self.file = _FileModel()
        self.issued: list[int] = []  # every seq ever returned, across files
        self.acked: set[int] = set()
        self.clock_only = False
        self.buffer: TelemetryBuffer | None = None

    @initialize(max_rows=st.integers(1, 6))
    def start(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.buffer = _open(self.path, max_rows)

    def teardown(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def live(self) -> TelemetryBuffer:
        assert self.buffer is not None
        return self.buffer

    @rule(step=st.one_of(st.just(0), st.integers(-2_000_000, 3_000_000)),
          value=st.integers(-5, 5))
    def append(self, step: int, value: int) -> None:
        if self.clock_only:  # see delete_file_and_seq_reservation
            step, self.clock_only = max(step, 0), False
        self.clock_us = max(0, self.clock_us + step)
        at = self.clock_us / 1e6
        sample = self.live.append(at, {"v": value})
        model = self.file
        at_us = math.floor(at * 1e6)
        # seq: never behind the clock, strictly after everything issued, even across deleted
        # and corrupt files; exactly the clock or the last + 1 while the file lasts.
        assert sample.seq >= at_us
        assert not self.issued or sample.seq > max(self.issued)
        if model.last_seq is not None:
            assert sample.seq == max(at_us, model.last_seq + 1)
        model.pending.append(_Sent(sample.seq, at, {}))  # a placeholder, to make room
        self._evict()
        model.pending.pop()
        expected: dict[str, Any] = {"v": value}
        if model.unreported:
            expected["dropped"] = model.unreported
        if model.reset:
            expected["buffer_reset"] = "corrupt"
        assert dict(sample.metrics) == expected
        model.pending.append(_Sent(sample.seq, at, expected, model.unreported, model.reset))
        model.unreported, model.reset, model.last_seq = 0, False, sample.seq
        self.issued.append(sample.seq)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        model = self.file
        choices = [s.seq for s in model.pending] + [0, (model.last_seq or 0) + 10]
        up_to = data.draw(st.sampled_from(choices))
        gone = [s for s in model.pending if s.seq <= up_to]
        assert self.live.ack(up_to) == len(gone)
        model.pending = model.pending[len(gone):]
        model.dropped_delivered += sum(s.dropped for s in gone)
        self.acked.update(s.seq for s in gone)

    @rule(max_rows=st.integers(1, 6))
    def reopen(self, max_rows: int) -> None:
        self.live.close()
        self.max_rows = max_rows
        self.buffer = _open(self.path, max_rows)
        self._evict()  # a smaller bound applies at once

    def _evict(self) -> None:
        model = self.file
        while len(model.pending) > self.max_rows:
            oldest = model.pending.pop(0)
            model.unreported += 1 + oldest.dropped
            model.reset = model.reset or oldest.reset
            model.dropped_total += 1

    def _wipe(self) -> None:
        self.live.close()
        self.buffer = None
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    @rule()
    def delete_file(self) -> None:
        self._wipe()
        self.path.unlink(missing_ok=True)
        self.file = _FileModel()
        self.buffer = _open(self.path, self.max_rows)

    @rule()
    def delete_file_and_seq_reservation(self) -> None:
        """Only the clock is left to order seqs: it is assumed right (not behind the last
        sample), which is what the guarantee rests on then."""
        self.delete_file()
        self.live.close()
        self.live.seq_path.unlink(missing_ok=True)
        self.clock_us = max([self.clock_us, *self.issued]) + 1
        self.clock_only = True
        self.buffer = _open(self.path, self.max_rows)

    @precondition(lambda self: self.path.exists())
    @rule()
    def corrupt_file(self) -> None:
        self._wipe()
        self.path.write_bytes(os.urandom(64) + b"\x00" * 4096)
        self.file = _FileModel(reset=True)
        self.buffer = _open(self.path, self.max_rows)
        assert list(self.dir.glob("telemetry.db.*.corrupt"))

    @invariant()
    def holds_exactly_the_unacknowledged_samples_in_order(self) -> None:
        if self.buffer is None:
            return
        got = self.live.pending(100)
        assert [(s.seq, s.at, dict(s.metrics)) for s in got] == [
            (s.seq, s.at, s.metrics) for s in self.file.pending]
        assert not self.acked & {s.seq for s in got}
        assert len(self.live) == len(got) <= self.max_rows

    @invariant()
    def counts_every_drop(self) -> None:
        if self.buffer is None:
            return
        model = self.file
        assert self.live.dropped_total() == model.dropped_total
        # Conservation: every drop is counted by exactly one sample, sent or waiting, or is
        # still to be reported by the next one.
        assert model.dropped_total == (model.dropped_delivered + model.unreported
                                       + sum(s.dropped for s in model.pending))

    @invariant()
    def seq_never_repeats(self) -> None:
        assert len(set(self.issued)) == len(self.issued)


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


_CHILD = """
import sys, time
from pathlib import Path
from agent.telemetry import TelemetryBuffer

buffer = TelemetryBuffer(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    print(buffer.append(time.time(), {"i": i}).seq, flush=True)
print("done", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("appends", [1, 100_000])
def test_kill_9_right_after_append_loses_nothing(tmp_path: Path, appends: int) -> None:
    """The child prints each seq as soon as append() returned it; SIGKILL lands after the
    first (one append: while idle; many: in the middle of the next append)."""
    path = tmp_path / "telemetry.db"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(appends)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    printed = [int(child.stdout.readline())]
    child.send_signal(signal.SIGKILL)
    rest = child.communicate(timeout=30)[0].split()
    assert child.returncode == -signal.SIGKILL
    printed += [int(line) for line in rest if line != "done"]
    with _open(path, max_rows=100_000) as buffer:
        found = _seqs(buffer)
        assert set(printed) <= set(found)
        assert found == sorted(found)
        assert len(found) <= len(printed) + 1  # at most one committed and not yet printed
        assert buffer.append(0.0, {}).seq == found[-1] + 1


# -- the collector: pure parts ---------------------------------------------------------


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
                                         "bad/0": math.nan})
    assert system_metrics(full) == {"cpu_percent": 12.3, "process_cpu_percent": 0.0,
                                    "rss_bytes": 50_000_000, "memory_percent": 41.2,
                                    "load_avg": [0.11, 0.5, 1.0], "temp_c": 51.3,
                                    "temp_sensor": "acpitz/0"}
    assert system_metrics(SystemReading()) == {}
    assert system_metrics(SystemReading(temperatures_c={})) == {}


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
        stats.record(0.003)
    for _ in range(failed):
        stats.record_error()


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

    with _open(tmp_path / "telemetry.db") as buffer:  # the sample stores and goes on the wire
        sample = buffer.append(T0, metrics)
        assert decode_telemetry(encode(sample)).metrics == json.loads(json.dumps(metrics))
        assert len(encode(sample)) < 2000

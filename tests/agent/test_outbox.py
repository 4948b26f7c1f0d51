"""The outbox: unit tests, state-machine and property tests against a model of what it must
hold, kill -9 of a process writing to it, and a real full disk (a small tmpfs)."""

from __future__ import annotations

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from agent.loss_counter import Tally
from agent.outbox import Outbox, OutboxError
from protocol.messages import (
    MAX_EVENT_BYTES,
    Event,
    Telemetry,
    decode_event,
    decode_telemetry,
    encode,
)

ROOT = Path(__file__).resolve().parents[2]
# Fast scratch space for the many small fsyncs of the property tests, when there is one.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
T0 = 1_700_000_000.0


def _open(path: Path, max_rows: int = 100, **bounds: int) -> Outbox:
    return Outbox(path, max_rows=max_rows, **bounds)


def _seqs(outbox: Outbox) -> list[int]:
    return [m.seq or 0 for m in outbox.pending(10_000)]


# -- adding, handing out, acknowledging ----------------------------------------------------


def test_add_sample_returns_the_stored_sample_and_pending_gives_it_back(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        sample = outbox.add_sample(T0 + 0.25, {"cpu": 1.5, "models": {"d": {"requests": 3}}})
        assert sample.seq == math.floor((T0 + 0.25) * 1e6)
        assert outbox.pending(10) == [sample]
        assert (len(outbox), outbox.waiting(), outbox.last_seq()) == (1, Tally(1, 0),
                                                                      sample.seq)
        assert decode_telemetry(encode(sample)) == sample  # what goes on the wire


def test_events_and_samples_share_one_ordered_seq(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        first = outbox.add_sample(T0, {"i": 0})
        event = outbox.add_event("install.verifying", T0, {"install_id": "a1"})
        later = outbox.add_sample(T0 + 1, {"i": 1})
        assert event == Event("install.verifying", T0, {"install_id": "a1"}, first.seq + 1)
        assert outbox.pending(10) == [first, event, later]
        assert decode_event(encode(event)) == event
        assert outbox.waiting() == Tally(2, 1)


def test_seq_is_microseconds_bumped_past_the_last_when_the_clock_stalls_or_steps_back(
        tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        first = outbox.add_sample(T0, {}).seq
        same = outbox.add_event("fetch.failed", T0, {}).seq
        back = outbox.add_sample(T0 - 3600, {}).seq
        later = outbox.add_sample(T0 + 1, {}).seq
    assert (same, back) == (first + 1, first + 2)
    assert later == first + 1_000_000


def test_messages_and_seq_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        sent: list[Telemetry | Event] = []
        sent += [outbox.add_sample(T0 + i, {"i": i}) for i in range(4)]
        sent.append(outbox.add_event("fetch.started", T0 + 5, {"model": "m"}))
        assert outbox.ack([sent[0].seq or 0, sent[2].seq or 0]) == 2
    with _open(path) as outbox:
        assert outbox.pending(10) == [sent[1], sent[3], sent[4]]
        assert outbox.last_seq() == sent[-1].seq
        # Even with the clock far behind, the next seq follows the last one.
        assert outbox.add_sample(1.0, {}).seq == (sent[-1].seq or 0) + 1


def test_pending_is_oldest_first_limited_and_can_skip_what_is_in_flight(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        sent = [outbox.add_sample(T0 + i, {"i": i}) for i in range(6)]
        assert outbox.pending(2) == sent[:2]
        assert outbox.pending(2, after=sent[1].seq) == sent[2:4]
        assert outbox.pending(0) == []
        assert outbox.ack([s.seq for s in sent[:4]]) == 4
        assert outbox.ack([s.seq for s in sent[:4]]) == 0  # acknowledging twice is harmless
        assert outbox.ack([]) == 0
        assert outbox.pending(10) == sent[4:]


def test_a_refused_message_is_dropped_and_counted(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        event = outbox.add_event("install.failed", T0, {"reason": "x"})
        sample = outbox.add_sample(T0 + 1, {"i": 1})
        assert outbox.drop([event.seq or 0, sample.seq]) == 2
        assert outbox.dropped() == Tally(1, 1)
        assert outbox.add_sample(T0 + 2, {}).metrics == {"dropped": 1, "dropped_events": 1}


# -- bounds ----------------------------------------------------------------------------------


def test_a_full_outbox_drops_the_oldest_samples_first_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    with caplog.at_level(logging.WARNING, "agent.outbox"), _open(path, max_rows=3) as outbox:
        sent = [outbox.add_sample(T0 + i, {"i": i}) for i in range(7)]
        assert [s.metrics["i"] for s in outbox.pending(10)] == [4, 5, 6]  # type: ignore[union-attr]
        assert "dropped" not in sent[2].metrics
        assert [s.metrics["dropped"] for s in sent[3:]] == [1, 1, 1, 2]
        # Sample 3 carried the first count and was dropped too: its count moved on, so the
        # counts of the samples that remain (1 + 1 + 2) still add up to the 4 dropped.
        assert outbox.dropped() == Tally(4, 0)
    assert "is full" in caplog.text
    with _open(path, max_rows=3) as outbox:
        assert outbox.dropped() == Tally(4, 0)  # persisted
        outbox.ack(_seqs(outbox))
        assert "dropped" not in outbox.add_sample(T0 + 9, {}).metrics  # nothing new to report


def test_events_outlive_samples_when_full_and_are_evicted_last(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db", max_rows=3) as outbox:
        early = outbox.add_event("install.staged", T0, {})
        outbox.add_sample(T0 + 1, {"i": 1})
        outbox.add_event("install.activating", T0 + 2, {})
        outbox.add_sample(T0 + 3, {"i": 3})  # full: the sample before goes, not the event
        kinds = [getattr(m, "kind", "sample") for m in outbox.pending(10)]
        assert kinds == ["install.staged", "install.activating", "sample"]
        for i in range(3):  # events only, then: the oldest event goes
            outbox.add_event(f"install.step_{'abc'[i]}", T0 + 4 + i, {})
        assert [getattr(m, "kind", "sample") for m in outbox.pending(10)] == [
            "install.step_a", "install.step_b", "install.step_c"]
        assert early not in outbox.pending(10)
        assert outbox.dropped() == Tally(2, 2)
        announced = outbox.add_sample(T0 + 9, {}).metrics  # and one more event makes room
        assert (announced["dropped"], announced["dropped_events"]) == (2, 3)


def test_the_bytes_bound_holds_and_a_message_over_the_limit_is_refused(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db", max_rows=1000, max_bytes=2000,
               max_message_bytes=600) as outbox:
        for i in range(20):
            outbox.add_sample(T0 + i, {"pad": "x" * 300, "i": i})
            assert outbox.size() <= 2000
        assert len(outbox) == outbox.size() // 300 < 20
        assert outbox.dropped().samples == 20 - len(outbox)
        with pytest.raises(ValueError, match="over the outbox's limit of 600"):
            outbox.add_event("fetch.failed", T0, {"pad": "y" * 600})
    with pytest.raises(ValueError, match="at most max_bytes"):
        Outbox(tmp_path / "other.db", max_bytes=10, max_message_bytes=11)
    with Outbox(tmp_path / "third.db") as outbox:  # what the server would refuse, it refuses
        with pytest.raises(ValueError, match="events message of"):
            outbox.add_event("install.failed", T0, {"detail": "x" * MAX_EVENT_BYTES})
        event = outbox.add_event("install.failed", T0, {"detail": "x" * 16_000})
        assert len(encode(event)) <= MAX_EVENT_BYTES
        with pytest.raises(ValueError, match="not one the fleet server takes"):
            outbox.add_event("device.enrolled", T0, {})


def test_smaller_bounds_on_reopening_drop_down_to_them(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path, max_rows=10) as outbox:
        for i in range(6):
            outbox.add_sample(T0 + i, {"i": i})
    with _open(path, max_rows=2) as outbox:
        assert [m.metrics["i"] for m in outbox.pending(10)] == [4, 5]  # type: ignore[union-attr]
        assert outbox.dropped() == Tally(4, 0)
        newest = outbox.add_sample(T0 + 6, {"i": 6})
        assert newest.metrics["dropped"] == 5
    with _open(path, max_rows=10, max_bytes=20, max_message_bytes=20) as outbox:
        assert [m.metrics["i"] for m in outbox.pending(10)] == [6]  # type: ignore[union-attr]


@pytest.mark.parametrize(("at", "metrics", "match"), [
    (float("nan"), {}, "finite"),
    (-1.0, {}, "non-negative"),
    (T0, {"dropped": 3}, "reserved"),
    (T0, {"dropped_events": 3}, "reserved"),
    (T0, {"buffer_reset": "x"}, "reserved"),
    (T0, {"p50": float("nan")}, "plain JSON"),
    (T0, {"blob": b"bytes"}, "plain JSON"),
])
def test_refused_samples_change_nothing(tmp_path: Path, at: float, metrics: dict[str, Any],
                                        match: str) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        with pytest.raises(ValueError, match=match):
            outbox.add_sample(at, metrics)
        assert (len(outbox), outbox.last_seq(), outbox.dropped()) == (0, None, Tally())


# -- the seq reservation -------------------------------------------------------------------


def _delete(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def test_after_the_file_is_deleted_seq_starts_above_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        old = [outbox.add_sample(T0 + i, {}).seq for i in range(3)]
        assert int(outbox.seq_path.read_text()) == old[0] + 3600 * 1_000_000
    _delete(path)
    with _open(path) as outbox:
        assert outbox.last_seq() is None
        # The clock is a day behind (no RTC, no NTP yet): seq still does not repeat.
        after = outbox.add_sample(T0 - 86_400, {}).seq
        assert after == old[0] + 3600 * 1_000_000
        assert outbox.add_event("fetch.failed", T0 - 86_400, {}).seq == after + 1
        # A clock past the reservation moves it on before the seq is used.
        later = outbox.add_sample(T0 + 7200, {}).seq
        assert int(outbox.seq_path.read_text()) == later + 3600 * 1_000_000


def test_without_file_and_reservation_the_clock_alone_orders_seq(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        old = [outbox.add_sample(T0, {}).seq for _ in range(1000)]  # run ahead of the clock
    _delete(path)
    path.with_suffix(".seq").write_text("garbage")
    with caplog.at_level(logging.WARNING, "agent.outbox"), _open(path) as outbox:
        assert outbox.add_sample(T0 + 0.01, {}).seq > max(old)
        assert outbox.add_sample(T0 - 1, {}).seq == math.floor((T0 + 0.01) * 1e6) + 1
    assert "reservation" in caplog.text


# -- corruption ------------------------------------------------------------------------------


def test_a_corrupt_file_is_set_aside_and_the_next_sample_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        outbox.add_sample(T0, {"i": 0})
    path.write_bytes(b"\x13not a database" * 500)
    with caplog.at_level(logging.ERROR, "agent.outbox"), _open(path) as outbox:
        assert len(outbox) == 0
        assert outbox.add_event("fetch.failed", T0 + 1, {}).detail == {}  # events carry nothing
        sample = outbox.add_sample(T0 + 1, {"i": 1})
        assert sample.metrics == {"i": 1, "buffer_reset": "corrupt"}
        assert "buffer_reset" not in outbox.add_sample(T0 + 2, {}).metrics
    assert "is corrupt" in caplog.text
    [aside] = tmp_path.glob("outbox.db.*.corrupt")
    assert aside.read_bytes().startswith(b"\x13not a database")


def test_only_the_newest_corrupt_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    for _ in range(5):
        path.write_bytes(b"garbage" * 100)
        _open(path).close()
    assert len(list(tmp_path.glob("outbox.db.*.corrupt"))) == 3


def test_corruption_found_while_running_keeps_seq_and_counts_the_lost(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        sent = [outbox.add_sample(T0 + i, {"pad": "x" * 2000}).seq for i in range(38)]
        sent += [outbox.add_event("fetch.started", T0 + 50, {"pad": "x" * 2000}).seq or 0
                 for _ in range(2)]
        outbox.ack(sent[:10])
        # Damage the file under the open connection, and make SQLite read it again.
        outbox._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with path.open("r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 4096 * 8)
        outbox._db.execute("PRAGMA shrink_memory")
        assert outbox.pending(100) == []
        after = outbox.add_sample(T0 - 100, {})  # the clock is behind: seq still follows
        assert after.seq == sent[-1] + 1
        assert (after.metrics["dropped"], after.metrics["dropped_events"]) == (28, 2)
        assert outbox.dropped() == Tally(28, 2)
    assert list(tmp_path.glob("outbox.db.*.corrupt"))


def test_an_unreadable_row_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        first = outbox.add_sample(T0, {"i": 0})
        event = outbox.add_event("fetch.failed", T0, {})
        second = outbox.add_sample(T0 + 1, {"i": 1})
        db = sqlite3.connect(path)
        with db:
            db.execute("UPDATE messages SET body = '[not json' WHERE seq = ?", (first.seq,))
            db.execute("UPDATE messages SET body = '{}' WHERE seq = ?", (event.seq,))
        db.close()
        assert outbox.pending(10) == [second]
        assert outbox.add_sample(T0 + 2, {}).metrics == {"dropped": 1, "dropped_events": 1}


# -- messages that could not be stored -------------------------------------------------------


def test_a_failed_add_raises_and_is_announced_even_after_a_restart(tmp_path: Path) -> None:
    """The seq reservation cannot be written (a directory stands in its way): the sample
    and the event are lost, and the count survives closing the outbox."""
    path = tmp_path / "outbox.db"
    path.with_suffix(".seq").mkdir()
    with _open(path) as outbox:
        with pytest.raises(OutboxError, match="free some disk space"):
            outbox.add_sample(T0, {})
        with pytest.raises(OutboxError):
            outbox.add_event("install.committed", T0, {})
        assert outbox.dropped() == Tally(1, 1)
        assert len(outbox) == 0
    path.with_suffix(".seq").rmdir()
    with _open(path) as outbox:
        assert outbox.dropped() == Tally(1, 1)
        assert outbox.add_sample(T0 + 1, {}).metrics == {"dropped": 1, "dropped_events": 1}
        assert outbox.add_sample(T0 + 2, {}).metrics == {}
        assert outbox.dropped() == Tally(1, 1)


def test_events_added_with_a_mark_are_not_counted_lost_they_are_announced_again(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.with_suffix(".seq").mkdir()
    with _open(path) as outbox:
        with pytest.raises(OutboxError):
            outbox.add_events([("install.staged", T0, {})], mark=("install/a", 3))
        assert (outbox.dropped(), outbox.mark("install/a")) == (Tally(), 0)
        path.with_suffix(".seq").rmdir()
        outbox.add_events([("install.staged", T0, {}), ("install.activating", T0, {})],
                          mark=("install/a", 4))
        assert outbox.mark("install/a") == 4
        outbox.add_events([("fetch.started", T0, {})], mark=("install/b", 2))
        assert outbox.add_events([], mark=("install/c", 1)) == []
        assert outbox.mark("install/c") == 0
        assert outbox.forget_marks("install/", keep={"install/b"}) == 1
        assert (outbox.mark("install/a"), outbox.mark("install/b")) == (0, 2)


def test_count_lost_is_announced_once(tmp_path: Path) -> None:
    with _open(tmp_path / "outbox.db") as outbox:
        outbox.count_lost(Tally(samples=3))
        outbox.count_lost(Tally())
        assert outbox.dropped() == Tally(3, 0)
        assert outbox.add_event("fetch.started", T0, {}).detail == {}
        assert outbox.add_sample(T0, {}).metrics == {"dropped": 3}
        assert outbox.add_sample(T0, {}).metrics == {}
    with _open(tmp_path / "outbox.db") as outbox:
        assert outbox.add_sample(T0, {}).metrics == {}  # folded once, not again
        assert outbox.dropped() == Tally(3, 0)


def test_a_new_file_does_not_count_losses_an_earlier_file_announced(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with _open(path) as outbox:
        outbox.count_lost(Tally(events=2))
        assert outbox.add_sample(T0, {}).metrics == {"dropped_events": 2}
    _delete(path)
    with _open(path) as outbox:
        assert outbox.add_sample(T0 + 1, {}).metrics == {}


def test_an_outbox_that_cannot_be_created_raises_outbox_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutboxError, match="cannot create its directory"):
        Outbox(tmp_path / "file" / "outbox.db")
    with pytest.raises(ValueError, match="max_rows"):
        Outbox(tmp_path / "outbox.db", max_rows=0)


# -- the telemetry buffer of agents before the outbox ---------------------------------------

_LEGACY_SCHEMA = """
CREATE TABLE samples (seq INTEGER PRIMARY KEY, at REAL NOT NULL, metrics TEXT NOT NULL,
                      dropped INTEGER NOT NULL DEFAULT 0, reset INTEGER NOT NULL DEFAULT 0);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO samples VALUES (1700000000000000, 1700000000.0, '{"i":0}', 0, 0);
INSERT INTO samples VALUES (1700000001000000, 1700000001.0, '{"dropped":2,"i":1}', 2, 0);
INSERT INTO meta VALUES ('last_seq', 1700000001000000), ('dropped_total', 2),
                        ('unreported', 1), ('reset', 0);
"""


def test_an_old_telemetry_buffer_becomes_the_outbox(tmp_path: Path) -> None:
    legacy = tmp_path / "telemetry.db"
    db = sqlite3.connect(legacy)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(_LEGACY_SCHEMA)
    (tmp_path / "telemetry.seq").write_text("1700003600000000\n")
    with Outbox.open_in(tmp_path) as outbox:
        db.close()
        assert outbox.path == tmp_path / "outbox.db"
        assert [(m.seq, dict(m.metrics)) for m in outbox.pending(10)  # type: ignore[union-attr]
                ] == [(1700000000000000, {"i": 0}), (1700000001000000, {"dropped": 2, "i": 1})]
        assert outbox.dropped() == Tally(2, 0)
        assert outbox.add_sample(T0, {}).metrics == {"dropped": 1}  # the unreported one
        assert outbox.last_seq() == 1700000001000001
    assert sorted(p.name for p in tmp_path.iterdir() if "telemetry" in p.name) == []
    assert (tmp_path / "outbox.seq").read_text() == "1700003600000000\n"


# -- threads -----------------------------------------------------------------------------------


def test_adding_and_acknowledging_from_three_threads(tmp_path: Path) -> None:
    added: list[int] = []
    acked: list[int] = []
    with _open(tmp_path / "outbox.db", max_rows=100_000) as outbox:
        def add(kind: str) -> None:
            for i in range(150):
                if kind == "sample":
                    added.append(outbox.add_sample(T0, {"i": i}).seq)
                else:
                    added.append(outbox.add_event(kind, T0, {"i": i}).seq or 0)

        threads = [threading.Thread(target=add, args=(k,)) for k in ("sample", "fetch.started")]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads) or len(outbox):
            batch = outbox.pending(7)
            if batch:
                assert _is_sorted([m.seq or 0 for m in batch])
                acked.extend(m.seq or 0 for m in batch)
                outbox.ack([m.seq or 0 for m in batch])
        assert outbox.dropped() == Tally()
    assert sorted(acked) == sorted(added) == list(range(min(added), min(added) + 300))
    assert _is_sorted(acked)


def _is_sorted(seqs: list[int]) -> bool:
    return seqs == sorted(seqs)


# -- the state machine -------------------------------------------------------------------------


@dataclass
class _Sent:
    seq: int
    kind: str  # "sample", or the event's kind
    at: float
    body: dict[str, Any]
    carried: Tally = field(default_factory=Tally)
    reset: bool = False


@dataclass
class _FileModel:
    """What one outbox file should hold."""

    pending: list[_Sent] = field(default_factory=list)
    last_seq: int | None = None
    dropped: Tally = field(default_factory=Tally)
    unreported: Tally = field(default_factory=Tally)
    reset: bool = False
    delivered_counts: Tally = field(default_factory=Tally)  # carried by acknowledged samples


class OutboxMachine(RuleBasedStateMachine):
    """Random samples and events, acknowledgements of any subset, refusals, losses,
    reopenings (with another bound), overflows, deletions and corruptions of the file,
    checked against a model of what the outbox must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-", dir=SCRATCH))
        self.path = self.dir / "outbox.db"
        self.clock_us = int(T0 * 1e6)
        self.max_rows = 1
        self.file = _FileModel()
        self.issued: list[int] = []  # every seq ever returned, across files
        self.acked: set[int] = set()
        self.clock_only = False
        self.outbox: Outbox | None = None

    @initialize(max_rows=st.integers(1, 6))
    def start(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.outbox = _open(self.path, max_rows)

    def teardown(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def live(self) -> Outbox:
        assert self.outbox is not None
        return self.outbox

    def _tick(self, step: int) -> float:
        if self.clock_only:  # see delete_file_and_seq_reservation
            step, self.clock_only = max(step, 0), False
        self.clock_us = max(0, self.clock_us + step)
        return self.clock_us / 1e6

    def _check_seq(self, seq: int, at: float) -> None:
        at_us = math.floor(at * 1e6)
        # seq: never behind the clock, strictly after everything issued, even across
        # deleted and corrupt files; exactly the clock or the last + 1 while the file lasts.
        assert seq >= at_us
        assert not self.issued or seq > max(self.issued)
        if self.file.last_seq is not None:
            assert seq == max(at_us, self.file.last_seq + 1)
        self.file.last_seq = seq
        self.issued.append(seq)

    def _make_room(self) -> None:
        """Evict as the outbox must before adding one: samples first, then events."""
        model = self.file
        while len(model.pending) + 1 > self.max_rows:
            victim = next((s for s in model.pending if s.kind == "sample"), model.pending[0])
            model.pending.remove(victim)
            self._lose(victim)

    def _lose(self, sent: _Sent) -> None:
        model = self.file
        one = Tally(1, 0) if sent.kind == "sample" else Tally(0, 1)
        model.dropped += one
        model.unreported += one + sent.carried
        model.reset = model.reset or sent.reset

    @rule(step=st.one_of(st.just(0), st.integers(-2_000_000, 3_000_000)),
          value=st.integers(-5, 5))
    def add_sample(self, step: int, value: int) -> None:
        at = self._tick(step)
        sample = self.live.add_sample(at, {"v": value})
        self._check_seq(sample.seq, at)
        model = self.file
        self._make_room()
        expected: dict[str, Any] = {"v": value}
        if model.unreported.samples:
            expected["dropped"] = model.unreported.samples
        if model.unreported.events:
            expected["dropped_events"] = model.unreported.events
        if model.reset:
            expected["buffer_reset"] = "corrupt"
        assert dict(sample.metrics) == expected
        model.pending.append(_Sent(sample.seq, "sample", at, expected, model.unreported,
                                   model.reset))
        model.unreported, model.reset = Tally(), False

    @rule(step=st.integers(-1_000_000, 1_000_000),
          kind=st.sampled_from(["fetch.started", "install.staged"]))
    def add_event(self, step: int, kind: str) -> None:
        at = self._tick(step)
        event = self.live.add_event(kind, at, {"k": kind})
        assert event.seq is not None
        self._check_seq(event.seq, at)
        self._make_room()
        assert (event.kind, dict(event.detail)) == (kind, {"k": kind})
        self.file.pending.append(_Sent(event.seq, kind, at, {"k": kind}))

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        model = self.file
        chosen = data.draw(st.sets(st.sampled_from([s.seq for s in model.pending] + [1])))
        gone = [s for s in model.pending if s.seq in chosen]
        assert self.live.ack(chosen) == len(gone)
        model.pending = [s for s in model.pending if s.seq not in chosen]
        for s in gone:
            model.delivered_counts += s.carried
        self.acked.update(s.seq for s in gone)

    @precondition(lambda self: self.file.pending)
    @rule(data=st.data())
    def refuse(self, data: st.DataObject) -> None:
        model = self.file
        victim = data.draw(st.sampled_from(model.pending))
        assert self.live.drop([victim.seq]) == 1
        model.pending.remove(victim)
        self._lose(victim)

    @rule(samples=st.integers(0, 3), events=st.integers(0, 3))
    def lose(self, samples: int, events: int) -> None:
        self.live.count_lost(Tally(samples, events))
        self.file.dropped += Tally(samples, events)
        self.file.unreported += Tally(samples, events)

    @rule(max_rows=st.integers(1, 6))
    def reopen(self, max_rows: int) -> None:
        self.live.close()
        self.max_rows = max_rows
        self.outbox = _open(self.path, max_rows)
        model = self.file
        while len(model.pending) > max_rows:  # a smaller bound applies at once
            victim = next((s for s in model.pending if s.kind == "sample"), model.pending[0])
            model.pending.remove(victim)
            self._lose(victim)

    def _wipe(self) -> None:
        self.live.close()
        self.outbox = None
        for suffix in ("-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    @rule()
    def delete_file(self) -> None:
        self._wipe()
        self.path.unlink(missing_ok=True)
        self.file = _FileModel()
        self.outbox = _open(self.path, self.max_rows)

    @rule()
    def delete_file_and_seq_reservation(self) -> None:
        """Only the clock is left to order seqs: it is assumed right (not behind the last
        message), which is what the guarantee rests on then."""
        self.delete_file()
        self.live.close()
        self.live.seq_path.unlink(missing_ok=True)
        self.clock_us = max([self.clock_us, *self.issued]) + 1
        self.clock_only = True
        self.outbox = _open(self.path, self.max_rows)

    @precondition(lambda self: self.path.exists())
    @rule()
    def corrupt_file(self) -> None:
        self._wipe()
        self.path.write_bytes(os.urandom(64) + b"\x00" * 4096)
        self.file = _FileModel(reset=True)
        self.outbox = _open(self.path, self.max_rows)
        assert list(self.dir.glob("outbox.db.*.corrupt"))

    @invariant()
    def holds_exactly_the_unacknowledged_messages_in_order(self) -> None:
        if self.outbox is None:
            return
        got = self.live.pending(100)
        assert [_key(m) for m in got] == [(s.seq, s.kind, s.at, s.body)
                                          for s in self.file.pending]
        assert not self.acked & {m.seq for m in got}
        assert len(self.live) == len(got) <= self.max_rows

    @invariant()
    def counts_every_drop(self) -> None:
        if self.outbox is None:
            return
        model = self.file
        assert self.live.dropped() == model.dropped
        # Conservation: every drop is counted by exactly one sample, sent or waiting, or is
        # still to be announced by the next one.
        waiting = Tally()
        for s in model.pending:
            waiting += s.carried
        assert model.dropped == model.delivered_counts + model.unreported + waiting

    @invariant()
    def seq_never_repeats(self) -> None:
        assert len(set(self.issued)) == len(self.issued)


def _key(message: Telemetry | Event) -> tuple[Any, ...]:
    if isinstance(message, Telemetry):
        return (message.seq, "sample", message.at, dict(message.metrics))
    return (message.seq, message.kind, message.at, dict(message.detail))


TestOutboxMachine = OutboxMachine.TestCase
TestOutboxMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 400)), max_size=40),
       st.integers(1, 12), st.integers(500, 3000))
def test_the_bounds_hold_and_every_message_is_kept_or_counted(
        adds: list[tuple[bool, int]], max_rows: int, max_bytes: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="outbox-", dir=SCRATCH))
    try:
        with _open(directory / "outbox.db", max_rows, max_bytes=max_bytes,
                   max_message_bytes=500) as outbox:
            added = Tally()
            for i, (is_sample, pad) in enumerate(adds):
                events_dropped = outbox.dropped().events
                if is_sample:
                    outbox.add_sample(T0 + i, {"pad": "x" * pad})
                    added += Tally(1, 0)
                else:
                    outbox.add_event("fetch.started", T0 + i, {"pad": "x" * pad})
                    added += Tally(0, 1)
                assert len(outbox) <= max_rows
                assert outbox.size() <= max_bytes
                # Samples are evicted first: an add evicts an event only when no sample is
                # left but the one it adds.
                if outbox.dropped().events > events_dropped:
                    assert outbox.waiting().samples <= int(is_sample)
            assert _is_sorted(_seqs(outbox))
            # Nothing is lost without being counted, per kind.
            assert outbox.waiting() + outbox.dropped() == added
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- kill -9 ---------------------------------------------------------------------------------

_CHILD = """
import sys, time
from pathlib import Path
from agent.outbox import Outbox

outbox = Outbox(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    if i % 3 == 2:
        print(outbox.add_event("fetch.started", time.time(), {"i": i}).seq, flush=True)
    else:
        print(outbox.add_sample(time.time(), {"i": i}).seq, flush=True)
print("done", flush=True)
time.sleep(60)
"""


@pytest.mark.integration
@pytest.mark.parametrize("adds", [1, 100_000])
def test_kill_9_right_after_an_add_loses_nothing(tmp_path: Path, adds: int) -> None:
    """The child prints each seq as soon as the add returned it; SIGKILL lands after the
    first (one add: while idle; many: in the middle of the next add)."""
    path = tmp_path / "outbox.db"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(adds)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    printed = [int(child.stdout.readline())]
    child.send_signal(signal.SIGKILL)
    rest = child.communicate(timeout=30)[0].split()
    assert child.returncode == -signal.SIGKILL
    printed += [int(line) for line in rest if line != "done"]
    with _open(path, max_rows=100_000) as outbox:
        found = _seqs(outbox)
        assert set(printed) <= set(found)
        assert _is_sorted(found)
        assert len(found) <= len(printed) + 1  # at most one committed and not yet printed
        assert outbox.add_sample(0.0, {}).seq == found[-1] + 1


# -- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        f.write(b"\0" * shutil.disk_usage(directory).free)
        with pytest.raises(OSError, match="No space left"):
            f.write(b"\0" * 4096)
    return filler


_FULL_DISK_CHILD = """
import sys, time
from pathlib import Path
from agent.loss_counter import Tally
from agent.outbox import Outbox, OutboxError

outbox = Outbox(Path(sys.argv[1]))
outbox.add_sample(time.time(), {"before": True})
print("ready", flush=True)
sys.stdin.readline()  # the disk is full now
failed = 0
for i in range(5):
    try:
        outbox.add_sample(time.time(), {"pad": "x" * 20000, "i": i})
    except OutboxError:
        failed += 1
try:
    outbox.add_event("install.failed", time.time(), {"pad": "y" * 10000})
except OutboxError:
    failed += 100
outbox.count_lost(Tally(samples=2))  # e.g. slots the sampler missed meanwhile
print(failed, flush=True)
time.sleep(60)
"""


@pytest.mark.integration
def test_samples_lost_to_a_full_disk_are_counted_across_a_kill_9(small_disk: Path) -> None:
    path = small_disk / "outbox.db"
    child = subprocess.Popen([sys.executable, "-c", _FULL_DISK_CHILD, str(path)], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    filler = _fill(small_disk)
    child.stdin.write("go\n")
    child.stdin.flush()
    failed = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    assert failed == 105  # every add failed: the disk is full
    filler.unlink()
    with _open(path) as outbox:
        assert outbox.dropped() == Tally(7, 1)
        [before] = outbox.pending(10)
        assert before.metrics == {"before": True}  # type: ignore[union-attr]
        assert outbox.add_sample(T0, {}).metrics == {"dropped": 7, "dropped_events": 1}

"""The publisher against a fake transport (the MQTT client is the outside world here; the
fleet link's tests drive it through a real Mosquitto): order, the in-flight window,
acknowledgement by message id, refusals, outages, the reported state, and event batches
(:func:`~agent.publisher.plan_messages`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.loss_counter import Tally
from agent.outbox import Message, Outbox
from agent.publisher import Publisher, plan_messages
from protocol.messages import (
    MAX_EVENT_BATCH_BYTES,
    MAX_EVENTS_PER_MESSAGE,
    Event,
    Telemetry,
    decode_events,
    decode_telemetry,
)

T0 = 1_700_000_000.0


@dataclass
class FakeClient:
    """Takes publishes while "connected" and numbers them like an MQTT client; the test
    acknowledges them."""

    up: bool = True
    next_mid: int = 1
    sent: list[tuple[int, str, bytes]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def send(self, leaf: str, payload: bytes) -> int | None:
        with self.changed:
            if not self.up:
                return None
            mid, self.next_mid = self.next_mid, self.next_mid + 1
            self.sent.append((mid, leaf, payload))
            self.changed.notify_all()
            return mid

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Until ``condition``: woken by each publish, and polling for what the publisher
        does to the outbox."""
        deadline = time.monotonic() + 10
        with self.changed:
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                self.changed.wait(0.02)

    def seqs(self) -> list[int | None]:
        """The seqs of the outbox messages sent, in the order sent (a batch's in order)."""
        return [seq for message in self.carried() for seq in message]

    def carried(self) -> list[list[int | None]]:
        """Per outbox message sent, the seqs it carried."""
        return [[decode_telemetry(p).seq] if leaf == "telemetry"
                else [e.seq for e in decode_events(p)]
                for _, leaf, p in self.sent if leaf != "reported"]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as box:
        yield box


@contextmanager
def _running(outbox: Outbox, client: FakeClient, window: int = 100,
             report: Callable[[], bytes] | None = None,
             linger_s: float = 0.0) -> Iterator[Publisher]:
    publisher = Publisher(outbox, client.send, report, window=window, linger_s=linger_s)
    publisher.start()
    try:
        yield publisher
    finally:
        publisher.stop()


def test_messages_go_out_in_seq_order_and_are_deleted_once_acknowledged(
        outbox: Outbox) -> None:
    client = FakeClient()
    added = [outbox.add_sample(T0, {"i": 0}).seq, outbox.add_event("fetch.started", T0, {}).seq,
             outbox.add_sample(T0 + 1, {"i": 1}).seq]
    with _running(outbox, client) as publisher:
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 3, "three publishes")
        assert client.seqs() == added
        assert [leaf for _, leaf, _ in client.sent] == ["telemetry", "events", "telemetry"]
        assert len(outbox) == 3  # nothing acknowledged yet
        publisher.acknowledged(client.sent[1][0])
        publisher.acknowledged(999)  # someone else's message (a chunk request): ignored
        publisher.acknowledged(client.sent[0][0])
        publisher.wake()
        client.wait_for(lambda: len(outbox) == 1, "two deleted")
        assert [m.seq for m in outbox.pending(10)] == [added[2]]


def test_at_most_a_window_is_in_flight_and_acknowledgements_make_room(
        outbox: Outbox) -> None:
    client = FakeClient()
    added = [outbox.add_sample(T0 + i, {"i": i}).seq for i in range(7)]
    with _running(outbox, client, window=3) as publisher:
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 3, "a full window")
        publisher.wake()  # nothing more goes out without an acknowledgement
        added.append(outbox.add_sample(T0 + 9, {}).seq)
        publisher.wake()
        for _ in range(5):  # acknowledge as they come, one by one
            mid = client.sent[len(client.sent) - 3][0]
            count = len(client.sent)
            publisher.acknowledged(mid)
            client.wait_for(lambda c=count: len(client.sent) == c + 1,  # type: ignore[misc]
                            "the next one")
        assert client.seqs() == added
        assert len(outbox) == 3


def test_messages_added_during_an_outage_follow_once_connected_in_order(outbox: Outbox) -> None:
    client = FakeClient()
    with _running(outbox, client) as publisher:
        publisher.connected()
        first = outbox.add_sample(T0, {}).seq
        publisher.wake()
        client.wait_for(lambda: client.seqs() == [first], "the first sample")
        publisher.disconnected()
        client.up = False
        later = [outbox.add_event("install.committed", T0 + 1, {}).seq,
                 outbox.add_sample(T0 + 2, {}).seq]
        publisher.wake()
        client.up = True
        publisher.connected()
        # The first stays in flight (the client sends it again itself); the rest follow.
        client.wait_for(lambda: client.seqs() == [first, *later], "the rest, in order")


def test_a_message_the_client_does_not_take_is_offered_again(outbox: Outbox) -> None:
    client = FakeClient(up=False)
    seq = outbox.add_sample(T0, {}).seq
    with _running(outbox, client) as publisher:
        publisher.connected()  # the client says no all the same: going down
        publisher.wake()
        client.up = True
        publisher.connected()
        client.wait_for(lambda: client.seqs() == [seq], "the sample")


def test_a_refused_message_is_dropped_and_counted(outbox: Outbox) -> None:
    client = FakeClient()
    outbox.add_event("protocol_error", T0, {"pad": "x"})
    with _running(outbox, client) as publisher:
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 1, "the event")
        publisher.acknowledged(client.sent[0][0], refused=True)
        client.wait_for(lambda: len(outbox) == 0, "the event dropped")
        assert outbox.dropped() == Tally(0, 1)


def test_the_reported_state_goes_out_on_connect_and_when_asked_once_per_burst(
        outbox: Outbox) -> None:
    client = FakeClient()
    built = []

    def report() -> bytes:
        built.append(1)
        return b'{"state": %d}' % len(built)

    with _running(outbox, client, report=report) as publisher:
        publisher.request_report()  # not connected: waits
        publisher.connected()
        client.wait_for(lambda: [p for _, leaf, p in client.sent if leaf == "reported"]
                        == [b'{"state": 1}'], "the report on connect")
        for _ in range(5):
            publisher.request_report()
        client.wait_for(lambda: sum(leaf == "reported" for _, leaf, _ in client.sent) >= 2,
                        "a fresh report")
        publisher.stop()
        assert 2 <= len(built) <= 6  # a burst of requests is coalesced, none is lost
        assert client.sent[-1][2] == b'{"state": %d}' % len(built)


def test_an_idle_publisher_lingers_so_a_burst_goes_in_one_pass(outbox: Outbox) -> None:
    """An install's transitions come milliseconds apart, each with an event and a report
    request: woken while idle, the publisher waits for the rest (here a long linger, so
    the burst is surely inside it) and sends one batch and one report."""
    client = FakeClient()
    built = []

    def report() -> bytes:
        built.append(1)
        return b'{"state": %d}' % len(built)

    with _running(outbox, client, report=report, linger_s=2.0) as publisher:
        publisher.batch_events(True)
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 1, "the report on connect")
        publisher.acknowledged(client.sent[0][0])
        added = []
        for state in ("staged", "activating", "probation"):
            added.append(outbox.add_event(f"install.{state}", T0, {}).seq)
            publisher.wake()
            publisher.request_report()
        client.wait_for(lambda: len(client.sent) == 3, "one report and one batch")
        assert sorted(leaf for _, leaf, _ in client.sent[1:]) == ["events", "reported"]
        assert client.carried() == [added]
        assert len(built) == 2


def test_a_linger_outside_its_bounds_is_refused(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="linger_s must be 0 to 5 seconds"):
        Publisher(outbox, FakeClient().send, linger_s=6.0)


def test_acknowledgements_that_arrived_are_applied_on_stop(outbox: Outbox) -> None:
    client = FakeClient()
    outbox.add_sample(T0, {})
    publisher = Publisher(outbox, client.send)
    publisher.start()
    publisher.connected()
    client.wait_for(lambda: len(client.sent) == 1, "the sample")
    publisher.acknowledged(client.sent[0][0])
    publisher.stop()
    assert len(outbox) == 0


def _event(seq: int, size: int = 0) -> Event:
    return Event("install.verifying", T0 + seq, {"pad": "x" * size}, seq=seq)


def test_plan_batches_consecutive_events_and_sends_samples_alone() -> None:
    pending: list[Message] = [_event(1), _event(2), Telemetry(3, T0, {}), _event(4),
                              _event(5), _event(6)]
    planned = plan_messages(pending, 10, batch=True, more=False)
    assert [(m.leaf, m.seqs) for m in planned] == [
        ("events", (1, 2)), ("telemetry", (3,)), ("events", (4, 5, 6))]
    assert [e.seq for e in decode_events(planned[2].payload)] == [4, 5, 6]
    # Without the server's feature: one event per message, as a plain event.
    single = plan_messages(pending, 10, batch=False, more=False)
    assert [m.seqs for m in single] == [(1,), (2,), (3,), (4,), (5,), (6,)]
    assert b'"events"' not in single[0].payload


def test_plan_bounds_a_batch_by_count_bytes_and_the_room() -> None:
    many = [_event(i) for i in range(1, 2 * MAX_EVENTS_PER_MESSAGE + 2)]
    planned = plan_messages(many, 10, batch=True, more=False)
    assert [len(m.seqs) for m in planned] == [MAX_EVENTS_PER_MESSAGE] * 2 + [1]
    big = [_event(i, 15_000) for i in range(1, 11)]
    planned = plan_messages(big, 10, batch=True, more=False)
    assert all(len(m.payload) <= MAX_EVENT_BATCH_BYTES for m in planned)
    assert [s for m in planned for s in m.seqs] == list(range(1, 11))
    assert len(planned) == 3  # four of about 15 KiB fill a batch
    assert len(plan_messages(many, 1, batch=True, more=False)) == 1


def test_plan_holds_back_a_batch_open_at_the_end_of_what_was_read() -> None:
    pending: list[Message] = [Telemetry(1, T0, {}), _event(2), _event(3)]
    assert [m.seqs for m in plan_messages(pending, 10, batch=True, more=True)] == [(1,)]
    assert [m.seqs for m in plan_messages(pending, 10, batch=True, more=False)] == [
        (1,), (2, 3)]


def test_with_the_feature_waiting_events_go_as_one_batch_acknowledged_together(
        outbox: Outbox) -> None:
    client = FakeClient()
    added = [outbox.add_event(f"install.{state}", T0 + i, {}).seq
             for i, state in enumerate(("verifying", "staged", "activating"))]
    sample = outbox.add_sample(T0 + 5, {}).seq
    with _running(outbox, client) as publisher:
        publisher.batch_events(True)
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 2, "the batch and the sample")
        assert client.carried() == [added, [sample]]
        assert publisher.in_flight() == 2
        publisher.acknowledged(client.sent[0][0])
        client.wait_for(lambda: len(outbox) == 1, "the batch's three deleted")
        assert [m.seq for m in outbox.pending(10)] == [sample]


def test_a_refused_batch_drops_all_its_events(outbox: Outbox) -> None:
    client = FakeClient()
    for i in range(3):
        outbox.add_event("protocol_error", T0 + i, {})
    with _running(outbox, client) as publisher:
        publisher.batch_events(True)
        publisher.connected()
        client.wait_for(lambda: len(client.sent) == 1, "the batch")
        publisher.acknowledged(client.sent[0][0], refused=True)
        client.wait_for(lambda: len(outbox) == 0, "the batch dropped")
        assert outbox.dropped() == Tally(0, 3)


def test_a_window_of_batches_sends_every_event_once_in_order(outbox: Outbox) -> None:
    client = FakeClient()
    added = [outbox.add_event("protocol_error", T0 + i, {}).seq for i in range(100)]
    with _running(outbox, client, window=2) as publisher:
        publisher.batch_events(True)
        publisher.connected()
        for i in range(4):  # acknowledge each as it comes: the window refills
            client.wait_for(lambda i=i: len(client.sent) > i, f"message {i + 1}")  # type: ignore[misc]
            publisher.acknowledged(client.sent[i][0])
        client.wait_for(lambda: len(outbox) == 0, "every event acknowledged")
        assert client.seqs() == added
        assert [len(m) for m in client.carried()] == [32, 32, 32, 4]

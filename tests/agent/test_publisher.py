"""The publisher against a fake transport (the MQTT client is the outside world here; the
fleet link's tests drive it through a real Mosquitto): order, the in-flight window,
acknowledgement by message id, refusals, outages and the reported state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.loss_counter import Tally
from agent.outbox import Outbox
from agent.publisher import Publisher
from protocol.messages import decode_event, decode_telemetry

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
        """The seqs of the outbox messages sent, in the order sent."""
        return [decode_telemetry(p).seq if leaf == "telemetry" else decode_event(p).seq
                for _, leaf, p in self.sent if leaf != "reported"]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.db") as box:
        yield box


@contextmanager
def _running(outbox: Outbox, client: FakeClient, window: int = 100,
             report: Callable[[], bytes] | None = None) -> Iterator[Publisher]:
    publisher = Publisher(outbox, client.send, report, window=window)
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

"""Publishing the outbox (and the ``reported`` state) to the broker, on its own thread.

The fleet link's MQTT client is the transport; this module decides what to send when. It
drains the :class:`~agent.outbox.Outbox` in seq order with up to ``window`` messages in
flight, never waiting on one: each publish returns at once, and a message is acknowledged
in the outbox (deleted) when the broker's PUBACK for it arrives, reported by the MQTT
client's ``on_publish`` callback through :meth:`Publisher.acknowledged`. So a half-open
link or a broker that stopped answering fills the window and then simply waits; nothing
else (sampling, installs, inference) waits with it.

While the connection is down nothing new is handed to the client. Messages already handed
over stay in flight: the MQTT client keeps them and sends them again when it reconnects
(paho does for QoS 1, before anything newer), and the outbox keeps them until their PUBACK,
so a restart of the agent sends them again too. The server ignores a seq it already has.

To a server whose last desired state lists :data:`~protocol.messages.FEATURE_EVENT_BATCH`
(:meth:`Publisher.batch_events`), events waiting next to each other in the outbox go as one
:class:`~protocol.messages.EventBatch` message (at most
:data:`~protocol.messages.MAX_EVENTS_PER_MESSAGE` events and
:data:`~protocol.messages.MAX_EVENT_BATCH_BYTES`, oldest first, each with its seq): one
PUBACK acknowledges them all, and a batch not acknowledged is sent again whole, so the
server dedupes by seq as for single events. To any other server, one event per message
(:func:`plan_messages` decides).

The ``reported`` state is not queued: only the newest matters, so :meth:`request_report`
marks it wanted, and the thread builds and publishes it once connected (on every connect
too).

Woken while nothing is in flight, the thread lingers ``linger_s`` (:data:`LINGER_S`) before
it publishes, so that what happens in one burst goes in one pass: an install's transitions
come milliseconds apart (downloading and fetch started; staged, activating and probation),
and each asks for a report and adds an event. Counted in a real ``edge-agent run``
(``benchmarks/agent_messages.py``), an install sent 8-9 reports and 6-7 event messages
without it. Busy (messages in flight), it does not linger: a backlog drains at the window's
pace.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from protocol.messages import (
    MAX_EVENT_BATCH_BYTES,
    MAX_EVENTS_PER_MESSAGE,
    Event,
    EventBatch,
    Telemetry,
    encode,
)

from .outbox import Message, Outbox, OutboxError

__all__ = ["DEFAULT_WINDOW", "LINGER_S", "Outgoing", "Publisher", "Send", "plan_messages"]

log = logging.getLogger(__name__)

#: Messages in flight (published, no PUBACK yet) at most.
DEFAULT_WINDOW = 100
#: Seconds an idle publisher waits after a wake-up for the rest of a burst.
LINGER_S = 0.25
# Woken by every change; this only retries after a failure (the disk) with nothing new.
_RETRY_S = 5.0
#: Publish ``payload`` on the device's topic ``leaf`` at QoS 1; returns the message id the
#: client will acknowledge it with, or None if the client did not take it.
Send = Callable[[str, bytes], int | None]
# What a batch adds around its events (``{"events":[...],"protocol":N}``), rounded up; each
# event is counted as encoded alone, which is longer than inside the batch.
_BATCH_ENVELOPE = 64


@dataclass(frozen=True)
class Outgoing:
    """One MQTT message to publish: its topic leaf, payload and the outbox seqs it carries."""

    leaf: str
    payload: bytes
    seqs: tuple[int, ...]


def plan_messages(pending: Sequence[Message], limit: int, *, batch: bool,
                  more: bool) -> list[Outgoing]:
    """The messages that send ``pending`` (oldest first, as the outbox hands them out), at
    most ``limit`` of them.

    With ``batch``, consecutive events go as one :class:`EventBatch` of at most
    MAX_EVENTS_PER_MESSAGE events and MAX_EVENT_BATCH_BYTES (one event alone goes as a
    plain event, as to an older server). ``more``: the outbox may hold more after
    ``pending``; a batch still open at its end is then left for the next call, which
    reads it with what follows, rather than sent short. Samples always go one each."""
    planned: list[Outgoing] = []
    run: list[tuple[Event, bytes]] = []  # consecutive events not yet planned
    run_bytes = _BATCH_ENVELOPE

    def close_run() -> None:
        nonlocal run_bytes
        if len(run) == 1:
            planned.append(Outgoing("events", run[0][1], (_seq(run[0][0]),)))
        elif run:
            planned.append(Outgoing("events", encode(EventBatch(tuple(e for e, _ in run))),
                                    tuple(_seq(e) for e, _ in run)))
        run.clear()
        run_bytes = _BATCH_ENVELOPE

    for message in pending:
        if len(planned) >= limit:
            return planned
        payload = encode(message)
        if not batch or isinstance(message, Telemetry):
            close_run()
            if len(planned) >= limit:
                return planned
            planned.append(Outgoing(_leaf(message), payload, (_seq(message),)))
            continue
        if run and (len(run) == MAX_EVENTS_PER_MESSAGE
                    or run_bytes + len(payload) + 1 > MAX_EVENT_BATCH_BYTES):
            close_run()
            if len(planned) >= limit:
                return planned
        run.append((message, payload))
        run_bytes += len(payload) + 1
    if run and not (more and len(run) < MAX_EVENTS_PER_MESSAGE):
        close_run()
    return planned


class Publisher:
    """Drains ``outbox`` through ``send`` and publishes ``report()`` when asked.

    Call :meth:`connected` and :meth:`disconnected` from the client's connection callbacks,
    :meth:`acknowledged` from its ``on_publish``, and :meth:`wake` after adding to the
    outbox. All of them only set flags, so they are safe from any thread, callbacks
    included.
    """

    def __init__(self, outbox: Outbox, send: Send, report: Callable[[], bytes] | None = None,
                 *, window: int = DEFAULT_WINDOW, linger_s: float = LINGER_S) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        if not 0.0 <= linger_s <= 5.0:
            raise ValueError(f"linger_s must be 0 to 5 seconds, not {linger_s}")
        self.linger_s = linger_s
        self.outbox = outbox
        self.send = send
        self.report = report
        self.window = window
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()  # guards _acks and _report_wanted only
        self._acks: list[tuple[int, bool]] = []  # (message id, refused) as they arrive
        self._report_wanted = False
        self._batch = False  # the server takes event batches
        # Only the publishing thread touches these.
        self._in_flight: dict[int, tuple[int, ...]] = {}  # message id -> seqs it carries
        self._cursor: int | None = None  # the highest seq handed to the client
        self._thread: threading.Thread | None = None

    # -- from any thread ----------------------------------------------------------------

    def wake(self) -> None:
        """Something was added to the outbox."""
        self._wake.set()

    def connected(self) -> None:
        """The connection is up: publish, and report the state afresh."""
        self._connected.set()
        self.request_report()

    def disconnected(self) -> None:
        """The connection is down: hand nothing new to the client until it is back."""
        self._connected.clear()

    def acknowledged(self, mid: int, refused: bool = False) -> None:
        """The broker acknowledged message ``mid`` (``refused``: with a failure reason)."""
        with self._lock:
            self._acks.append((mid, refused))
        self._wake.set()

    def batch_events(self, on: bool) -> None:
        """Whether the server takes :class:`EventBatch` messages (its latest desired state
        lists FEATURE_EVENT_BATCH); from the next message on."""
        self._batch = on

    def request_report(self) -> None:
        """Publish the reported state soon (once, however often asked meanwhile)."""
        with self._lock:
            self._report_wanted = True
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Start publishing on a thread of its own."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgefleet-publisher",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop publishing; acknowledgements that already arrived are applied first."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def in_flight(self) -> int:
        """Messages handed to the client and not yet acknowledged (publishing thread)."""
        return len(self._in_flight)

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(_RETRY_S)
            if woken and self.linger_s and not self._in_flight:
                self._stop.wait(self.linger_s)  # the rest of the burst; a stop cuts it short
            self._wake.clear()
            try:
                self._settle()
                if self._stop.is_set():
                    return
                if self._connected.is_set():
                    self._publish_report()
                    self._fill_window()
            except OutboxError as exc:  # the disk; the next wake-up tries again
                log.error("publishing from the outbox failed: %s", exc)
            except Exception:  # the publisher must outlive any one failure
                log.exception("publishing from the outbox failed")

    def _settle(self) -> None:
        """Apply the acknowledgements that arrived: delete what the broker has, drop what
        it refused. An id that is not one of ours (a chunk request, a report) is ignored."""
        with self._lock:
            acks, self._acks = self._acks, []
        delivered: list[int] = []
        refused: list[int] = []
        for mid, failed in acks:
            seqs = self._in_flight.pop(mid, ())
            (refused if failed else delivered).extend(seqs)
        if refused:
            log.warning("the broker refused %d outbox message(s); dropping them (counted)",
                        len(refused))
            self.outbox.drop(refused)
        self.outbox.ack(delivered)

    def _publish_report(self) -> None:
        if self.report is None:
            return
        with self._lock:
            wanted, self._report_wanted = self._report_wanted, False
        if wanted and self.send("reported", self.report()) is None:
            self.request_report()  # not taken: when the connection is back

    def _fill_window(self) -> None:
        while len(self._in_flight) < self.window and self._connected.is_set():
            room = self.window - len(self._in_flight)
            batch = self._batch
            # Batching, read a batch's worth more than the room: a batch open at the end
            # is held back (plan_messages), and the room must still fill.
            limit = room + MAX_EVENTS_PER_MESSAGE if batch else room
            pending = self.outbox.pending(limit, after=self._cursor)
            planned = plan_messages(pending, room, batch=batch, more=len(pending) == limit)
            if not planned:
                return
            for message in planned:
                mid = self.send(message.leaf, message.payload)
                if mid is None:
                    return  # the client did not take it: the connection is going down
                self._in_flight[mid] = message.seqs
                self._cursor = message.seqs[-1]


def _leaf(message: Message) -> str:
    return "telemetry" if isinstance(message, Telemetry) else "events"


def _seq(message: Message) -> int:
    return cast("int", message.seq)  # the outbox numbers every message

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

The ``reported`` state is not queued: only the newest matters, so :meth:`request_report`
marks it wanted, and the thread builds and publishes it once connected (on every connect
too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import cast

from protocol.messages import Telemetry, encode

from .outbox import Message, Outbox, OutboxError

__all__ = ["DEFAULT_WINDOW", "Publisher", "Send"]

log = logging.getLogger(__name__)

#: Messages in flight (published, no PUBACK yet) at most.
DEFAULT_WINDOW = 100
# Woken by every change; this only retries after a failure (the disk) with nothing new.
_RETRY_S = 5.0
#: Publish ``payload`` on the device's topic ``leaf`` at QoS 1; returns the message id the
#: client will acknowledge it with, or None if the client did not take it.
Send = Callable[[str, bytes], int | None]


class Publisher:
    """Drains ``outbox`` through ``send`` and publishes ``report()`` when asked.

    Call :meth:`connected` and :meth:`disconnected` from the client's connection callbacks,
    :meth:`acknowledged` from its ``on_publish``, and :meth:`wake` after adding to the
    outbox. All of them only set flags, so they are safe from any thread, callbacks
    included.
    """

    def __init__(self, outbox: Outbox, send: Send, report: Callable[[], bytes] | None = None,
                 *, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
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
        # Only the publishing thread touches these.
        self._in_flight: dict[int, int] = {}  # message id -> seq
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
            self._wake.wait(_RETRY_S)
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
            seq = self._in_flight.pop(mid, None)
            if seq is not None:
                (refused if failed else delivered).append(seq)
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
            batch = self.outbox.pending(self.window - len(self._in_flight),
                                        after=self._cursor)
            if not batch:
                return
            for message in batch:
                mid = self.send(_leaf(message), encode(message))
                if mid is None:
                    return  # the client did not take it: the connection is going down
                seq = cast("int", message.seq)  # the outbox numbers every message
                self._in_flight[mid] = self._cursor = seq


def _leaf(message: Message) -> str:
    return "telemetry" if isinstance(message, Telemetry) else "events"

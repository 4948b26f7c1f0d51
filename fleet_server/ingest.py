"""Storing what devices send: reports, events and telemetry, in batches, acknowledged once
committed.

The MQTT network thread hands every device message to :meth:`Ingest.put`; an ingest thread
takes up to :data:`BATCH` messages, decodes them (outside any transaction) and stores them
with one registry call, a few statements for the whole batch
(``registry/device_messages.py``), in one transaction (one commit, on SQLite one fsync),
and only then acknowledges them to the broker, so a message is never lost between receipt
and storage (the broker delivers an unacknowledged one again). An ``events`` message may
carry a batch of events (``protocol.messages.EventBatch``, which the server advertises in
every desired state); each is stored once per (device, seq). On PostgreSQL :data:`WORKERS`
ingest threads write at once, each with its own transaction and the devices whose id
hashes to it, so one device's messages keep their order (a thread waits on the database
for most of a batch: docs/scale.md). SQLite takes one writer at a time: one thread. The
queues are bounded (:data:`QUEUE` in all): when the database falls behind, the network
thread waits for room, and the broker holds (and bounds, with its per-client limits) what
would otherwise pile up in this process's memory.

When the database is unavailable (a lost or refused connection, SQLite's lock timeout:
:func:`~fleet_server.registry.is_outage`), nothing is acknowledged: the thread keeps its
batch and tries again after a wait that doubles from :data:`OUTAGE_FIRST_WAIT_S` to
:data:`OUTAGE_MAX_WAIT_S` (logged once when the outage starts and once when it ends). It
takes nothing more from its queue meanwhile, so the queue fills, the network thread waits
for room and the broker holds the rest. Messages a failed batch transaction had stored
one by one before the database went are acknowledged; the rest wait. A message whose
storage fails for any other reason (a bug: the database answered) is logged and
acknowledged, so it cannot block its device's later messages forever.

A malformed message is logged and recorded as a ``protocol_error`` event (at most
:data:`PROTOCOL_ERRORS_PER_MINUTE` per device and minute; beyond that they are counted and
the count logged once); nothing a device sends stops the service.

Each device may send so many messages per second (:class:`~fleet_server.rate_limit.
MessageLimits`, checked by :meth:`Ingest.put` on the network thread before queueing: one
device's flood must not delay everyone's storage). A message over its device's allowance
is acknowledged and dropped; what a device had dropped is counted per kind and recorded as
one ``rate_limited`` event (and one log line) per device and minute (docs/scale.md, "Rate
limits", for the defaults and why they pass an agent's back-fill after an outage).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.client import MQTTMessageInfo

from protocol import messages
from protocol.errors import ProtocolError
from transport.mqtt import wait_published

from .errors import RegistryError
from .experiment_runner import ExperimentRunner
from .rate_limit import MessageLimits
from .registry import DeviceEvent, DeviceMessage, DeviceSample, Registry, is_outage
from .registry.database import one_line
from .registry.device_messages import report_from_payload

__all__ = ["BATCH", "DEVICE_EVENT_PREFIX", "MESSAGES", "OFFLINE_EVENT", "OUTAGE_FIRST_WAIT_S",
           "OUTAGE_MAX_WAIT_S", "PROTOCOL_ERROR", "QUEUE", "RATE_LIMITED", "TELEMETRY",
           "WORKERS", "Inbound", "Ingest", "limit_kind"]

log = logging.getLogger(__name__)

#: Messages stored per transaction, at most.
BATCH = 200
#: Device messages waiting for the ingest threads, at most (all threads together).
QUEUE = 10_000
#: Ingest threads on a database that takes concurrent writers (PostgreSQL).
WORKERS = 4
#: Event kind recorded for a message a device sent that could not be used.
PROTOCOL_ERROR = "protocol_error"
#: An ``events`` message of this kind (the agent's MQTT will, or a clean stop) marks the
#: device offline; every other message from a device marks it online.
OFFLINE_EVENT = "offline"
#: Event kinds devices send are stored under this prefix (``agent.install.committed``): a
#: device cannot write an event that reads as one of the server's own.
DEVICE_EVENT_PREFIX = "agent."
#: A device stuck in a loop of bad messages must fill neither the event log nor the log file.
PROTOCOL_ERRORS_PER_MINUTE = 10
#: Event kind recorded, once a minute at most, for a device whose messages went over its
#: allowance; its detail counts the dropped messages per kind.
RATE_LIMITED = "rate_limited"
#: The kinds of :func:`limit_kind`: telemetry, and every other message (events, reports).
TELEMETRY = "telemetry"
MESSAGES = "messages"
#: Waits between two tries of a batch while the database is unavailable: the first, and
#: the longest (each doubles the one before).
OUTAGE_FIRST_WAIT_S = 0.5
OUTAGE_MAX_WAIT_S = 10.0
#: An idle ingest thread looks this often for rate-limit windows to record.
_IDLE_S = 5.0


@dataclass(frozen=True)
class Inbound:
    """A message from a device, with what its acknowledgement needs."""

    device: str
    leaf: str
    payload: bytes
    mid: int
    qos: int
    #: The connection it came on (the service's connection counter).
    generation: int
    #: A message already judged unusable (a chunk request that could not be answered, a
    #: retained message): the error to record.
    error: Exception | None = None
    #: A refused retained message: the publish that clears it from the broker, which must
    #: have gone out before the message is acknowledged.
    clearing: MQTTMessageInfo | None = None
    #: When it was received (time.monotonic()), for the ingest lag.
    received: float = field(default_factory=time.monotonic)


def limit_kind(leaf: str) -> str:
    """The allowance a message on topic ``leaf`` counts against (:class:`MessageLimits`)."""
    return TELEMETRY if leaf == "telemetry" else MESSAGES


class Ingest:
    """The ingest thread and its bounded queue; ``ack`` acknowledges a stored message;
    ``on_samples`` (monitoring) is called with the new telemetry samples of each batch,
    each (device, sample), in the batch's transaction; ``experiments`` counts the
    experiment deltas of every telemetry message in the same transaction, and pushes the
    merged posteriors once the batch is committed; ``limits`` (keyed by
    :func:`limit_kind`) bounds what each device may send, None nothing."""

    def __init__(self, registry: Registry, ack: Callable[[Inbound], None],
                 on_samples: Callable[[list[tuple[str, messages.Telemetry]]], None]
                 | None = None, experiments: ExperimentRunner | None = None, *,
                 workers: int | None = None, limits: MessageLimits | None = None) -> None:
        self._registry = registry
        self._ack = ack
        self._on_samples = on_samples
        self._experiments = experiments
        self._limits = limits
        #: Seconds from receipt to commit of the oldest message of the last batch stored.
        self.lag_s = 0.0
        #: Messages acknowledged and dropped for going over their device's allowance.
        self.dropped = 0
        self._stopping = threading.Event()
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None
        if workers is None:
            workers = WORKERS if registry.concurrent_writers else 1
        self._inboxes: list[queue.Queue[Inbound | None]] = [
            queue.Queue(max(1, QUEUE // workers)) for _ in range(workers)]
        self._threads: list[threading.Thread] = []
        self._error_budget: dict[str, tuple[float, int]] = {}

    @property
    def workers(self) -> int:
        """Ingest threads."""
        return len(self._inboxes)

    @property
    def depth(self) -> int:
        """Messages waiting to be stored."""
        return sum(inbox.qsize() for inbox in self._inboxes)

    @property
    def outage(self) -> bool:
        """Whether the last try to store found the database unavailable."""
        return self._outage_since is not None

    def start(self) -> None:
        """Start the ingest threads."""
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._loop, args=(inbox,), daemon=True,
                                          name=f"fleet-ingest-{n}")
                         for n, inbox in enumerate(self._inboxes)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Store and acknowledge what was received so far, then stop. Idempotent. While
        the database is unavailable, what is left is not acknowledged (the broker delivers
        it again, to this process or another)."""
        threads, self._threads = self._threads, []
        self._stopping.set()  # a thread waiting out an outage gives up
        for inbox in self._inboxes if threads else ():
            inbox.put(None)
        for thread in threads:
            thread.join()
        if threads:
            self._record_dropped(every=True)

    def put(self, inbound: Inbound) -> None:
        """Queue ``inbound`` for storage; waits while its queue is full (back-pressure).
        A device's messages always go to the same thread, in the order they came. A
        message over its device's allowance is acknowledged and dropped instead."""
        limits = self._limits
        if (limits is not None and inbound.error is None
                and not limits.admit(inbound.device, limit_kind(inbound.leaf),
                                     time.monotonic())):
            self.dropped += 1
            self._ack(inbound)
            return
        inboxes = self._inboxes
        index = zlib.crc32(inbound.device.encode()) % len(inboxes) if len(inboxes) > 1 else 0
        inboxes[index].put(inbound)

    def _loop(self, inbox: queue.Queue[Inbound | None]) -> None:
        """Store what devices send, in batches, until None arrives."""
        while True:
            try:
                item = inbox.get(timeout=_IDLE_S)
            except queue.Empty:
                self._record_dropped()
                continue
            batch: list[Inbound] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._store_batch(batch)
                self._record_dropped()
            if item is None:
                return

    def _store_batch(self, batch: list[Inbound]) -> None:
        """Store ``batch`` and acknowledge what was stored, waiting out an outage of the
        database (:meth:`_attempt` does one try)."""
        # Decoded before the transaction opens: it holds the devices' row locks meanwhile.
        decoded = [(item, self._decode(item)) for item in batch]
        wait = OUTAGE_FIRST_WAIT_S
        while decoded:
            if self._stopping.is_set() and self.outage:
                log.warning("stopping while the database is unavailable: %d device "
                            "message(s) left unacknowledged, the broker delivers them again",
                            len(decoded))
                return
            decoded, outage = self._attempt(decoded)
            if outage is None:
                self._recovered()
                break
            self._note_outage(outage, wait)
            self._stopping.wait(wait)
            wait = min(OUTAGE_MAX_WAIT_S, wait * 2)
        self.lag_s = time.monotonic() - min(item.received for item in batch)
        if self._experiments is not None:
            self._experiments.flush()

    def _attempt(self, decoded: list[tuple[Inbound, list[DeviceMessage] | Exception]]
                 ) -> tuple[list[tuple[Inbound, list[DeviceMessage] | Exception]],
                            Exception | None]:
        """Store ``decoded`` in one transaction and acknowledge it. Should the transaction
        fail for another reason than an outage (a bug, monitoring failing), each message is
        stored and acknowledged alone. Returns what is left to store, and the outage that
        stopped it (None: nothing is left)."""
        try:
            with self._registry.batch():
                self._store(decoded)
        except Exception as exc:
            if is_outage(exc):
                return decoded, exc
            log.warning("could not store %d device message(s) in one transaction; storing "
                        "them one by one", len(decoded), exc_info=True)
        else:
            self._acknowledge(decoded)
            return [], None
        for index, one in enumerate(decoded):
            try:
                self._store([one])
            except Exception as exc:
                if is_outage(exc):
                    return decoded[index:], exc
                # A bug (the database answered, the message decoded): trying again cannot
                # help, and would hold the device's later messages back for good.
                log.exception("failed to handle %s from %s", one[0].leaf, one[0].device)
            self._acknowledge([one])
        return [], None

    def _acknowledge(self, decoded: list[tuple[Inbound, list[DeviceMessage] | Exception]]
                     ) -> None:
        for item, _ in decoded:
            if item.clearing is None or wait_published(item.clearing):
                self._ack(item)
            # else: unacknowledged, the broker delivers it again and it is cleared then

    def _note_outage(self, exc: Exception, wait: float) -> None:
        with self._outage_lock:
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
        if first:
            log.warning("the registry's database is unavailable (%s); device messages stay "
                        "unacknowledged (the broker holds them) and are stored when it is "
                        "back; trying again every %g-%g s", one_line(exc),
                        OUTAGE_FIRST_WAIT_S, OUTAGE_MAX_WAIT_S)
        else:
            log.debug("the registry's database is still unavailable (%s); next try in %g s",
                      one_line(exc), wait)

    def _recovered(self) -> None:
        if self._outage_since is None:
            return  # the common case, without the lock
        with self._outage_lock:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            log.warning("the registry's database is back after %.1f s; storing the device "
                        "messages held meanwhile", time.monotonic() - since)

    def _record_dropped(self, *, every: bool = False) -> None:
        """Record the rate-limit windows that ended: one event and one log line each."""
        if self._limits is None:
            return
        for window in self._limits.closed(time.monotonic(), every=every):
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(window.counts.items()))
            log.warning("%s sent over its allowance: dropped %s message(s) in %.0f s",
                        window.device, counts,
                        min(self._limits.window_s, time.monotonic() - window.since))
            try:
                self._registry.add_event(RATE_LIMITED, device=window.device,
                                         detail={"dropped": window.counts})
            except Exception as exc:  # the counts are logged above; the thread goes on
                log.warning("could not record the rate limit of %s (%s)", window.device,
                            one_line(exc), exc_info=not is_outage(exc))

    @staticmethod
    def _decode(item: Inbound) -> list[DeviceMessage] | Exception:
        """The records of a message, or why it cannot be used."""
        device, leaf, payload = item.device, item.leaf, item.payload
        try:
            if item.error is not None:
                return item.error
            if leaf == "reported":
                return [report_from_payload(device, payload)]
            if leaf == "events":
                return [DeviceEvent(device, DEVICE_EVENT_PREFIX + event.kind,
                                    {**event.detail, "device_at": event.at}, event.seq,
                                    online=event.kind != OFFLINE_EVENT)
                        for event in messages.decode_events(payload)]
            if leaf == "telemetry":
                return [DeviceSample(device, messages.decode_telemetry(payload))]
            raise ProtocolError(f"unexpected topic leaf {leaf!r}; this server answers "
                                "outbox/chunks only")
        except (ProtocolError, RegistryError) as exc:
            return exc

    def _store(self, decoded: list[tuple[Inbound, list[DeviceMessage] | Exception]]) -> None:
        """Store the decoded messages with one registry call, record the unusable ones as
        protocol errors, count the experiment deltas of the samples and hand the new
        samples to monitoring. Inside a batch, all of it is one transaction."""
        records: list[DeviceMessage] = []
        owners: list[Inbound] = []
        errors: dict[int, Exception] = {}
        for item, found in decoded:
            if isinstance(found, Exception):
                errors[id(item)] = found
            else:
                records += found
                owners += [item] * len(found)
        stored = self._registry.store_messages(records)
        for index, error in sorted(stored.refused.items()):
            errors.setdefault(id(owners[index]), error)  # one per message
        for item, _ in decoded:
            if id(item) in errors:
                self._protocol_error(item, errors[id(item)])
        if self._experiments is not None:
            for index, record in enumerate(records):
                # Every delivery, not only a new sample: each delta counts once anyway.
                if isinstance(record, DeviceSample) and index not in stored.refused:
                    for refused in self._experiments.take(record.device, record.sample):
                        self._protocol_error(owners[index], refused)
        if stored.new_samples and self._on_samples is not None:
            self._on_samples(stored.new_samples)

    def _protocol_error(self, item: Inbound, exc: Exception) -> None:
        device, leaf, payload = item.device, item.leaf, item.payload
        now = time.monotonic()
        start, count = self._error_budget.get(device, (now, 0))
        if now - start >= 60:
            if count > PROTOCOL_ERRORS_PER_MINUTE:
                log.warning("%d more unusable messages from %s in the minute before were "
                            "neither logged nor recorded", count - PROTOCOL_ERRORS_PER_MINUTE,
                            device)
            start, count = now, 0
        self._error_budget[device] = (start, count + 1)
        if count >= PROTOCOL_ERRORS_PER_MINUTE:
            # A device in a loop of bad messages must fill neither the event log nor the
            # server's log: the rest of the minute is counted, and said once.
            log.debug("unusable %s message from %s: %s", leaf, device, exc)
            return
        log.warning("unusable %s message from %s: %s%s", leaf, device, exc,
                    "; further ones this minute are counted, not logged"
                    if count + 1 == PROTOCOL_ERRORS_PER_MINUTE else "")
        detail = {"topic": leaf, "error": str(exc), "size": len(payload),
                  "head": payload[:64].decode("utf-8", errors="replace")}
        self._registry.add_event(PROTOCOL_ERROR, device=device, detail=detail)

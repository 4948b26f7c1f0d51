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

A malformed message is logged and recorded as a ``protocol_error`` event (at most
:data:`PROTOCOL_ERRORS_PER_MINUTE` per device and minute; beyond that they are counted and
the count logged once); nothing a device sends stops the service.
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
from .registry import DeviceEvent, DeviceMessage, DeviceSample, Registry
from .registry.device_messages import report_from_payload

__all__ = ["BATCH", "DEVICE_EVENT_PREFIX", "OFFLINE_EVENT", "PROTOCOL_ERROR", "QUEUE",
           "WORKERS", "Inbound", "Ingest"]

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


class Ingest:
    """The ingest thread and its bounded queue; ``ack`` acknowledges a stored message;
    ``on_samples`` (monitoring) is called with the new telemetry samples of each batch,
    each (device, sample), in the batch's transaction; ``experiments`` counts the
    experiment deltas of every telemetry message in the same transaction, and pushes the
    merged posteriors once the batch is committed."""

    def __init__(self, registry: Registry, ack: Callable[[Inbound], None],
                 on_samples: Callable[[list[tuple[str, messages.Telemetry]]], None]
                 | None = None, experiments: ExperimentRunner | None = None, *,
                 workers: int | None = None) -> None:
        self._registry = registry
        self._ack = ack
        self._on_samples = on_samples
        self._experiments = experiments
        #: Seconds from receipt to commit of the oldest message of the last batch stored.
        self.lag_s = 0.0
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

    def start(self) -> None:
        """Start the ingest threads."""
        self._threads = [threading.Thread(target=self._loop, args=(inbox,), daemon=True,
                                          name=f"fleet-ingest-{n}")
                         for n, inbox in enumerate(self._inboxes)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Store and acknowledge what was received so far, then stop. Idempotent."""
        threads, self._threads = self._threads, []
        for inbox in self._inboxes if threads else ():
            inbox.put(None)
        for thread in threads:
            thread.join()

    def put(self, inbound: Inbound) -> None:
        """Queue ``inbound`` for storage; waits while its queue is full (back-pressure).
        A device's messages always go to the same thread, in the order they came."""
        inboxes = self._inboxes
        index = zlib.crc32(inbound.device.encode()) % len(inboxes) if len(inboxes) > 1 else 0
        inboxes[index].put(inbound)

    def _loop(self, inbox: queue.Queue[Inbound | None]) -> None:
        """Store what devices send, in batches, until None arrives."""
        while True:
            item = inbox.get()
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
            if item is None:
                return

    def _store_batch(self, batch: list[Inbound]) -> None:
        """Store ``batch`` in one transaction, then acknowledge it. Should the transaction
        fail (the database, not a message, is at fault), each message is handled alone."""
        # Decoded before the transaction opens: it holds the devices' row locks meanwhile.
        decoded = [(item, self._decode(item)) for item in batch]
        try:
            with self._registry.batch():
                self._store(decoded)
        except Exception:
            log.warning("could not store %d device message(s) in one transaction; storing "
                        "them one by one", len(batch), exc_info=True)
            for one in decoded:
                try:
                    self._store([one])
                except Exception:
                    # The database is down, or a bug: log it and keep serving the others.
                    log.exception("failed to handle %s from %s", one[0].leaf, one[0].device)
        self.lag_s = time.monotonic() - min(item.received for item in batch)
        for item in batch:
            if item.clearing is None or wait_published(item.clearing):
                self._ack(item)
            # else: unacknowledged, the broker delivers it again and it is cleared then
        if self._experiments is not None:
            self._experiments.flush()

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

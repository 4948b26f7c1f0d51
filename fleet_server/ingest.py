"""Storing what devices send: reports, events and telemetry, in batches, acknowledged once
committed.

The MQTT network thread hands every device message to :meth:`Ingest.put`; an ingest thread
writes up to :data:`BATCH` messages per transaction (one commit, on SQLite one fsync,
instead of one per message) and only then acknowledges them to the broker, so a message is
never lost between receipt and storage (the broker delivers an unacknowledged one again).
On PostgreSQL :data:`WORKERS` ingest threads write at once, each with its own transaction
and the devices whose id hashes to it, so one device's messages keep their order: storing
a message is a few round trips to the database, and one thread spent 95% of its time
waiting for them (profiled at 10,000 devices, docs/scale.md). SQLite takes one writer at a
time: one thread. The queues are bounded (:data:`QUEUE` in all): when the database falls
behind, the network thread waits for room, and the broker holds (and bounds, with its
per-client limits) what would otherwise pile up in this process's memory.

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
from typing import Any

from paho.mqtt.client import MQTTMessageInfo

from protocol import messages
from protocol.errors import ProtocolError
from transport.mqtt import wait_published

from .errors import RegistryError
from .experiment_runner import ExperimentRunner
from .registry import Registry

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
        # By device (stable: each device's messages keep their order), so rows are locked
        # in id order as everywhere else in the registry.
        batch = sorted(batch, key=lambda item: item.device)
        try:
            with self._registry.batch():
                new: list[tuple[str, messages.Telemetry]] = []
                for item in batch:
                    self._store(item, new, in_batch=True)
                if new and self._on_samples is not None:
                    self._on_samples(new)
        except Exception:
            log.warning("could not store %d device message(s) in one transaction; storing "
                        "them one by one", len(batch), exc_info=True)
            for item in batch:
                new = []
                self._store(item, new, in_batch=False)
                self._fold(new)
        self.lag_s = time.monotonic() - min(item.received for item in batch)
        for item in batch:
            if item.clearing is None or wait_published(item.clearing):
                self._ack(item)
            # else: unacknowledged, the broker delivers it again and it is cleared then
        if self._experiments is not None:
            self._experiments.flush()

    def _fold(self, new: list[tuple[str, messages.Telemetry]]) -> None:
        """Hand a sample stored alone to monitoring; its failure only costs the series."""
        if new and self._on_samples is not None:
            try:
                self._on_samples(new)
            except Exception:
                log.exception("could not add a sample of %s to the time series", new[0][0])

    def _store(self, item: Inbound, new: list[tuple[str, messages.Telemetry]], *,
               in_batch: bool) -> None:
        """Store one message; a new telemetry sample is added to ``new``. A bad message is
        recorded as a protocol error; any other failure is raised in a batch (which is then
        undone), else logged."""
        device, leaf, payload = item.device, item.leaf, item.payload
        try:
            if item.error is not None:
                raise item.error
            if leaf == "reported":
                self._registry.set_reported(device, payload)  # parsed there, once
            elif leaf == "events":
                self._store_event(device, payload)
            elif leaf == "telemetry":
                sample = messages.decode_telemetry(payload)
                # Only a new sample (not a re-delivery) is counted in the time series.
                if self._registry.add_telemetry(device, [sample]):
                    new.append((device, sample))
                # Every delivery, not only a new sample: each delta counts once anyway.
                for refused in (self._experiments.take(device, sample)
                                if self._experiments is not None else []):
                    self._protocol_error(device, leaf, payload, refused, in_batch=in_batch)
            else:
                raise ProtocolError(f"unexpected topic leaf {leaf!r}; this server answers "
                                    "outbox/chunks only")
        except (ProtocolError, RegistryError) as exc:
            self._protocol_error(device, leaf, payload, exc, in_batch=in_batch)
        except Exception:
            if in_batch:
                raise
            # The database is down, or a bug: log it and keep serving the other devices.
            log.exception("failed to handle %s from %s", leaf, device)

    def _store_event(self, device: str, payload: bytes) -> None:
        event = messages.decode_event(payload)
        detail: dict[str, Any] = {**event.detail, "device_at": event.at}
        self._registry.add_event(DEVICE_EVENT_PREFIX + event.kind, device=device,
                                 detail=detail, seq=event.seq)
        self._registry.set_online(device, event.kind != OFFLINE_EVENT)

    def _protocol_error(self, device: str, leaf: str, payload: bytes,
                        exc: Exception, *, in_batch: bool = False) -> None:
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
        try:
            self._registry.add_event(PROTOCOL_ERROR, device=device, detail=detail)
        except Exception:
            if in_batch:
                raise  # the batch is undone and its messages handled one by one
            log.exception("could not record a protocol error of %s", device)

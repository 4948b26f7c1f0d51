"""What devices send (reports, events, telemetry samples), stored a batch at a time.

The ingest (``fleet_server/ingest.py``) decodes each device message into a record
(:class:`DeviceReport`, :class:`DeviceEvent`, :class:`DeviceSample`) and hands the registry
up to a few hundred of them at once, in the order they came. :func:`store_messages` stores
them with a fixed number of statements, whatever the batch's size (storing one message at
a time took six or seven round trips per report, and the ingest threads spent 95% of their
time waiting for them: docs/scale.md):

1. one read of the batch's devices, locked, in id order (as every writer of the registry
   locks them): which are enrolled, which online, and the device-clock time of the report
   each has stored;
2. the decisions, pure (:func:`plan_batch`): which messages are refused, which report of
   each device is kept (:func:`is_overtaken`), which devices come online or go offline;
3. the writes, each one statement over the rows of the whole batch (``Tx.with_rows``: on
   PostgreSQL one array per column): the numbered events' (device, seq) claimed,
   returning the new ones; the events; the samples, returning the new ones; the reported
   models of the devices whose models changed (one read, one delete, one upsert); and
   one UPDATE of all the devices.

A refused message (an unknown device, an event kind or a value the registry does not
take) changes nothing and is returned with its reason; the others are stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet_server.errors import RegistryError
from protocol.errors import ProtocolError
from protocol.messages import Reported, Telemetry, decode_reported

from .database import Tx
from .values import check_label, dumps

__all__ = ["REORDER_WINDOW_S", "BatchPlan", "DeviceEvent", "DeviceMessage", "DeviceReport",
           "DeviceSample", "DeviceState", "StoredBatch", "is_overtaken", "model_changes",
           "plan_batch", "report_from_payload", "store_messages"]

#: Device-clock seconds: a report sent less than this before the stored one (by the
#: device's own clock) is taken for a message overtaken on the way and not stored; one sent
#: further back is believed (the device's clock was set back).
REORDER_WINDOW_S = 60.0

# Each over a relation of rows (Tx.with_rows): one statement for the whole batch.
_LOCK = ("SELECT id, online, reported_device_at FROM devices "
         "WHERE id IN (SELECT column1 FROM {rows}) ORDER BY id")
_SEQ_CLAIM = ("INSERT INTO device_event_seqs (device_id, seq) SELECT column1, column2 "
              "FROM {rows} WHERE true ON CONFLICT (device_id, seq) DO NOTHING "
              "RETURNING device_id, seq")
_EVENT_INSERT = ("INSERT INTO events (at, device_id, kind, detail) "
                 "SELECT column1, column2, column3, column4 FROM {rows}")
_SAMPLE_INSERT = ("INSERT INTO telemetry (device_id, seq, at, payload) "
                  "SELECT column1, column2, column3, column4 FROM {rows} WHERE true "
                  "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq")
_MODELS = ("SELECT device_id, model, version, bundle_sha256, state FROM reported_models "
           "WHERE device_id IN (SELECT column1 FROM {rows})")
_MODEL_DELETE = ("DELETE FROM reported_models "
                 "WHERE (device_id, model) IN (SELECT column1, column2 FROM {rows})")
_MODEL_UPSERT = ("INSERT INTO reported_models (device_id, model, version, bundle_sha256, "
                 "state) SELECT column1, column2, column3, column4, column5 FROM {rows} "
                 "WHERE true ON CONFLICT (device_id, model) DO UPDATE SET "
                 "version = excluded.version, bundle_sha256 = excluded.bundle_sha256, "
                 "state = excluded.state")
_DEVICE_UPDATE = ("UPDATE devices SET online = v.column2, "
                  "last_seen = COALESCE(v.column3, devices.last_seen), "
                  "reported = COALESCE(v.column4, devices.reported), "
                  "reported_at = COALESCE(v.column5, devices.reported_at), "
                  "reported_device_at = COALESCE(v.column6, devices.reported_device_at) "
                  "FROM {rows} WHERE devices.id = v.column1")
_TEXT, _BIGINT, _FLOAT, _BOOL = "TEXT", "BIGINT", "DOUBLE PRECISION", "BOOLEAN"


@dataclass(frozen=True)
class DeviceReport:
    """A device's ``reported`` message: parsed, and the JSON as sent (kept for display)."""

    device: str
    report: Reported
    document: str


@dataclass(frozen=True)
class DeviceEvent:
    """An event a device sent, under the kind it is stored as. ``online`` is what it says
    of the device: every event but the offline one (the MQTT will) marks it online."""

    device: str
    kind: str
    detail: Mapping[str, Any]
    seq: int | None
    online: bool = True


@dataclass(frozen=True)
class DeviceSample:
    """A telemetry sample a device sent."""

    device: str
    sample: Telemetry


DeviceMessage = DeviceReport | DeviceEvent | DeviceSample


@dataclass(frozen=True)
class DeviceState:
    """What the registry has of a device before the batch: its online flag and the time
    (device clock) of its stored report, None if none."""

    online: bool
    report_at: float | None


@dataclass(frozen=True)
class StoredBatch:
    """What :func:`store_messages` did: the samples it stored (not seen before), each
    (device, sample), and the messages it refused, by their index in the batch."""

    new_samples: list[tuple[str, Telemetry]]
    refused: dict[int, RegistryError]


@dataclass
class _DeviceChange:
    """One device's row after the batch."""

    online: bool
    seen: bool = False
    report: DeviceReport | None = None


@dataclass
class BatchPlan:
    """The writes a batch makes, decided from the batch and the devices' states alone.

    ``events`` are the rows of the event log in the order to insert them, each (device,
    kind, detail as JSON, seq); a numbered one is inserted only if its (device, seq) is new.
    ``samples`` are (device, seq, at, metrics as JSON, the sample), each (device, seq) once.
    """

    refused: dict[int, RegistryError] = field(default_factory=dict)
    devices: dict[str, _DeviceChange] = field(default_factory=dict)
    events: list[tuple[str, str, str, int | None]] = field(default_factory=list)
    samples: list[tuple[str, int, float, str, Telemetry]] = field(default_factory=list)

    @property
    def reports(self) -> dict[str, DeviceReport]:
        """The report to store of each device that has one."""
        return {device: change.report for device, change in self.devices.items()
                if change.report is not None}


def report_from_payload(device: str, payload: bytes) -> DeviceReport:
    """The record of a ``reported`` message; RegistryError if it is not a valid report."""
    try:
        report = decode_reported(payload)
        # Kept as sent, for display: a JSON object (decode_reported checked it) in UTF-8.
        document = payload.decode()
    except (ProtocolError, UnicodeDecodeError) as exc:
        raise RegistryError(f"the report of device {device!r} is refused: {exc}") from exc
    return DeviceReport(device, report, document)


def is_overtaken(stored_at: float | None, at: float) -> bool:
    """Whether a report sent at ``at`` (device clock) was overtaken on the way by the
    stored one, sent at ``stored_at``: the stored one is newer by less than
    :data:`REORDER_WINDOW_S`. Several server processes (shared subscriptions,
    docs/scale.md) take one device's messages in turn, and one with a backlog stores them
    late, so reports arrive out of order; a server's delay does not matter here, only the
    device's clock. A report older by the window or more is believed: the device's clock
    was set back."""
    return stored_at is not None and 0.0 < stored_at - at < REORDER_WINDOW_S


def plan_batch(messages: Sequence[DeviceMessage],
               states: Mapping[str, DeviceState]) -> BatchPlan:
    """Decide what storing ``messages`` (in the order they came) writes, given the state
    of each enrolled device among them (``states``; a device not there is unknown)."""
    plan = BatchPlan()
    # (device, seq) already in the batch, of events and of samples: a message delivered
    # twice within one batch is stored once, as one delivered again later is.
    claimed: set[tuple[str, int]] = set()
    sampled: set[tuple[str, int]] = set()
    report_at = {device: state.report_at for device, state in states.items()}
    for index, message in enumerate(messages):
        device = message.device
        state = states.get(device)
        try:
            if state is None:
                raise RegistryError(f"unknown device {device!r}; it must enroll first")
            row = _row_of(message)
        except RegistryError as exc:
            plan.refused[index] = exc
            continue
        change = plan.devices.setdefault(device, _DeviceChange(state.online))
        online = not isinstance(message, DeviceEvent) or message.online
        if isinstance(message, DeviceEvent):
            seq = message.seq
            if seq is None or (device, seq) not in claimed:
                plan.events.append((device, message.kind, row, seq))
            if seq is not None:
                claimed.add((device, seq))
        if online != change.online:
            # After the device's own event, before its report or sample: as it happened.
            plan.events.append((device, "device.online" if online else "device.offline",
                                "{}", None))
            change.online = online
        change.seen |= online
        if isinstance(message, DeviceReport):
            if not is_overtaken(report_at[device], message.report.at):
                change.report = message
                report_at[device] = message.report.at
        elif isinstance(message, DeviceSample):
            sample = message.sample
            if (device, sample.seq) not in sampled:
                plan.samples.append((device, sample.seq, sample.at, row, sample))
            sampled.add((device, sample.seq))
    return plan


def _row_of(message: DeviceMessage) -> str:
    """What is stored of the message as JSON (an event's detail, a sample's metrics);
    RegistryError if the registry does not take it."""
    if isinstance(message, DeviceEvent):
        check_label("event kind", message.kind)
        return dumps(message.detail, "event detail")
    if isinstance(message, DeviceSample):
        return dumps(message.sample.metrics, "telemetry metrics")
    return ""


def model_changes(stored: Mapping[tuple[str, str], tuple[Any, ...]],
                  reports: Mapping[str, DeviceReport],
                  ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """The reported models to delete, each (device, model), and to write, each a row, so
    that the devices of ``reports`` have their reports' models; ``stored`` holds the rows
    of those devices now, by (device, model). An install sends several reports with the
    same models: those write nothing."""
    rows = {(device, name): (m.version, m.bundle_sha256, m.state)
            for device, r in reports.items() for name, m in r.report.models.items()}
    gone = sorted(key for key in stored if key not in rows)
    changed = [(*key, *row) for key, row in sorted(rows.items()) if stored.get(key) != row]
    return gone, changed


def store_messages(tx: Tx, now: float, messages: Sequence[DeviceMessage]) -> StoredBatch:
    """Store a batch of device messages (module docstring)."""
    states = {device: DeviceState(bool(online), None if at is None else float(at))
              for device, online, at in tx.with_rows(
                  _LOCK + tx.dialect.for_update, (_TEXT,),
                  [(d,) for d in sorted({m.device for m in messages})])}
    plan = plan_batch(messages, states)
    numbered = [(device, seq) for device, _, _, seq in plan.events if seq is not None]
    new_seqs = {(r[0], int(r[1])) for r in tx.with_rows(_SEQ_CLAIM, (_TEXT, _BIGINT),
                                                       numbered)}
    tx.with_rows(_EVENT_INSERT, (_FLOAT, _TEXT, _TEXT, _TEXT),
                 [(now, device, kind, detail) for device, kind, detail, seq in plan.events
                  if seq is None or (device, seq) in new_seqs])
    new = {(r[0], int(r[1])) for r in tx.with_rows(
        _SAMPLE_INSERT, (_TEXT, _BIGINT, _FLOAT, _TEXT), [row[:4] for row in plan.samples])}
    reports = plan.reports
    if reports:
        stored = {(device, model): (int(version), sha, state)
                  for device, model, version, sha, state in tx.with_rows(
                      _MODELS, (_TEXT,), [(d,) for d in sorted(reports)])}
        gone, changed = model_changes(stored, reports)
        tx.with_rows(_MODEL_DELETE, (_TEXT, _TEXT), gone)
        tx.with_rows(_MODEL_UPSERT, (_TEXT, _TEXT, _BIGINT, _TEXT, _TEXT), changed)
    tx.with_rows(_DEVICE_UPDATE, (_TEXT, _BOOL, _FLOAT, _TEXT, _FLOAT, _FLOAT), [
        (device, change.online, now if change.seen else None,
         None if change.report is None else change.report.document,
         None if change.report is None else now,
         None if change.report is None else change.report.report.at)
        for device, change in sorted(plan.devices.items())])
    return StoredBatch([(device, sample) for device, seq, _, _, sample in plan.samples
                        if (device, seq) in new], plan.refused)

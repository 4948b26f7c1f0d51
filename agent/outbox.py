"""The agent's outbox: telemetry samples and events kept on disk until the broker has them.

Everything a device tells the fleet that must not be lost on the way (telemetry samples,
install transitions and other events) is appended here first and published from here::

    outbox = Outbox.open_in(state_dir)                    # STATE/outbox.db
    outbox.add_sample(time.time(), metrics)               # the sampler thread
    outbox.add_event("install.verifying", time.time(), {...})   # whoever sees it happen
    for message in outbox.pending(100):                   # the publisher, when connected
        publish(message)                                  # QoS 1 ...
    outbox.ack([seq, ...])                                # ... after each PUBACK

:class:`Outbox` is a bounded, ordered, crash-safe queue in one SQLite file (WAL,
``synchronous=FULL``): what an ``add_*`` returned is on disk, survives ``kill -9`` and power
loss, and is handed out oldest first until acknowledged. Samples and events share one
``seq`` (unique per device, increasing, never reused: see :meth:`Outbox.add_sample`), so
the server dedupes re-sends of either and the stream replays in the order it happened.

Bounded in rows and bytes: when full it evicts the oldest samples first (events are fewer
and say more), then the oldest events, and says so: the next sample carries
``"dropped": N`` (samples) and ``"dropped_events": M``. A sample or event that could not be
stored at all (disk full) is counted in a :class:`~agent.loss_counter.LossCounter` that
needs no free space, and announced the same way. docs/telemetry.md has the details.

Why one module of about 750 lines: its invariants (seq never reused, bounds, every drop
counted exactly once, corruption replaced without losing the counts) each span the public
operations and the SQL beneath them, and one state-machine test checks them together. The
parts that stand alone are already apart: the loss counter (:mod:`agent.loss_counter`),
the SQLite set-up and corruption handling (:mod:`agent.sqlite_file`), and publishing
(:mod:`agent.publisher`).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from common.atomic import fsync_dir, write_atomic
from protocol.messages import (
    DEVICE_EVENT_KIND,
    MAX_EVENT_BYTES,
    MAX_TELEMETRY_BYTES,
    Event,
    Telemetry,
)

from .errors import AgentError
from .loss_counter import LossCounter, Tally
from .sqlite_file import connect, is_corruption, set_aside, transaction

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_ROWS",
    "RESERVED_KEYS",
    "Message",
    "Outbox",
    "OutboxError",
    "Tally",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: A message waiting in the outbox: published on ``telemetry`` or on ``events``.
Message = Telemetry | Event

DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Below any broker's message size limit: a message the broker refuses by closing the
#: connection would be sent again on every reconnect.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
# What the protocol adds to a stored body on the wire (protocol, seq, at; a sample's
# announcements): bodies stay this far below the server's limit per message kind.
_ENVELOPE = 256
#: Metric keys the outbox itself sets on samples; a caller's metrics may not use them.
RESERVED_KEYS = frozenset({"dropped", "dropped_events", "buffer_reset"})
_SAMPLE, _EVENT = "telemetry", "events"  # the topic leaf each kind is published on
_WIRE_LIMITS = {_SAMPLE: MAX_TELEMETRY_BYTES - _ENVELOPE, _EVENT: MAX_EVENT_BYTES - _ENVELOPE}
_KEEP_CORRUPT = 3  # set-aside corrupt files kept, newest first
_WARN_EVERY_S = 60.0
# How far ahead of the seq in use the reservation file is moved: about one write an hour.
_SEQ_RESERVE_US = 3600 * 1_000_000
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    at REAL NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    dropped_events INTEGER NOT NULL DEFAULT 0,
    reset INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_topic ON messages (topic, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Before events shared it, the file held samples only: STATE/telemetry.db, the telemetry
# buffer of agents without an outbox.
_LEGACY_FILE_NAME = "telemetry.db"
_MIGRATE_LEGACY = (
    "INSERT OR IGNORE INTO messages (seq, topic, at, body, size, dropped, reset) "
    "SELECT seq, 'telemetry', at, metrics, length(CAST(metrics AS BLOB)), dropped, reset "
    "FROM samples",
    "DROP TABLE samples",
)


class OutboxError(AgentError):
    """The outbox could not do what was asked (disk full, file not writable...).

    A corrupt outbox file is not an error: it is set aside and replaced (logged)."""


@dataclass
class _State:
    """The outbox's counters; mirrored in the ``meta`` table, changed only after commit."""

    last_seq: int | None = None
    rows: Tally = field(default_factory=Tally)  # messages waiting, per kind
    size: int = 0  # bytes of their bodies
    dropped: Tally = field(default_factory=Tally)  # over the file's life
    unreported: Tally = field(default_factory=Tally)  # dropped, not yet carried by a sample
    reset: bool = False  # the file was corrupt at open: an unknown number of messages lost
    folded: Tally = field(default_factory=Tally)  # the loss counter's totals already counted


@dataclass(frozen=True)
class _Row:
    """One message to insert."""

    topic: str
    at: float
    body: dict[str, Any]
    text: str


class Outbox:
    """A durable, bounded, ordered outbox of samples and events in one SQLite file.

    Thread-safe: one connection behind a lock, so the sampler, the install worker and the
    MQTT thread may add while the publisher reads and acknowledges. One outbox object per
    file: the counts are kept in memory (other processes may read the file, not write it).

    At most ``max_rows`` messages and ``max_bytes`` bytes of bodies are kept; a message
    over ``max_message_bytes``, or that the server would not take (an event over about
    16 KiB, :data:`protocol.messages.MAX_EVENT_BYTES`, or of a kind a device may not
    send), is refused. A file SQLite finds
    corrupt (at open or later) is renamed ``<name>.<unix time>.corrupt`` (with its
    ``-wal``), an error is logged and a fresh file is used; nothing raises. Other
    database failures (a full disk, an unwritable directory) raise :class:`OutboxError`.
    """

    FILE_NAME = "outbox.db"

    def __init__(self, path: Path, *, max_rows: int = DEFAULT_MAX_ROWS,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        if not 0 < max_message_bytes <= max_bytes:
            raise ValueError(f"max_message_bytes ({max_message_bytes}) must be positive and "
                             f"at most max_bytes ({max_bytes})")
        self.path = Path(path)
        #: The seq reservation: every seq ever issued is below the number it holds.
        self.seq_path = self.path.with_suffix(".seq")
        #: Messages that could not be stored, counted where a full disk cannot stop it.
        self.lost_path = self.path.with_suffix(".lost")
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_message_bytes = max_message_bytes
        self._lock = threading.Lock()
        self._last_warning = -math.inf
        self._unwritten = Tally()  # lost messages the loss counter could not record
        self._state = _State()
        self._losses = self._open_loss_counter()
        try:
            self._db = self._open()
        except BaseException:
            if self._losses is not None:
                self._losses.close()
            raise
        try:
            if self._over_bounds():
                self._with_recovery(self._trim)
        except BaseException:
            self.close()
            raise
        self._reserved = self._read_reservation()
        # A file without a last seq (new, deleted, set aside): start above the reservation.
        self._floor = -1 if self._reserved is None else self._reserved

    @classmethod
    def open_in(cls, state_dir: Path, **bounds: int) -> Outbox:
        """The outbox of the agent whose state directory is ``state_dir``; the telemetry
        buffer of an agent from before the outbox (``telemetry.db``) becomes it, unsent samples and
        their seq included."""
        path = Path(state_dir) / cls.FILE_NAME
        _adopt_legacy(path.with_name(_LEGACY_FILE_NAME), path)
        return cls(path, **bounds)

    # -- adding ---------------------------------------------------------------------------

    def add_sample(self, at: float, metrics: Mapping[str, Any]) -> Telemetry:
        """Store one telemetry sample taken at Unix time ``at``; returns it with its seq.

        ``seq = max(floor(at * 1e6), last_seq + 1)``: microseconds since the epoch, bumped
        past the previous seq when messages share a microsecond or the clock stepped back.
        ``last_seq`` is stored in the same transaction. In case the file is lost (deleted,
        or set aside as corrupt), :attr:`seq_path` holds a reservation R above every seq
        issued (moved an hour ahead, durably, before a seq reaches it), and a file with no
        ``last_seq`` starts at ``max(floor(at * 1e6), R)``. Only if both files are lost
        does the clock alone decide (docs/telemetry.md).

        The returned sample's metrics carry ``"dropped": N`` and ``"dropped_events": M``
        when samples or events were dropped (evicted, or failed to be stored) since a
        sample last carried those counts, and ``"buffer_reset": "corrupt"`` when the file
        was found corrupt and replaced.

        On return the sample is committed with a full fsync. Raises ValueError for a
        negative or non-finite ``at``, metrics that are not JSON (NaN included), use a
        reserved key or exceed ``max_message_bytes``, and OutboxError when the database
        fails; a sample that raised OutboxError is counted as dropped.
        """
        clash = RESERVED_KEYS & set(metrics)
        if clash:
            raise ValueError(f"metric keys {sorted(clash)} are reserved for the outbox")
        [sample] = self._add([self._row(_SAMPLE, at, dict(metrics))], None)
        return cast("Telemetry", sample)

    def add_event(self, kind: str, at: float, detail: Mapping[str, Any]) -> Event:
        """Store one event that happened at Unix time ``at``; returns it with its seq (the
        same sequence as samples). Raises as :meth:`add_sample` does."""
        [event] = self.add_events([(kind, at, detail)])
        return event

    def add_events(self, events: Sequence[tuple[str, float, Mapping[str, Any]]], *,
                   mark: tuple[str, int] | None = None) -> list[Event]:
        """Store ``(kind, at, detail)`` events in one transaction, in order, and with them,
        if given, the mark ``(key, value)`` (see :meth:`mark`): the events and the mark are
        committed together or not at all. Raises as :meth:`add_sample` does, except that
        events that raised OutboxError with a mark are not counted as dropped: the mark
        says they were not announced, so the caller announces them again from its own
        record."""
        for kind, _, _ in events:
            if not DEVICE_EVENT_KIND.fullmatch(kind):
                raise ValueError(f"event kind {kind!r} is not one the fleet server takes "
                                 "from a device (protocol.messages.DEVICE_EVENT_KIND)")
        rows = [self._row(_EVENT, at, {"kind": kind, "detail": dict(detail)})
                for kind, at, detail in events]
        if not rows:
            return []  # nothing to store, the mark included
        return cast("list[Event]", self._add(rows, mark))

    def mark(self, key: str) -> int:
        """The value last stored for ``key`` with :meth:`add_events` (0 if none): how far
        a caller got announcing something, for example one install's transitions."""
        with self._lock:
            row = self._with_recovery(lambda: self._db.execute(
                "SELECT value FROM marks WHERE key = ?", (key,)).fetchone())
        return 0 if row is None else int(row[0])

    def forget_marks(self, prefix: str, *, keep: Collection[str]) -> int:
        """Delete the marks whose key starts with ``prefix`` and is not in ``keep`` (what
        they tracked is gone); returns how many."""
        with self._lock:
            return self._with_recovery(lambda: self._forget_marks(prefix, set(keep)))

    def count_lost(self, lost: Tally) -> None:
        """Count messages that were never stored (a sample not taken, an event that could
        not be added); the next sample announces them. Durable even on a full disk where
        the file system allows (:mod:`agent.loss_counter`); never raises."""
        if not lost:
            return
        with self._lock:
            self._count_lost(lost)

    # -- sending --------------------------------------------------------------------------

    def pending(self, limit: int = 100, *, after: int | None = None) -> list[Message]:
        """Up to ``limit`` unacknowledged messages, oldest first (``seq > after`` if given,
        to fetch past messages already in flight)."""
        if limit < 1:
            return []
        with self._lock:
            return self._with_recovery(lambda: self._pending(limit, after))

    def ack(self, seqs: Collection[int]) -> int:
        """Forget the messages with these seqs: the broker has them. Returns how many were
        deleted (a seq already gone is ignored)."""
        if not seqs:
            return 0
        with self._lock:
            return self._with_recovery(lambda: self._remove(sorted(seqs), counted=False))

    def drop(self, seqs: Collection[int]) -> int:
        """Delete these messages unsent and count them as dropped (the broker refused
        them: sending again would not help). Returns how many were deleted."""
        if not seqs:
            return 0
        with self._lock:
            return self._with_recovery(lambda: self._remove(sorted(seqs), counted=True))

    # -- state ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Messages waiting to be sent."""
        with self._lock:
            return self._state.rows.samples + self._state.rows.events

    def waiting(self) -> Tally:
        """Messages waiting to be sent, per kind."""
        with self._lock:
            return self._state.rows

    def size(self) -> int:
        """Bytes of the waiting messages' bodies (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._state.size

    def dropped(self) -> Tally:
        """Samples and events dropped over this file's life: evicted to stay within the
        bounds, refused, or never stored (counted but not yet folded in included)."""
        with self._lock:
            return self._state.dropped + self._new_losses()

    def last_seq(self) -> int | None:
        """The seq of the newest message ever added to this file (None: none yet)."""
        with self._lock:
            return self._state.last_seq

    def close(self) -> None:
        """Close the database; the outbox must not be used afterwards."""
        with self._lock:
            self._db.close()
            if self._losses is not None:
                self._losses.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the work, under self._lock ------------------------------------------------------

    def _row(self, topic: str, at: float, body: dict[str, Any]) -> _Row:
        if not (math.isfinite(at) and at >= 0):
            raise ValueError(f"at must be a finite, non-negative Unix time, not {at!r}")
        text = _to_json(body)  # refuse what cannot be stored before anything changes
        limit = min(self.max_message_bytes, _WIRE_LIMITS[topic])
        if len(text.encode()) > limit:
            raise ValueError(f"a {topic} message of {len(text.encode())} bytes is over the "
                             f"outbox's limit of {limit}")
        return _Row(topic, at, body, text)

    def _add(self, rows: list[_Row], mark: tuple[str, int] | None) -> list[Message]:
        with self._lock:
            try:
                return self._with_recovery(lambda: self._insert(rows, mark))
            except OutboxError:
                if mark is None:  # with a mark, the caller announces them again
                    self._count_lost(_tally(row.topic for row in rows))
                raise

    def _insert(self, rows: list[_Row], mark: tuple[str, int] | None) -> list[Message]:
        seqs = self._next_seqs([row.at for row in rows])
        state = replace(self._state, last_seq=seqs[-1])
        new_losses = self._new_losses()
        state.dropped += new_losses
        state.unreported += new_losses
        if self._losses is not None:
            state.folded = self._losses.value
        evicted = Tally()
        added: list[Message] = []
        with transaction(self._db) as db:
            for seq, row in zip(seqs, rows, strict=True):
                while True:
                    text = row.text
                    if row.topic == _SAMPLE and (state.unreported or state.reset):
                        text = _to_json({**row.body, **_announcement(state)})
                    size = len(text.encode())
                    over_rows = state.rows.samples + state.rows.events + 1 - self.max_rows
                    over_bytes = state.size + size - self.max_bytes
                    if (over_rows <= 0 and over_bytes <= 0) or not (
                            state.rows.samples or state.rows.events):
                        break
                    # Evicting grows the counts a sample announces, and so its size: again.
                    gone = _evict(db, state, over_rows, over_bytes)
                    evicted += gone
                    state.dropped += gone
                added.append(_insert_row(db, seq, row, text, state))
            _put_meta(db, last_seq=state.last_seq, **_meta(state))
            if mark is not None:
                db.execute("INSERT INTO marks (key, value) VALUES (?, ?) ON CONFLICT (key) "
                           "DO UPDATE SET value = excluded.value", mark)
        self._state = state
        self._unwritten = Tally()
        if evicted:
            self._warn_dropped(evicted)
        return added

    def _next_seqs(self, ats: list[float]) -> list[int]:
        """The seqs of messages taken at ``ats``, reserved durably before they are used."""
        seqs: list[int] = []
        last = self._floor if self._state.last_seq is None else self._state.last_seq + 1
        for at in ats:
            seqs.append(max(math.floor(at * 1_000_000), last))
            last = seqs[-1] + 1
        if self._reserved is None or seqs[-1] >= self._reserved:
            self._reserve(seqs[-1] + _SEQ_RESERVE_US)
        return seqs

    def _over_bounds(self) -> bool:
        state = self._state
        return (state.rows.samples + state.rows.events > self.max_rows
                or state.size > self.max_bytes)

    def _trim(self) -> None:
        """Drop down to bounds smaller than what the file holds (reopened with less)."""
        state = replace(self._state)
        with transaction(self._db) as db:
            gone = _evict(db, state, state.rows.samples + state.rows.events - self.max_rows,
                          state.size - self.max_bytes)
            state.dropped += gone
            _put_meta(db, **_meta(state))
        self._state = state
        self._warn_dropped(gone)

    def _pending(self, limit: int, after: int | None) -> list[Message]:
        rows = self._db.execute("SELECT seq, topic, at, body FROM messages WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (-1 if after is None else after,
                                                         limit)).fetchall()
        messages: list[Message] = []
        for seq, topic, at, text in rows:
            message = _decode(seq, topic, at, text)
            if message is None:
                log.error("outbox message %d in %s is unreadable; dropping it", seq,
                          self.path)
                self._remove([seq], counted=True)
            else:
                messages.append(message)
        return messages

    def _remove(self, seqs: list[int], *, counted: bool) -> int:
        """Delete these rows: delivered, or (``counted``) dropped, passing on the counts
        they carried so none is lost."""
        state = replace(self._state)
        with transaction(self._db) as db:
            found = _select(db, seqs)
            db.executemany("DELETE FROM messages WHERE seq = ?", [(r[0],) for r in found])
            gone = _forget(state, found, counted=counted)
            if counted and found:
                state.dropped += gone
                _put_meta(db, **_meta(state))
        self._state = state
        return len(found)

    def _forget_marks(self, prefix: str, keep: set[str]) -> int:
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with transaction(self._db) as db:
            keys = [k for (k,) in db.execute("SELECT key FROM marks WHERE key LIKE ? "
                                             "ESCAPE '\\'", (pattern,)) if k not in keep]
            db.executemany("DELETE FROM marks WHERE key = ?", [(k,) for k in keys])
        return len(keys)

    def _count_lost(self, lost: Tally) -> None:
        if self._losses is not None:
            try:
                self._losses.add(lost)
            except OSError as exc:
                log.error("cannot record %s lost message(s) in %s (%s); counting them in "
                          "memory until the next message is stored", lost, self.lost_path,
                          exc)
            else:
                return
        self._unwritten += lost

    def _new_losses(self) -> Tally:
        """Losses counted since the last commit, not yet in ``dropped``."""
        if self._losses is None:
            return self._unwritten
        new = self._losses.value - self._state.folded
        # A loss file recreated (deleted by hand) restarts below what was folded: its
        # counts are new from there, never negative.
        return Tally(max(new.samples, 0), max(new.events, 0)) + self._unwritten

    def _read_reservation(self) -> int | None:
        try:
            value = int(self.seq_path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("outbox seq reservation %s is unreadable (%s); seq follows the "
                        "outbox and the clock", self.seq_path, exc)
            return None
        return value if value >= 0 else None

    def _reserve(self, value: int) -> None:
        """Durably promise that no seq below ``value`` is issued later: before using one."""
        try:
            write_atomic(self.seq_path, f"{value}\n".encode())
        except OSError as exc:
            raise OutboxError(f"outbox seq reservation {self.seq_path} cannot be written "
                              f"({exc}); free some disk space") from exc
        self._reserved = value

    def _warn_dropped(self, count: Tally) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            total = self._state.dropped
            log.warning("outbox %s is full (%d messages, %d bytes at most): dropped the "
                        "oldest %d samples and %d events; %d samples and %d events dropped "
                        "in all. The broker has been unreachable for long, or the bounds are "
                        "too small", self.path, self.max_rows, self.max_bytes, count.samples,
                        count.events, total.samples, total.events)

    # -- opening and recovery ------------------------------------------------------------

    def _open_loss_counter(self) -> LossCounter | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"outbox {self.path}: cannot create its directory "
                              f"({exc})") from exc
        try:
            return LossCounter(self.lost_path)
        except OSError as exc:
            log.error("outbox loss counter %s cannot be opened (%s); messages that cannot "
                      "be stored are counted in memory only", self.lost_path, exc)
            return None

    def _with_recovery(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation``; a corrupt file is replaced and the operation run once more."""
        try:
            return operation()
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise OutboxError(f"outbox {self.path}: {exc}") from exc
            lost = self._state
            log.error("outbox %s became corrupt (%s); moving it aside and starting a fresh "
                      "one. %s unsent messages are lost and reported as dropped",
                      self.path, exc, lost.rows)
        try:
            self._db.close()
            self._replace_corrupt()
            self._db = self._open()
            # What this process knew survives the file: seq stays above every earlier one,
            # and the lost messages are counted, not silently gone.
            state = _State(last_seq=lost.last_seq, dropped=lost.dropped + lost.rows,
                           unreported=lost.unreported + lost.rows, reset=lost.reset,
                           folded=lost.folded)
            with transaction(self._db) as db:
                _put_meta(db, last_seq=state.last_seq, **_meta(state))
            self._state = state
            return operation()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        """Connect and load the counters; a corrupt file is set aside for a fresh one,
        which says so (``reset``)."""
        try:
            return self._connect()
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise OutboxError(f"outbox {self.path} cannot be opened: {exc}") from exc
            log.error("outbox %s is corrupt (%s); moving it aside and starting a fresh one: "
                      "unsent messages in it are lost, the next sample says so",
                      self.path, exc)
        self._replace_corrupt()
        try:
            db = self._connect()
            self._state.reset = True
            with transaction(db):
                _put_meta(db, **_meta(self._state))
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox {self.path} cannot be created: {exc}") from exc
        return db

    def _replace_corrupt(self) -> None:
        try:
            set_aside(self.path, keep=_KEEP_CORRUPT)
        except OSError as exc:
            raise OutboxError(f"outbox {self.path} is corrupt and cannot be moved aside "
                              f"({exc})") from exc

    def _connect(self) -> sqlite3.Connection:
        """Open the file (migrating an old telemetry buffer's table) and load the counters."""
        db = connect(self.path, _SCHEMA)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                          "name = 'samples'").fetchone():
                with transaction(db):
                    for statement in _MIGRATE_LEGACY:
                        db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if "lost_samples_folded" not in meta:
                # A file that never counted the loss counter in (new, replaced, or an old
                # telemetry buffer) starts from its totals now: losses before it were
                # announced by the file they happened to, or are covered by a reset.
                baseline = self._losses.value if self._losses is not None else Tally()
                meta.update(lost_samples_folded=baseline.samples,
                            lost_events_folded=baseline.events)
                with transaction(db):
                    _put_meta(db, lost_samples_folded=baseline.samples,
                              lost_events_folded=baseline.events)
            counts = dict(db.execute("SELECT topic, count(*) FROM messages "
                                     "GROUP BY topic").fetchall())
            size = db.execute("SELECT coalesce(sum(size), 0) FROM messages").fetchone()[0]
        except BaseException:
            db.close()
            raise
        self._state = _State(
            last_seq=meta.get("last_seq"),
            rows=Tally(counts.get(_SAMPLE, 0), counts.get(_EVENT, 0)), size=int(size),
            dropped=Tally(meta.get("dropped_total", 0), meta.get("dropped_events_total", 0)),
            unreported=Tally(meta.get("unreported", 0), meta.get("unreported_events", 0)),
            reset=bool(meta.get("reset", 0)),
            folded=Tally(meta["lost_samples_folded"], meta["lost_events_folded"]))
        return db


def _adopt_legacy(legacy: Path, path: Path) -> None:
    """Rename an old telemetry buffer, ``telemetry.db`` (with its WAL and seq reservation),
    to ``path``.

    The database file moves last: until it does, the next start finds the legacy file and
    finishes the job; once it has, the outbox opens it with its WAL beside it."""
    if path.exists() or not legacy.exists():
        return
    try:
        Path(f"{legacy}-shm").unlink(missing_ok=True)  # rebuilt from the WAL; never data
        for source, target in ((legacy.with_suffix(".seq"), path.with_suffix(".seq")),
                               (Path(f"{legacy}-wal"), Path(f"{path}-wal")),
                               (legacy, path)):
            if source.exists():
                source.replace(target)
        fsync_dir(path.parent)
    except OSError as exc:
        raise OutboxError(f"cannot move the telemetry buffer {legacy} to {path} ({exc})"
                          ) from exc
    log.info("telemetry buffer %s is now the outbox %s", legacy, path)


def _insert_row(db: sqlite3.Connection, seq: int, row: _Row, text: str,
                state: _State) -> Message:
    """Insert one message (its body as ``text``) and count it in ``state``; a sample takes
    the announcements with it, which clears them."""
    carried = state.unreported if row.topic == _SAMPLE else Tally()
    reset = state.reset and row.topic == _SAMPLE
    size = len(text.encode())
    db.execute("INSERT INTO messages (seq, topic, at, body, size, dropped, dropped_events, "
               "reset) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (seq, row.topic, row.at, text, size, carried.samples, carried.events,
                int(reset)))
    state.rows += _tally([row.topic])
    state.size += size
    if row.topic == _EVENT:
        return Event(kind=row.body["kind"], at=row.at, detail=row.body["detail"], seq=seq)
    state.unreported, state.reset = Tally(), False
    return Telemetry(seq=seq, at=row.at, metrics=json.loads(text))


def _evict(db: sqlite3.Connection, state: _State, over_rows: int, over_bytes: int) -> Tally:
    """Delete the oldest samples, then the oldest events, until ``over_rows`` rows and
    ``over_bytes`` bytes are gone (at least one row); ``state`` follows. Returns what went,
    per kind."""
    victims: list[tuple[Any, ...]] = []
    freed = 0
    for topic in (_SAMPLE, _EVENT):
        cursor = db.execute("SELECT seq, topic, size, dropped, dropped_events, reset "
                            "FROM messages WHERE topic = ? ORDER BY seq", (topic,))
        for row in cursor:
            if victims and len(victims) >= over_rows and freed >= over_bytes:
                break
            victims.append(row)
            freed += row[2]
        cursor.close()
    db.executemany("DELETE FROM messages WHERE seq = ?", [(v[0],) for v in victims])
    return _forget(state, victims, counted=True)


def _forget(state: _State, rows: list[tuple[Any, ...]], *, counted: bool) -> Tally:
    """Take deleted ``(seq, topic, size, dropped, dropped_events, reset)`` rows out of
    ``state``; if they were not delivered (``counted``), they become unreported drops and
    so do the counts they carried. Returns how many went, per kind."""
    gone = _tally(r[1] for r in rows)
    state.rows -= gone
    state.size -= sum(r[2] for r in rows)
    if counted:
        state.unreported += gone + Tally(sum(r[3] for r in rows), sum(r[4] for r in rows))
        state.reset = state.reset or any(r[5] for r in rows)
    return gone


def _select(db: sqlite3.Connection, seqs: list[int]) -> list[tuple[Any, ...]]:
    """``(seq, topic, size, dropped, dropped_events, reset)`` of the rows with these seqs."""
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(seqs), 500):  # SQLite's bound on parameters is 999 at least
        chunk = seqs[start:start + 500]
        found += db.execute("SELECT seq, topic, size, dropped, dropped_events, reset FROM "
                            f"messages WHERE seq IN ({', '.join('?' * len(chunk))})",
                            chunk).fetchall()
    return found


def _tally(topics: Iterable[str]) -> Tally:
    samples = events = 0
    for topic in topics:
        if topic == _SAMPLE:
            samples += 1
        else:
            events += 1
    return Tally(samples, events)


def _announcement(state: _State) -> dict[str, Any]:
    """The keys a sample carries to announce what was lost before it."""
    keys: dict[str, Any] = {}
    if state.unreported.samples:
        keys["dropped"] = state.unreported.samples
    if state.unreported.events:
        keys["dropped_events"] = state.unreported.events
    if state.reset:
        keys["buffer_reset"] = "corrupt"
    return keys


def _meta(state: _State) -> dict[str, int]:
    """The ``meta`` rows that mirror ``state`` (all but ``last_seq``)."""
    return {"dropped_total": state.dropped.samples,
            "dropped_events_total": state.dropped.events,
            "unreported": state.unreported.samples,
            "unreported_events": state.unreported.events, "reset": int(state.reset),
            "lost_samples_folded": state.folded.samples,
            "lost_events_folded": state.folded.events}


def _put_meta(db: sqlite3.Connection, **values: int | None) -> None:
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = excluded.value",
                   [(k, v) for k, v in values.items() if v is not None])


def _decode(seq: int, topic: str, at: float, text: str) -> Message | None:
    """The message a row holds, or None if the row is unreadable."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if topic == _SAMPLE:
        return Telemetry(seq=seq, at=at, metrics=body)
    kind, detail = body.get("kind"), body.get("detail")
    if topic != _EVENT or not isinstance(kind, str) or not isinstance(detail, dict):
        return None
    return Event(kind=kind, at=at, detail=detail, seq=seq)


def _to_json(obj: Mapping[str, Any]) -> str:
    try:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"outbox messages must be plain JSON ({exc})") from None

"""Telemetry: samples of the device and its models, kept in a durable outbox until sent.

Two parts, used together by the agent's sampler and its fleet link::

    buffer = TelemetryBuffer(state_dir / TelemetryBuffer.FILE_NAME)
    collector = TelemetryCollector(runtime)
    buffer.append(time.time(), collector.collect())     # the sampler thread, every N s
    for sample in buffer.pending(100):                   # the MQTT thread, when connected
        publish(encode(sample))                          # QoS 1
    buffer.ack(last_puback_seq)                          # after the broker's PUBACK

:class:`TelemetryBuffer` is a bounded, ordered, crash-safe queue of
:class:`protocol.messages.Telemetry` messages in one SQLite file (WAL, ``synchronous=FULL``):
what ``append`` returned is on disk, survives ``kill -9`` and power loss, and is handed out
oldest first until acknowledged. When full it drops the oldest samples, and says so: the
next sample carries ``"dropped": N``. ``seq`` never repeats for a device (see
:meth:`TelemetryBuffer.append` and docs/telemetry.md).

:class:`TelemetryCollector` builds one sample's metrics from a :class:`~agent.runtime.Runtime`
and psutil. The arithmetic (counter deltas across model swaps, histograms, formatting) is in
pure functions (:func:`counter_delta`, :func:`new_latencies`, :func:`latency_histogram`,
:func:`model_metrics`, :func:`system_metrics`); the collector only reads and remembers.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common.atomic import fsync_dir, write_atomic
from protocol.messages import Telemetry

from .errors import AgentError, ModelNotFoundError

if TYPE_CHECKING:
    from .runtime import RequestStats, Runtime

__all__ = [
    "DEFAULT_BUCKETS_MS",
    "DEFAULT_MAX_ROWS",
    "RESERVED_KEYS",
    "Counts",
    "ModelReading",
    "SystemReading",
    "TelemetryBuffer",
    "TelemetryCollector",
    "TelemetryError",
    "TelemetryFeed",
    "counter_delta",
    "latency_histogram",
    "model_metrics",
    "new_latencies",
    "read_system",
    "system_metrics",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MAX_ROWS = 100_000
#: Upper edges (ms) of the latency histogram's buckets; one more bucket counts the rest.
DEFAULT_BUCKETS_MS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100,
                                          250, 1000)
#: Metric keys the buffer itself sets; a caller's metrics may not use them.
RESERVED_KEYS = frozenset({"dropped", "buffer_reset"})
_KEEP_CORRUPT = 3  # set-aside corrupt files kept, newest first
_WARN_EVERY_S = 60.0
# How far ahead of the seq in use the reservation file is moved: about one write an hour.
_SEQ_RESERVE_US = 3600 * 1_000_000
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    metrics TEXT NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    reset INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class TelemetryError(AgentError):
    """The telemetry buffer could not do what was asked (disk full, file not writable...).

    A corrupt buffer file is not an error: it is set aside and replaced (logged)."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """A damaged or foreign file, as opposed to a full disk, a lock or an I/O error."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    message = str(exc).lower()
    return "malformed" in message or "not a database" in message


@dataclass
class _State:
    """The buffer's counters; mirrored in the ``meta`` table, changed only after commit."""

    last_seq: int | None = None
    rows: int = 0
    dropped_total: int = 0
    unreported: int = 0  # dropped samples no sample in the buffer or sent has counted yet
    reset: bool = False  # the file was corrupt at open: an unknown number of samples lost


class TelemetryBuffer:
    """A durable, bounded, ordered outbox of telemetry samples in one SQLite file.

    Thread-safe: one connection behind a lock, so a sampler thread may append while the MQTT
    thread reads and acknowledges. One buffer object per file: the row count is kept in
    memory (other processes may read the file, for example to inspect it, but not write).

    ``max_rows`` bounds the samples kept; when full, :meth:`append` drops the oldest and the
    sample it appends carries ``"dropped": N``. A file SQLite finds corrupt (at open or
    later) is renamed ``<name>.<unix time>.corrupt`` (with its ``-wal``), an error is
    logged and a fresh file is used; nothing raises. Other database failures (a full disk,
    an unwritable directory) raise :class:`TelemetryError`.
    """

    FILE_NAME = "telemetry.db"

    def __init__(self, path: Path, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, not {max_rows}")
        self.path = Path(path)
        #: The seq reservation: every seq ever issued is below the number it holds.
        self.seq_path = self.path.with_suffix(".seq")
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._failed = 0  # appends that raised: lost, reported with the next sample
        self._last_warning = -math.inf
        self._state = _State()
        self._db = self._open()
        try:
            if self._state.rows > max_rows:
                self._with_recovery(self._trim)
        except BaseException:
            self._db.close()
            raise
        self._reserved = self._read_reservation()
        # A file without a last seq (new, deleted, set aside): start above the reservation.
        self._floor = -1 if self._reserved is None else self._reserved

    # -- the public operations ----------------------------------------------------------

    def append(self, at: float, metrics: Mapping[str, Any]) -> Telemetry:
        """Store one sample taken at Unix time ``at``; returns it with its ``seq``.

        ``seq = max(floor(at * 1e6), last_seq + 1)``: microseconds since the epoch, bumped
        past the previous seq when samples share a microsecond or the clock stepped back.
        ``last_seq`` is stored in the same transaction as the sample. In case the file is
        lost (deleted, or set aside as corrupt), :attr:`seq_path` holds a reservation R
        above every seq issued (moved an hour ahead, durably, before a seq reaches it), and
        a file with no ``last_seq`` starts at ``max(floor(at * 1e6), R)``. Only if both
        files are lost does the clock alone decide (docs/telemetry.md).

        When the buffer holds ``max_rows`` samples, the oldest are deleted first. The
        returned sample's metrics carry ``"dropped": N`` when N samples were dropped (or
        failed to be stored) since a sample last carried that count, and
        ``"buffer_reset": "corrupt"`` when the file was found corrupt and replaced.

        On return the sample is committed with a full fsync. Raises ValueError for a
        negative or non-finite ``at``, metrics that are not JSON (NaN included) or that
        use a reserved key, and TelemetryError when the database fails.
        """
        if not (math.isfinite(at) and at >= 0):
            raise ValueError(f"at must be a finite, non-negative Unix time, not {at!r}")
        clash = RESERVED_KEYS & set(metrics)
        if clash:
            raise ValueError(f"metric keys {sorted(clash)} are reserved for the buffer")
        body = dict(metrics)
        _to_json(body)  # refuse what cannot be stored before anything changes
        with self._lock:
            try:
                return self._with_recovery(lambda: self._append(at, body))
            except TelemetryError:
                self._failed += 1
                raise

    def pending(self, limit: int = 100, *, after: int | None = None) -> list[Telemetry]:
        """Up to ``limit`` unacknowledged samples, oldest first (``seq > after`` if given,
        to fetch past samples already in flight)."""
        if limit < 1:
            return []
        with self._lock:
            return self._with_recovery(lambda: self._pending(limit, after))

    def ack(self, up_to_seq: int) -> int:
        """Forget every sample with ``seq <= up_to_seq``; returns how many were deleted.

        Acknowledgement is cumulative: call it once every sample up to ``up_to_seq`` has
        been acknowledged by the broker (PUBACK for QoS 1), not for one of several in
        flight out of order.
        """
        with self._lock:
            return self._with_recovery(lambda: self._ack(up_to_seq))

    def __len__(self) -> int:
        """Samples waiting to be sent."""
        with self._lock:
            return self._state.rows

    def dropped_total(self) -> int:
        """Samples dropped to stay within ``max_rows`` (or lost to failed appends or a
        corrupt file, where counted), over this file's life."""
        with self._lock:
            return self._state.dropped_total + self._failed

    def last_seq(self) -> int | None:
        """The seq of the newest sample ever appended to this file (None: none yet)."""
        with self._lock:
            return self._state.last_seq

    def close(self) -> None:
        """Close the database; the buffer must not be used afterwards."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> TelemetryBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the work, under self._lock ----------------------------------------------------

    def _append(self, at: float, body: dict[str, Any]) -> Telemetry:
        state = self._state
        seq = max(math.floor(at * 1_000_000),
                  self._floor if state.last_seq is None else state.last_seq + 1)
        if self._reserved is None or seq >= self._reserved:
            self._reserve(seq + _SEQ_RESERVE_US)
        evict = max(0, state.rows + 1 - self.max_rows)
        unreported, reset = state.unreported + self._failed, state.reset
        with _transaction(self._db) as db:
            if evict:
                evict, counted, was_reset = _evict_oldest(db, evict)
                unreported += evict + counted
                reset = reset or was_reset
            if unreported:
                body["dropped"] = unreported
            if reset:
                body["buffer_reset"] = "corrupt"
            db.execute("INSERT INTO samples (seq, at, metrics, dropped, reset) "
                       "VALUES (?, ?, ?, ?, ?)", (seq, at, _to_json(body), unreported, reset))
            dropped_total = state.dropped_total + evict + self._failed
            _put_meta(db, last_seq=seq, dropped_total=dropped_total, unreported=0, reset=0)
        self._state = _State(last_seq=seq, rows=state.rows + 1 - evict,
                             dropped_total=dropped_total)
        self._failed = 0
        if evict:
            self._warn_dropped(evict)
        return Telemetry(seq=seq, at=at, metrics=body)

    def _trim(self) -> None:
        """Drop down to a ``max_rows`` smaller than what the file holds."""
        state = self._state
        with _transaction(self._db) as db:
            evict, counted, was_reset = _evict_oldest(db, state.rows - self.max_rows)
            unreported = state.unreported + evict + counted
            reset = state.reset or was_reset
            _put_meta(db, dropped_total=state.dropped_total + evict, unreported=unreported,
                      reset=int(reset))
        self._state = _State(last_seq=state.last_seq, rows=state.rows - evict,
                             dropped_total=state.dropped_total + evict,
                             unreported=unreported, reset=reset)
        self._warn_dropped(evict)

    def _pending(self, limit: int, after: int | None) -> list[Telemetry]:
        rows = self._db.execute("SELECT seq, at, metrics FROM samples WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (-1 if after is None else after,
                                                         limit)).fetchall()
        samples = []
        for seq, at, text in rows:
            try:
                metrics = json.loads(text)
            except ValueError:
                metrics = None
            if not isinstance(metrics, dict):
                self._discard_unreadable(seq)
                continue
            samples.append(Telemetry(seq=seq, at=at, metrics=metrics))
        return samples

    def _ack(self, up_to_seq: int) -> int:
        with _transaction(self._db) as db:
            deleted = db.execute("DELETE FROM samples WHERE seq <= ?", (up_to_seq,)).rowcount
        self._state.rows -= deleted
        return int(deleted)

    def _discard_unreadable(self, seq: int) -> None:
        """A row whose metrics are not a JSON object: delete it, count it as dropped."""
        log.error("telemetry sample %d in %s is unreadable; dropping it", seq, self.path)
        with _transaction(self._db) as db:
            db.execute("DELETE FROM samples WHERE seq = ?", (seq,))
            _put_meta(db, dropped_total=self._state.dropped_total + 1,
                      unreported=self._state.unreported + 1)
        self._state.rows -= 1
        self._state.dropped_total += 1
        self._state.unreported += 1

    def _read_reservation(self) -> int | None:
        try:
            value = int(self.seq_path.read_text(encoding="ascii").strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("telemetry seq reservation %s is unreadable (%s); seq follows the "
                        "buffer and the clock", self.seq_path, exc)
            return None
        return value if value >= 0 else None

    def _reserve(self, value: int) -> None:
        """Durably promise that no seq below ``value`` is issued later: before using one."""
        try:
            write_atomic(self.seq_path, f"{value}\n".encode())
        except OSError as exc:
            raise TelemetryError(f"telemetry seq reservation {self.seq_path} cannot be "
                                 f"written ({exc})") from exc
        self._reserved = value

    def _warn_dropped(self, count: int) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning("telemetry buffer %s is full (%d samples): dropped the oldest %d; "
                        "%d dropped in all. The broker has been unreachable for long, or "
                        "max_rows is too small", self.path, self.max_rows, count,
                        self._state.dropped_total)

    # -- opening and recovery ----------------------------------------------------------

    def _with_recovery(self, operation: Callable[[], _T]) -> _T:
        """Run ``operation``; a corrupt file is replaced and the operation run once more."""
        try:
            return operation()
        except sqlite3.Error as exc:
            if not (isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc)):
                raise TelemetryError(f"telemetry buffer {self.path}: {exc}") from exc
            lost = self._state
            log.error("telemetry buffer %s became corrupt (%s); moving it aside and starting "
                      "a fresh one. %d unsent samples are lost and reported as dropped",
                      self.path, exc, lost.rows)
        try:
            self._db.close()
            self._set_aside()
            self._db = self._open()
            # What this process knew survives the file: seq stays above every earlier one,
            # and the lost samples are counted, not silently gone.
            carried = lost.rows + lost.unreported
            with _transaction(self._db) as db:
                _put_meta(db, last_seq=lost.last_seq,
                          dropped_total=lost.dropped_total + lost.rows,
                          unreported=carried, reset=int(lost.reset))
            self._state = _State(last_seq=lost.last_seq,
                                 dropped_total=lost.dropped_total + lost.rows,
                                 unreported=carried, reset=lost.reset)
            return operation()
        except sqlite3.Error as exc:
            raise TelemetryError(f"telemetry buffer {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        """Connect and load the counters; a corrupt file is set aside for a fresh one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TelemetryError(f"telemetry buffer {self.path}: cannot create its "
                                 f"directory ({exc})") from exc
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise TelemetryError(f"telemetry buffer {self.path} cannot be opened: "
                                     f"{exc}") from exc
            log.error("telemetry buffer %s is corrupt (%s); moving it aside and starting a "
                      "fresh one: unsent samples in it are lost, the next sample says so",
                      self.path, exc)
        self._set_aside()
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise TelemetryError(f"telemetry buffer {self.path} cannot be created: "
                                 f"{exc}") from exc
        try:
            with _transaction(db):
                _put_meta(db, reset=1)
        except sqlite3.Error as exc:
            db.close()
            raise TelemetryError(f"telemetry buffer {self.path} cannot be created: "
                                 f"{exc}") from exc
        self._state.reset = True
        return db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute("SELECT count(*) FROM samples").fetchone()[0]
        except BaseException:
            db.close()
            raise
        self._state = _State(last_seq=meta.get("last_seq"), rows=rows,
                             dropped_total=meta.get("dropped_total", 0),
                             unreported=meta.get("unreported", 0),
                             reset=bool(meta.get("reset", 0)))
        return db

    def _set_aside(self) -> None:
        """Rename the file and its WAL to ``<name>.<time>.corrupt[-wal]``; keep a few."""
        stamp = f"{time.time():.6f}".replace(".", "")
        aside = self.path.with_name(f"{self.path.name}.{stamp}.corrupt")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            try:
                if suffix == "-shm":
                    source.unlink(missing_ok=True)  # rebuilt from the WAL; never data
                else:
                    source.replace(f"{aside}{suffix}")
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise TelemetryError(f"telemetry buffer {self.path} is corrupt and cannot "
                                     f"be moved aside ({exc})") from exc
        with suppress(OSError):
            fsync_dir(self.path.parent)
        log.error("corrupt telemetry buffer kept as %s", aside)
        old = sorted(self.path.parent.glob(f"{self.path.name}.*.corrupt"), reverse=True)
        for stale in old[_KEEP_CORRUPT:]:
            for suffix in ("", "-wal"):
                Path(f"{stale}{suffix}").unlink(missing_ok=True)


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def _evict_oldest(db: sqlite3.Connection, count: int) -> tuple[int, int, bool]:
    """Delete the ``count`` oldest samples; returns how many went, the sum of the drops
    they were carrying (passed on, so a total is never lost) and whether one carried a
    reset."""
    last, counted, was_reset = db.execute(
        "SELECT max(seq), sum(dropped), max(reset) FROM (SELECT seq, dropped, reset "
        "FROM samples ORDER BY seq LIMIT ?)", (count,)).fetchone()
    deleted = db.execute("DELETE FROM samples WHERE seq <= ?", (last,)).rowcount
    return int(deleted), int(counted or 0), bool(was_reset)


def _put_meta(db: sqlite3.Connection, **values: int | None) -> None:
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                   "SET value = excluded.value",
                   [(k, v) for k, v in values.items() if v is not None])


def _to_json(obj: Mapping[str, Any]) -> str:
    try:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"telemetry metrics must be plain JSON ({exc})") from None


# -- collecting: pure parts ------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """A model's cumulative request and error counters at one moment."""

    requests: int = 0
    errors: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors)


def counter_delta(before: Counts | None, now: Counts) -> Counts:
    """Requests and errors counted between two readings of the same counters.

    ``before`` None (counters never read) or a counter lower than before (they restarted
    from zero) means everything ``now`` counts is new.
    """
    if before is None or now.requests < before.requests or now.errors < before.errors:
        return now
    return Counts(now.requests - before.requests, now.errors - before.errors)


def new_latencies(before: Counts | None, now: Counts,
                  recent: Sequence[float]) -> Sequence[float]:
    """The latencies of the successful requests between two readings.

    ``recent`` is the counters' latency record at ``now`` (oldest first, bounded): every
    successful request appends one, a failed one none. If more requests succeeded than
    ``recent`` holds, only the newest ``len(recent)`` are known.
    """
    delta = counter_delta(before, now)
    succeeded = delta.requests - delta.errors
    return recent[len(recent) - min(succeeded, len(recent)):] if succeeded > 0 else ()


def latency_histogram(latencies_ms: Sequence[float],
                      edges_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> list[int]:
    """Counts per bucket: ``(edges[i-1], edges[i]]`` for each edge, then ``> edges[-1]``."""
    counts = [0] * (len(edges_ms) + 1)
    for value in latencies_ms:
        counts[bisect.bisect_left(edges_ms, value)] += 1
    return counts


@dataclass(frozen=True)
class ModelReading:
    """What the runtime says about one served model, besides its counters."""

    version: int | None
    state: str  # "serving", "probation", or "unloaded" (gone since the previous sample)
    backend: str
    fallback: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None


def model_metrics(reading: ModelReading, delta: Counts, latencies_s: Sequence[float],
                  edges_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> dict[str, Any]:
    """One model's entry in a sample: identity, counts since the previous sample, latency.

    ``p50_ms``/``p99_ms`` are the runtime's figures (its recent requests, the same the
    probation judge uses); ``latency_hist`` counts this interval's successful requests.
    """
    entry: dict[str, Any] = {
        "version": reading.version, "state": reading.state, "backend": reading.backend,
        "requests": delta.requests, "errors": delta.errors,
        "p50_ms": _round(reading.p50_ms, 3), "p99_ms": _round(reading.p99_ms, 3),
        "latency_hist": latency_histogram([s * 1e3 for s in latencies_s], edges_ms),
    }
    if reading.fallback is not None:
        entry["fallback"] = reading.fallback
    return entry


@dataclass(frozen=True)
class SystemReading:
    """Raw system figures; None (or empty) for whatever this platform cannot tell."""

    cpu_percent: float | None = None  # whole system, since the previous reading
    process_cpu_percent: float | None = None  # this process; 100 = one core
    rss_bytes: int | None = None
    memory_percent: float | None = None  # system memory in use
    load_avg: tuple[float, float, float] | None = None
    temperatures_c: Mapping[str, float] | None = None  # sensor -> current reading


def system_metrics(reading: SystemReading) -> dict[str, Any]:
    """The ``system`` part of a sample: rounded, with absent figures left out.

    ``temp_c`` is the hottest sensor's reading (and ``temp_sensor`` its name)."""
    out: dict[str, Any] = {}
    for key, value in (("cpu_percent", reading.cpu_percent),
                       ("process_cpu_percent", reading.process_cpu_percent),
                       ("memory_percent", reading.memory_percent)):
        if value is not None and math.isfinite(value):
            out[key] = round(value, 1)
    if reading.rss_bytes is not None:
        out["rss_bytes"] = int(reading.rss_bytes)
    if reading.load_avg is not None and all(math.isfinite(v) for v in reading.load_avg):
        out["load_avg"] = [round(v, 2) for v in reading.load_avg]
    temperatures = {name: value for name, value in (reading.temperatures_c or {}).items()
                    if math.isfinite(value)}
    if temperatures:
        sensor = max(temperatures, key=lambda name: temperatures[name])
        out["temp_c"] = round(temperatures[sensor], 1)
        out["temp_sensor"] = sensor
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


# -- collecting: the edge ----------------------------------------------------------------


def read_system(process: Any = None) -> SystemReading:
    """Read the system with psutil; ``process`` is a ``psutil.Process`` kept between calls
    (CPU percentages are measured since its previous call). Never raises."""
    import psutil

    def attempt(read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except (psutil.Error, OSError, AttributeError, NotImplementedError):
            return None

    process = process or psutil.Process()
    load = attempt(psutil.getloadavg)
    memory = attempt(psutil.virtual_memory)
    rss = attempt(lambda: process.memory_info().rss)
    return SystemReading(
        cpu_percent=attempt(lambda: psutil.cpu_percent(interval=None)),
        process_cpu_percent=attempt(lambda: process.cpu_percent(interval=None)),
        rss_bytes=rss, memory_percent=None if memory is None else memory.percent,
        load_avg=None if load is None else (load[0], load[1], load[2]),
        temperatures_c=attempt(_temperatures))


def _temperatures() -> dict[str, float]:
    import psutil

    sensors = getattr(psutil, "sensors_temperatures", None)  # absent on some platforms
    found: dict[str, float] = {}
    for chip, entries in (sensors() if sensors else {}).items():
        for number, entry in enumerate(entries):
            if entry.current is not None:
                found[f"{chip}/{entry.label or number}"] = float(entry.current)
    return found


def _psutil_reader() -> Callable[[], SystemReading]:
    import psutil

    process = psutil.Process()

    def read() -> SystemReading:
        return read_system(process)

    read()  # CPU percentages count from here
    return read


def _read_stats(stats: RequestStats) -> tuple[Counts, Sequence[float]]:
    """Counters and recent latencies (seconds) read together, so they agree."""
    requests, errors, latencies = stats.read()
    return Counts(requests, errors), latencies


class TelemetryCollector:
    """Builds the metrics of one sample from a runtime and the system.

    Counts are per interval: each :meth:`collect` reports the requests and errors since the
    previous one (the first: since each model was loaded). A model swapped in (install,
    rollback) brings new counters; the collector reads the outgoing model's counters until
    they go quiet, so requests still finishing on the old session are counted too.

    ``system`` reads the system (default: :func:`read_system` with psutil); tests pass a
    fake. Not thread-safe: call :meth:`collect` from one thread.
    """

    def __init__(self, runtime: Runtime, *, system: Callable[[], SystemReading] | None = None,
                 buckets_ms: Sequence[float] = DEFAULT_BUCKETS_MS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.buckets_ms = tuple(buckets_ms)
        self._monotonic = monotonic
        self._previous: float | None = None
        self._system = system or _psutil_reader()
        # Counters as last read, per RequestStats object (a model swapped back in keeps its
        # old counters), and per model name the objects still to read.
        self._seen: weakref.WeakKeyDictionary[RequestStats, Counts] = (
            weakref.WeakKeyDictionary())
        self._tracked: dict[str, tuple[ModelReading, list[RequestStats]]] = {}

    def collect(self) -> dict[str, Any]:
        """The metrics of one sample (see docs/telemetry.md for the fields)."""
        now = self._monotonic()
        interval = None if self._previous is None else round(now - self._previous, 3)
        self._previous = now
        models: dict[str, Any] = {}
        tracked: dict[str, tuple[ModelReading, list[RequestStats]]] = {}
        for info in self.runtime.models():
            try:
                stats = self.runtime.served(info.name).stats
            except ModelNotFoundError:
                continue  # unloaded since models(); the next sample reports it
            figures = stats.snapshot()
            reading = ModelReading(info.version, info.state, info.backend, info.fallback,
                                   figures["p50_ms"], figures["p99_ms"])
            previous = self._tracked.pop(info.name, (reading, []))[1]
            delta, latencies, keep = self._read(stats, previous)
            models[info.name] = model_metrics(reading, delta, latencies, self.buckets_ms)
            tracked[info.name] = (reading, keep)
        for name, (last, previous) in self._tracked.items():  # no longer served
            delta, latencies, keep = self._read(None, previous)
            if delta.requests:
                gone = ModelReading(last.version, "unloaded", last.backend, last.fallback)
                models[name] = model_metrics(gone, delta, latencies, self.buckets_ms)
            if keep:
                tracked[name] = (last, keep)
        self._tracked = tracked
        return {"interval_s": interval, "system": system_metrics(self._system()),
                "models": models, "latency_buckets_ms": list(self.buckets_ms)}

    def _read(self, current: RequestStats | None, previous: list[RequestStats],
              ) -> tuple[Counts, list[float], list[RequestStats]]:
        """Sum the counters of ``current`` and the outgoing objects in ``previous``; keep
        reading an outgoing one while its counters still move."""
        total = Counts()
        latencies: list[float] = []
        keep = [] if current is None else [current]
        for stats in ([] if current is None else [current]) + [
                s for s in previous if s is not current]:
            counts, recent = _read_stats(stats)
            before = self._seen.get(stats)
            delta = counter_delta(before, counts)
            latencies.extend(new_latencies(before, counts, recent))
            self._seen[stats] = counts
            total += delta
            if stats is not current and delta.requests:
                keep.append(stats)
        return total, latencies, keep



class TelemetryFeed:
    """Samples from a collector into a buffer: the fleet link's telemetry source."""

    def __init__(self, collector: TelemetryCollector, buffer: TelemetryBuffer,
                 clock: Callable[[], float] = time.time) -> None:
        self.collector = collector
        self.buffer = buffer
        self.clock = clock

    def sample(self) -> None:
        """Take one sample into the durable buffer."""
        self.buffer.append(self.clock(), self.collector.collect())

    def pending(self, limit: int) -> list[Telemetry]:
        """Buffered samples, oldest first."""
        return self.buffer.pending(limit)

    def ack(self, up_to_seq: int) -> None:
        """The broker has every sample up to ``up_to_seq``."""
        self.buffer.ack(up_to_seq)

"""Answering devices' chunk requests: the bytes of a bundle they may fetch, or a refusal.

A device may fetch the bundles that are or were in its desired state, and the delta bundles
of those releases (docs/bundle-format.md §8), and nothing else;
an unknown bundle and one that is not for it get the same answer, so a device cannot probe
what is stored. In a rollout every device asks for the same chunks, so encoded frames are
kept in memory (least recently used dropped beyond :data:`FRAME_CACHE_BYTES`): each chunk
is read, hashed and framed once instead of once per device. A device asking faster than its
byte rate (:class:`~fleet_server.rate_limit.TokenBuckets`) gets no answer: the agent asks
again after its back-off, and a device that asks without reading cannot flood the broker.

Requests are answered on paho's network thread, at once: there is nothing to store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from protocol import messages

from .rate_limit import TokenBuckets
from .registry import BundleRecord, DeltaRecord, Registry

__all__ = ["FRAME_CACHE_BYTES", "ChunkServer"]

log = logging.getLogger(__name__)

#: Encoded chunk frames kept in memory.
FRAME_CACHE_BYTES = 64 * 1024 * 1024
#: A device over its chunk rate is logged at most this often.
_THROTTLE_LOG_S = 60.0


class ChunkServer:
    """Chunk answers for one registry's bundles (thread-safe)."""

    def __init__(self, registry: Registry, *, rate_bytes: float, burst_bytes: float) -> None:
        self._registry = registry
        self._budget = TokenBuckets(rate_bytes, burst_bytes)
        # Stored bundles by sha256 (immutable and never deleted), and (device, sha256) pairs
        # known to be fetchable (was_desired only ever turns true, until a device reset).
        self._bundles: dict[str, BundleRecord | DeltaRecord] = {}
        self._fetchable: set[tuple[str, str]] = set()
        self._frames = _FrameCache(FRAME_CACHE_BYTES)
        self._throttle_logged: dict[str, float] = {}

    def answer(self, device: str, payload: bytes) -> bytes | None:
        """The encoded answer to ``device``'s chunk request ``payload``, or None when the
        device is over its rate (no answer). ProtocolError for a request that does not
        parse; RegistryError (or any database error) when the registry cannot tell."""
        request = messages.decode_chunk_request(payload)
        now = time.monotonic()
        if not self._budget.take(device, request.length, now):
            if now - self._throttle_logged.get(device, -_THROTTLE_LOG_S) >= _THROTTLE_LOG_S:
                self._throttle_logged[device] = now
                log.info("%s asks for chunks faster than its rate; the excess is not "
                         "answered (logged once a minute)", device)
            return None
        return self._frame(device, request)

    def forget_device(self, device: str) -> None:
        """Forget what ``device`` could fetch (its id is being reset)."""
        self._fetchable = {pair for pair in self._fetchable if pair[0] != device}

    def _frame(self, device: str, request: messages.ChunkRequest) -> bytes:
        """The bundle's bytes if ``device`` may fetch it (from the frame cache, else read
        from the blob and cached), or a refusal."""
        sha = request.bundle_sha256
        record = self._bundle_record(sha)
        fetchable = record is not None and self._may_fetch(device, sha)
        key = (sha, request.offset, request.length)
        if fetchable:
            frame = self._frames.get(key)
            if frame is not None:
                return frame
        chunk = self._read_chunk(device, request, record if fetchable else None)
        frame = messages.encode_chunk(chunk)
        if chunk.error is not None:
            log.info("chunk request of %s refused: %s", device, chunk.error)
        else:
            self._frames.put(key, frame)
        return frame

    def _bundle_record(self, sha256: str) -> BundleRecord | DeltaRecord | None:
        record: BundleRecord | DeltaRecord | None = self._bundles.get(sha256)
        if record is None:
            record = self._registry.get_bundle(sha256) or self._registry.get_delta(sha256)
            if record is not None:  # unknown ones are asked again: they may be uploaded
                self._bundles[sha256] = record
        return record

    def _may_fetch(self, device: str, sha256: str) -> bool:
        if (device, sha256) in self._fetchable:
            return True
        record = self._bundle_record(sha256)
        # A delta bundle may be fetched by the devices its release was desired for.
        release = record.bundle_sha256 if isinstance(record, DeltaRecord) else sha256
        if not self._registry.was_desired(device, release):
            return False
        self._fetchable.add((device, sha256))
        return True

    def _read_chunk(self, device: str, request: messages.ChunkRequest,
                    record: BundleRecord | DeltaRecord | None) -> messages.Chunk:
        """The chunk of ``record``'s blob, or a refusal; ``record`` is None for a bundle
        that is unknown or not available to ``device``."""
        sha = request.bundle_sha256

        def refuse(error: str, total: int = 0) -> messages.Chunk:
            return messages.Chunk(sha, request.offset, total, b"", error)

        if record is None:
            return refuse(f"bundle {sha} is not available to device {device}; only bundles "
                          "in its desired state can be fetched")
        if request.offset >= record.size:
            return refuse(f"offset {request.offset} is at or past the end of the bundle "
                          f"({record.size} bytes)", record.size)
        try:
            with record.path.open("rb") as f:
                f.seek(request.offset)
                data = f.read(request.length)
        except OSError as exc:
            log.error("bundle blob %s is unreadable (%s); re-upload the bundle to repair it",
                      record.path, exc)
            return refuse("the server cannot read this bundle right now; retry later",
                          record.size)
        return messages.Chunk(sha, request.offset, record.size, data)


class _FrameCache:
    """Encoded chunk frames by (bundle sha256, offset, length), at most ``max_bytes`` of them;
    the least recently used go first. Bundles are immutable, so a frame never goes stale."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
            return frame

    def put(self, key: tuple[str, int, int], frame: bytes) -> None:
        if len(frame) > self.max_bytes:
            return
        with self._lock:
            old = self._frames.pop(key, None)
            self._bytes += len(frame) - (0 if old is None else len(old))
            self._frames[key] = frame
            while self._bytes > self.max_bytes:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= len(dropped)

"""Fetching one bundle in chunks over the fleet link: resumable, flow-controlled, checked.

The agent asks for the bytes it lacks (:class:`~protocol.messages.ChunkRequest`), at most
``window`` chunks at a time, and writes each arriving chunk to ``{name}.part`` in order
(chunks that overtake others wait in memory). The file's length, rounded down to a whole
chunk, is therefore always the resume point: after a dropped connection, or a restart of
the agent, fetching continues at the first missing chunk rather than from zero (a
short write, e.g. on a full disk, leaves a tail that is cut off and fetched again). A
request unanswered for ``timeout_s`` is sent again, and the timeout doubles (up to a
minute, back to ``timeout_s`` once chunks flow) so a busy server is not flooded. Each
chunk's own sha256 is checked on arrival (:func:`protocol.messages.decode_chunk`) and the
whole file's against the desired one at the end; a mismatch there discards the file and
starts over. No I/O but the file: the link moves the messages.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from protocol.messages import DEFAULT_CHUNK_BYTES, Chunk, ChunkRequest

from .errors import AgentError
from .model_store import sha256_file

__all__ = ["BundleFetch", "BundleUnavailableError", "CorruptFetchError", "FetchError"]

log = logging.getLogger(__name__)
_MAX_TIMEOUT_S = 60.0


class FetchError(AgentError):
    """The bundle could not be fetched. ``transient``: fetching it again may work."""

    transient = False


class BundleUnavailableError(FetchError):
    """The server cannot send the bundle, or its size differs from the desired state's."""


class CorruptFetchError(FetchError):
    """The whole bundle arrived but does not hash to the desired sha256; the partial file is
    gone and the next requests start from zero."""

    transient = True


class BundleFetch:
    """The bundle ``sha256`` of ``size`` bytes, assembled in ``directory`` as ``{name}.part``
    and renamed to ``{name}.efb`` once whole and checked (``name`` defaults to the sha256)."""

    def __init__(self, directory: Path, sha256: str, size: int, *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, window: int = 4,
                 timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 name: str | None = None) -> None:
        self.sha256 = sha256
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.timeout_s = timeout_s
        self._base_timeout_s = timeout_s
        self.clock = clock
        self.part = directory / f"{name or sha256}.part"
        self.path = directory / f"{name or sha256}.efb"
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._early: dict[int, bytes] = {}  # chunks that arrived ahead of the file's end
        self._asked: dict[int, float] = {}  # offset -> when it was requested
        on_disk = self.part.stat().st_size if self.part.exists() else 0
        # Only whole chunks count: a short write (a full disk, a crash mid-write) leaves a
        # tail that no chunk offset would ever extend.
        self._have = min(on_disk - on_disk % chunk_bytes, size)
        if on_disk != self._have:
            os.truncate(self.part, self._have)
        if self._have:
            log.info("resuming bundle %s at byte %d of %d", sha256[:12], self._have, size)
        #: Bytes that had to be fetched again (resumes and timeouts), for telemetry.
        self.refetched = 0
        #: Times the whole bundle arrived and did not hash to ``sha256``.
        self.corrupted = 0

    @property
    def done(self) -> bool:
        """Whether the verified bundle is at :attr:`path`."""
        return self.path.exists()

    @property
    def progress(self) -> float:
        """Fraction of the bundle on disk."""
        return 1.0 if self.done else self._have / self.size if self.size else 0.0

    def requests(self) -> list[ChunkRequest]:
        """Chunks to ask for now: the window after the file's end, minus what is on its way
        (a request unanswered for ``timeout_s`` is not on its way any more)."""
        with self._lock:
            if self.done:
                return []
            now = self.clock()
            end = min(self.size, self._have + self.window * self.chunk_bytes)
            wanted = []
            timed_out = False
            for offset in range(self._have, end, self.chunk_bytes):
                asked = self._asked.get(offset)
                if offset in self._early or (asked is not None and now - asked <= self.timeout_s):
                    continue
                length = min(self.chunk_bytes, self.size - offset)
                if asked is not None:
                    self.refetched += length
                    timed_out = True
                wanted.append(ChunkRequest(self.sha256, offset, length))
                self._asked[offset] = now
            if timed_out:
                # A server too busy to answer in time (a rollout to a large fleet) gets
                # more time, not more requests: back off, up to a minute.
                self.timeout_s = min(self.timeout_s * 2, _MAX_TIMEOUT_S)
            return wanted

    def forget_requests(self) -> None:
        """The connection dropped: answers to earlier requests will not come."""
        with self._lock:
            self._asked.clear()

    def receive(self, chunk: Chunk) -> bool:
        """Take one chunk; True when the bundle is complete and verified.

        Raises FetchError if the server reports an error or the finished file does not
        hash to ``sha256`` (the partial file is then discarded).
        """
        if chunk.error is not None:
            raise BundleUnavailableError(f"the fleet server cannot send bundle "
                                         f"{self.sha256[:12]}: {chunk.error}")
        if chunk.total != self.size:
            raise BundleUnavailableError(
                f"bundle {self.sha256[:12]} is {chunk.total} bytes on the server, {self.size} "
                "in the desired state; the desired state is stale")
        with self._lock:
            self._asked.pop(chunk.offset, None)
            self.timeout_s = self._base_timeout_s  # the server answers again
            if chunk.offset >= self._have and chunk.offset % self.chunk_bytes == 0:
                self._early[chunk.offset] = chunk.data
            appended = []
            while self._have in self._early:
                appended.append(self._early.pop(self._have))
                self._asked.pop(self._have, None)
                self._have += len(appended[-1])
            if appended:
                start = self._have - sum(len(a) for a in appended)
                with open(self.part, "r+b" if self.part.exists() else "wb") as f:
                    f.seek(start)
                    try:
                        f.write(b"".join(appended))
                        f.flush()
                        os.fsync(f.fileno())
                    except OSError:
                        self._have = start  # not written: ask for these chunks again
                        raise
            if self._have < self.size:
                return False
            return self._finish()

    def _finish(self) -> bool:
        digest = sha256_file(self.part)
        if digest != self.sha256:
            self.corrupted += 1
            self.part.unlink(missing_ok=True)
            self._have = 0
            self._early.clear()
            raise CorruptFetchError(f"bundle {self.sha256[:12]} arrived complete but hashes "
                                    f"to {digest[:12]}")
        os.replace(self.part, self.path)
        return True

    def discard(self) -> None:
        """Delete the partial and finished files."""
        self.part.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)

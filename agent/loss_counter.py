"""A durable count of lost messages that can still be raised when the disk is full.

When the outbox cannot store a sample or an event (a full disk, an I/O error), the loss
must still be counted, and survive a restart, so the fleet hears of it. Writing that count
into the outbox's own database would need the space that is missing, so it lives in a small
file allocated while there was room and then only overwritten in place: two 32-byte slots
written alternately, each ``generation, samples, events, crc32``; the valid slot with the
higher generation holds the count. A torn write damages one slot, and the other still
holds the previous count. Overwriting allocated blocks needs no free space on ext4, xfs,
f2fs and tmpfs; on a copy-on-write file system it may fail like any other write, and the
caller keeps the count in memory (:class:`~agent.outbox.Outbox` does).
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from common.atomic import fsync_dir

__all__ = ["LossCounter", "Tally"]

_SLOT = struct.Struct(">QQQI4x")  # generation, samples, events, crc32 of the first 24 bytes
_BODY = 24


@dataclass(frozen=True)
class Tally:
    """A count per kind of message: telemetry samples and events."""

    samples: int = 0
    events: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.samples + other.samples, self.events + other.events)

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.samples - other.samples, self.events - other.events)

    def __bool__(self) -> bool:
        return bool(self.samples or self.events)


class LossCounter:
    """Monotonic totals of lost samples and events in the file at ``path``.

    Opening creates the file (its two slots zeroed, fsynced) if it does not exist; a file
    with no valid slot counts from zero. Raises OSError if the file cannot be opened or
    created. Not thread-safe: the outbox calls it under its own lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            generation, self._value = self._read()
            if not existed or os.fstat(self._fd).st_size < 2 * _SLOT.size:
                # Allocate both slots now, while there is room: later writes only overwrite.
                os.pwrite(self._fd, _pack(generation, self._value) * 2, 0)
                os.fsync(self._fd)
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(self._fd)
            raise
        self._generation = generation

    @property
    def value(self) -> Tally:
        """The totals counted so far (over the file's life)."""
        return self._value

    def add(self, lost: Tally) -> Tally:
        """Count ``lost`` more; durable (fsynced) on return. Raises OSError, and then the
        count on disk (and :attr:`value`) is unchanged."""
        generation, value = self._generation + 1, self._value + lost
        os.pwrite(self._fd, _pack(generation, value), _SLOT.size * (generation % 2))
        os.fsync(self._fd)
        self._generation, self._value = generation, value
        return value

    def close(self) -> None:
        """Close the file (again: nothing); the counter must not be used afterwards."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read(self) -> tuple[int, Tally]:
        data = os.pread(self._fd, 2 * _SLOT.size, 0)
        best = (0, Tally())
        for offset in (0, _SLOT.size):
            slot = data[offset:offset + _SLOT.size]
            if len(slot) < _SLOT.size:
                continue
            generation, samples, events, crc = _SLOT.unpack(slot)
            if crc == zlib.crc32(slot[:_BODY]) and generation >= best[0]:
                best = (generation, Tally(samples, events))
        return best


def _pack(generation: int, value: Tally) -> bytes:
    body = struct.pack(">QQQ", generation, value.samples, value.events)
    return _SLOT.pack(generation, value.samples, value.events, zlib.crc32(body))

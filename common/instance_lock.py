"""One process per directory: an exclusive ``flock`` on a file that names its holder.

``fleet serve`` locks its data directory and ``edge-agent serve|run`` their state directory:
two of either on one directory would share a registry, a broker session, install records
and run files, and each would undo the other. The lock goes with the process (closed file
or death, ``kill -9`` included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

__all__ = ["DirectoryLock", "LockHeld", "hold_lock"]


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is its pid as it wrote it ("unknown" if
    it had not yet)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.path = path
        self.holder = holder


def hold_lock(path: Path) -> IO[str]:
    """Take the lock at ``path`` (created if missing) and write this pid into it; keep the
    returned file open for as long as the lock must be held. LockHeld if another process
    holds it; OSError if the file cannot be opened."""
    lock = path.open("a+", encoding="ascii")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise LockHeld(path, holder) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


class DirectoryLock:
    """An exclusive ``flock`` on a directory itself: nothing is written, so it can be taken
    on a full disk (an agent must start and serve there). Released by :meth:`close`, when
    the object is collected, or when the process ends. LockHeld (``holder`` "unknown") if
    another process holds it; OSError if the directory cannot be opened."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise LockHeld(path, "unknown") from None

    def close(self) -> None:
        """Release the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

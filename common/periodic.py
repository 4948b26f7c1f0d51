"""Work done every N seconds on a thread of its own until stopped: one loop for all of it.

The agent's telemetry sampler, the fleet server's housekeeping and its leadership check
all run a step periodically, must survive a step that raises (logged, then the next round
comes as usual) and must stop promptly: :meth:`Periodic.stop` wakes the waiting thread at
once and returns after the step under way (and ``on_exit``) has finished::

    checker = Periodic("leadership", check, interval_s=1.0, on_exit=release)
    checker.start()        # check() now, then every second
    checker.stop()         # ... release() has run when this returns

A step may return how long to wait before the next one instead of ``interval_s`` (the
sampler keeps its slots on a fixed grid that way).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

__all__ = ["Periodic"]

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``step()`` every ``interval_s`` seconds on a daemon thread named ``name``.

    The first step runs at :meth:`start`, or after one interval with ``wait_first``. A
    step that returns a number waits that many seconds (at least 0) before the next one
    instead of ``interval_s``. An exception from ``step`` is logged and the loop goes on.
    ``on_exit`` runs on the thread once the loop has ended (release what the steps held);
    an exception from it is logged too.
    """

    def __init__(self, name: str, step: Callable[[], float | None], interval_s: float, *,
                 wait_first: bool = False, on_exit: Callable[[], None] | None = None) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"{name}: the interval must be a positive number of seconds, "
                             f"not {interval_s!r}")
        self.name = name
        self.step = step
        self.interval_s = interval_s
        self.wait_first = wait_first
        self.on_exit = on_exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread is started and not stopped yet."""
        return self._thread is not None

    def start(self) -> None:
        """Start the thread (again, after :meth:`stop`)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running; stop it before starting it")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop; returns once the step under way and ``on_exit`` have finished. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        delay = self.interval_s if self.wait_first else 0.0
        while not self._stop.wait(delay):
            try:
                wanted = self.step()
            except Exception:  # one failed round must not end the work
                log.exception("%s failed; tried again in %g s", self.name, self.interval_s)
                wanted = None
            delay = self.interval_s if wanted is None else max(0.0, wanted)
        if self.on_exit is not None:
            try:
                self.on_exit()
            except Exception:
                log.exception("%s: stopping failed", self.name)

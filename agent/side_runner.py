"""Work beside the request path: sampled requests handed to one worker thread.

A served model carries a :class:`SideChannel` when anything watches it (the monitor, a
shadow candidate, the kept previous version). On every request the channel does one
addition and one comparison; only a request that some watcher samples goes further: its
inputs and outputs are copied (the caller may reuse its arrays once it has the answer) and
held until the watcher's ``batch`` of them is there, which is then put on the
:class:`SideRunner`'s bounded queue without waiting. Handing over in batches matters: waking
the side thread costs a thread switch and a turn of the GIL, far more than counting a small
tensor (docs/benchmarks.md, monitoring). When the queue is full the batch is dropped for
that watcher and counted (:meth:`SideTask.dropped`): the response never waits for a
watcher, and a slow shadow model cannot pile up memory. :meth:`SideChannel.flush` hands
over what is held (the telemetry collector calls it before reading the watchers).

Sampling is random, each request with probability ``r``, drawn as geometric gaps between
sampled requests (:func:`due_after`): one random number per *sampled* request, nothing on
the others. An evenly spaced rule (every ``1/r``-th request) looked cheaper and fairer but
aliases with periodic traffic: an app cycling through 540 images at 5% saw only 27 of them,
and the output statistics reported drift on unchanged data (`fleet demo --drift`).
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

__all__ = ["HOLD_BYTES", "Request", "SideChannel", "SideRunner", "SideTask", "batch_size",
           "due_after"]

log = logging.getLogger(__name__)


#: One request as a watcher gets it: (inputs, outputs), copies.
Request = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class SideTask(Protocol):
    """A watcher of a served model's requests."""

    #: Sampled requests handed over together.
    batch: int

    def handle(self, requests: Sequence[Request]) -> None:
        """Take sampled requests (on the side runner's thread)."""
        ...

    def dropped(self, count: int) -> None:
        """``count`` requests sampled for this watcher found the queue full."""
        ...


#: About how many bytes of sampled requests are held per watcher before they are handed over.
HOLD_BYTES = 1 << 20


def batch_size(request_bytes: int, most: int) -> int:
    """Requests handed over together: ``most``, fewer when each request's tensors take
    ``request_bytes`` (so at most about :data:`HOLD_BYTES` are held), at least one."""
    return max(1, min(most, HOLD_BYTES // max(1, request_bytes)))


def due_after(n: int, rate: float, u: float) -> int:
    """The number of the next request after request ``n`` that a watcher sampling each
    request with probability ``rate`` gets, given ``u`` uniform in [0, 1): ``n`` plus a
    geometric gap (the requests up to and including the next success)."""
    if rate >= 1.0:
        return n + 1
    return n + 1 + int(math.log1p(-u) / math.log1p(-rate))


class SideRunner:
    """One worker thread draining a bounded queue of (watcher, requests) batches."""

    def __init__(self, capacity: int = 16) -> None:
        self._queue: queue.Queue[tuple[SideTask, Sequence[Request]] | None] = (
            queue.Queue(capacity))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._unfinished = 0

    def submit(self, task: SideTask, requests: Sequence[Request]) -> None:
        """Queue ``requests`` for ``task`` without waiting; counted as dropped when full."""
        if self._thread is None:
            self._start()
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait((task, requests))
        except queue.Full:
            self._done()
            task.dropped(len(requests))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is handled; False if ``timeout`` passed
        first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def _done(self) -> None:
        with self._idle:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()

    def close(self) -> None:
        """Stop the worker once the queue is drained."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="edgefleet-side",
                                                daemon=True)
                self._thread.start()

    def _work(self) -> None:
        # At the request threads' priority, unlike the install worker: this thread takes the
        # GIL often, and one preempted while holding it would stall the requests behind it.
        while (item := self._queue.get()) is not None:
            task, requests = item
            try:
                task.handle(requests)
            except Exception:  # a watcher's failure must not stop the others
                log.exception("side task %r failed", task)
            finally:
                self._done()


class SideChannel:
    """The per-model hook: which requests go to which watchers (``(task, rate)`` pairs,
    rates in (0, 1])."""

    def __init__(self, runner: SideRunner, watchers: Sequence[tuple[SideTask, float]]) -> None:
        self.runner = runner
        self.watchers = tuple((task, rate) for task, rate in watchers if rate > 0)
        self._n = 0
        self._random = random.Random()
        self._due = [due_after(0, rate, self._random.random()) for _, rate in self.watchers]
        self._next = min(self._due, default=math.inf)
        self._held: list[list[Request]] = [[] for _ in self.watchers]

    def offer(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Called on the request path after every successful request. Racing threads may
        lose a count now and then: that shifts a sample, it does not break anything."""
        n = self._n = self._n + 1
        if n >= self._next:
            self._dispatch(n, inputs, outputs)

    def _dispatch(self, n: int, inputs: Mapping[str, np.ndarray],
                  outputs: Mapping[str, np.ndarray]) -> None:
        copied: Request | None = None
        for index, (task, rate) in enumerate(self.watchers):
            if n < self._due[index]:
                continue
            self._due[index] = due_after(n, rate, self._random.random())
            if copied is None:
                copied = ({k: np.array(v) for k, v in inputs.items()},
                          {k: np.array(v) for k, v in outputs.items()})
            held = self._held[index]
            held.append(copied)
            if len(held) >= task.batch:
                self._held[index] = []
                self.runner.submit(task, held)
        self._next = min(self._due)

    def flush(self) -> None:
        """Hand over the requests held for every watcher (a request racing with this may
        land in the next batch)."""
        for index, (task, _) in enumerate(self.watchers):
            held, self._held[index] = self._held[index], []
            if held:
                self.runner.submit(task, held)

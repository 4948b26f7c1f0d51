"""A model session in a child process: where a shadow candidate and, for small models, the
kept previous version run their comparisons.

A shadow candidate run on the side thread of the agent's own process competes with the
requests for the GIL: every one of its runs releases and takes the GIL back, and each
take-back may force a switch away from a request thread. For a model that answers in tens
of microseconds that was a third more on the served model's p99 at 10% sampling
(docs/benchmarks.md, shadow). A :class:`ProcessSession` opens the model in a child process
instead (its own interpreter and GIL) and runs a whole batch of sampled requests per round
trip (:meth:`ProcessSession.run_many`): the side thread pickles the batch, waits on the
pipe without the GIL, and unpickles the answers, once per batch. The child runs at a lower
priority (:data:`SIDE_NICE`): when the CPU is busy the served model goes first, the
candidate's runs wait and more sampled requests find the queue full (counted as dropped,
as before). A run's time is measured in the child: its CPU time when it computes on one
CPU thread (so the waits for a core that the lower priority adds are not counted against
the candidate), else the wall clock.

The child is spawned, not forked (the agent has threads, onnxruntime has a pool). It ends
when the parent closes its end of the pipe (:meth:`ProcessSession.close`, or the session
garbage-collected, or the agent gone) or is killed after :data:`ANSWER_TIMEOUT_S` without
an answer. Once the child is gone every run fails with :class:`ModelLoadError`: for a
comparison those are counted errors of the candidate, never a request's. The kept previous
version stays loaded in the agent too (:class:`MovingSession`): its runs fall back there.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from firmware_profiles.model import Accelerator

from .errors import ModelLoadError
from .sessions import Session, TensorInfo, open_session

__all__ = ["ANSWER_TIMEOUT_S", "MOVE_BELOW_BYTES", "SIDE_NICE", "MovingSession", "ProcessSession",
           "RunResult", "run_many", "worth_moving"]

log = logging.getLogger(__name__)

#: The child's niceness: on a busy device the candidate yields the CPU to the served model.
SIDE_NICE = 10

#: How long the parent waits for the child to open the model, or to answer one batch.
ANSWER_TIMEOUT_S = 60.0

#: Model files below this size are compared in a child process when already loaded here
#: (:class:`MovingSession`): a second copy costs little, and their own run time is too short
#: to hide the side work's effect on the requests.
MOVE_BELOW_BYTES = 16 << 20

#: One request's result: its outputs (None if it failed), why it failed, run time in ms.
RunResult = tuple[list[np.ndarray] | None, str | None, float]


def run_many(session: Session, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[RunResult]:
    """Run ``session`` on each of ``feeds``, timing each run: in one round trip for a
    :class:`ProcessSession`, one by one otherwise. A failed run gives its reason, never
    raises."""
    many = getattr(session, "run_many", None)
    if many is not None:
        results: list[RunResult] = many(feeds)
        return results
    return [_timed(session, one) for one in feeds]


def _timed(session: Session, feeds: Mapping[str, np.ndarray],
           clock: Callable[[], float] = time.perf_counter) -> RunResult:
    start = clock()
    try:
        outputs = session.run(feeds)
    except Exception as exc:  # the model's failure, reported with the request
        return None, str(exc) or type(exc).__name__, (clock() - start) * 1e3
    return list(outputs), None, (clock() - start) * 1e3


class ProcessSession:
    """A :class:`~agent.sessions.Session` opened in a child process. Thread-safe (one
    round trip at a time)."""

    def __init__(self, path: Path, fmt: str, accelerators: Sequence[Accelerator] = (),
                 threads: int = 0, *, timeout: float = ANSWER_TIMEOUT_S) -> None:
        self._timeout = timeout
        self._ended = False
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_child, args=(child_end, str(path), fmt, tuple(accelerators), threads),
            name=f"edgefleet-side-{path.name}", daemon=True)
        self._process.start()
        child_end.close()
        _lower_priority(self._process.pid)
        self._lock = threading.Lock()
        # The child ends with the last reference to this session, as an in-process session's
        # memory would be freed.
        self._finalizer = weakref.finalize(self, _stop, self._conn, self._process)
        ready = self._answer(f"{path.name}: the side process did not open the model")
        if ready[0] != "ready":
            self.close()
            raise ModelLoadError(ready[1])
        _, inputs, outputs, self.backend, self.fallback, self.device = ready
        self.inputs: tuple[TensorInfo, ...] = inputs
        self.outputs: tuple[TensorInfo, ...] = outputs

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """Whether the child process is running."""
        # Its pipe breaking is the sure sign: is_alive() says True for ever once another
        # wait in this process has reaped the child.
        return not self._ended and self._process.is_alive()

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One request (raises ModelLoadError with the child's reason when it fails)."""
        outputs, error, _ = self.run_many([feeds])[0]
        if outputs is None:
            raise ModelLoadError(error or "the side process gave no answer")
        return outputs

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[RunResult]:
        """Run every request of ``feeds`` in the child, in one round trip."""
        with self._lock:
            if not self.alive:
                return [(None, "the side process has ended", 0.0)] * len(feeds)
            try:
                self._conn.send([dict(one) for one in feeds])
                answer = self._answer(f"{self._process.name} gave no answer")
            except (OSError, EOFError, ValueError) as exc:
                self._ended = True
                answer = ("error", f"{self._process.name} failed ({exc})")
        if answer[0] != "ran":
            return [(None, str(answer[1]), 0.0)] * len(feeds)
        results: list[RunResult] = answer[1]
        return results

    def close(self) -> None:
        """End the child process."""
        self._finalizer()

    def _answer(self, silence: str) -> tuple[Any, ...]:
        """The child's next message; on silence past the timeout the child is killed."""
        try:
            if self._conn.poll(self._timeout):
                message: tuple[Any, ...] = self._conn.recv()
                return message
        except (OSError, EOFError) as exc:
            self._ended = True
            return ("error", f"{silence}: it ended ({exc})")
        self._ended = True
        self._process.kill()
        return ("error", f"{silence} within {self._timeout:g} s; it was stopped")


def _lower_priority(pid: int | None) -> None:
    """Give the child :data:`SIDE_NICE` more than this process from its start: the
    interpreter's and onnxruntime's imports (about a second of CPU) must not compete with
    the requests either, and an install's probation may be judging their latency then."""
    if pid is None:
        return
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(19, own + SIDE_NICE))
    except OSError as exc:  # it ended already, or a sandbox forbids it: it runs anyway
        log.debug("could not lower the priority of process %d: %s", pid, exc)


def _stop(conn: Connection, process: multiprocessing.process.BaseProcess) -> None:
    conn.close()  # the child's recv sees EOF and returns
    process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(1.0)


def _child(conn: Connection, path: str, fmt: str, accelerators: tuple[Accelerator, ...],
           threads: int) -> None:
    """The child's loop: open the model, then answer batches until the pipe closes."""
    try:
        session = open_session(Path(path), fmt, accelerators, threads)
    except Exception as exc:  # told to the parent, which raises it as a load failure
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", session.inputs, session.outputs, session.backend, session.fallback,
               session.device))
    # One thread on the CPU computes on this thread: its CPU time is the run's time without
    # the waits for a core that the lower priority adds on a busy device (which would read
    # as a slower candidate to the p99_ratio gate). Elsewhere the wall clock.
    clock = time.thread_time if session.device == "cpu" and threads == 1 else time.perf_counter
    while True:
        try:
            feeds = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(("ran", [_timed(session, one, clock) for one in feeds]))


def worth_moving(path: Path) -> bool:
    """Whether comparisons of the model file ``path`` should move to a side process."""
    try:
        return path.stat().st_size < MOVE_BELOW_BYTES
    except OSError:
        return False


class MovingSession:
    """A session loaded here whose side runs move to a child process once it is ready.

    The kept previous version must stay loaded in this process (a switch back serves it at
    once), but running its comparisons here slows a tiny served model's requests, which the
    ``p99_ratio`` gate then blames on the candidate (docs/rollouts.md). This runs them here
    only until a :class:`ProcessSession` of the same file has opened, in the background so
    that nothing waits for the spawn, after ``delay_s`` (the runtime gives its probation
    window: the install that just kept this version is judged on its p99 meanwhile, and a
    spawn costs about a second of CPU); if the child cannot open or dies, they stay here.
    """

    def __init__(self, local: Session, path: Path, fmt: str, *, delay_s: float = 0.0) -> None:
        self.local = local
        self.inputs, self.outputs = local.inputs, local.outputs
        self.backend, self.fallback, self.device = local.backend, local.fallback, local.device
        self._remote: ProcessSession | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._open, args=(path, fmt, delay_s),
                         name="edgefleet-side-open", daemon=True).start()

    def _open(self, path: Path, fmt: str, delay_s: float) -> None:
        if self._closed.wait(delay_s):
            return
        try:
            remote = ProcessSession(path, fmt, threads=1)
        except Exception as exc:  # comparisons go on here, as before
            log.warning("%s: comparisons stay in the agent's process (%s)", path.name, exc)
            return
        with self._lock:
            keep = not self._closed.is_set()
            if keep:
                self._remote = remote
        if not keep:
            remote.close()

    @property
    def moved(self) -> bool:
        """Whether runs go to the child process now."""
        return self._remote is not None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One request, in this process (the served copy)."""
        return self.local.run(feeds)

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[RunResult]:
        """Run ``feeds`` in the child when it is ready and alive, else here."""
        remote = self._remote
        if remote is not None and remote.alive:
            results = remote.run_many(feeds)
            if remote.alive:
                return results
            # It died before or while answering: this batch runs here, and so do the next
            # (a dead child's runs are not the model's errors, and must not read as such).
            with self._lock:
                if self._remote is remote:
                    self._remote = None
            remote.close()
        return [_timed(self.local, one) for one in feeds]

    def close(self) -> None:
        """End the child process, if any (runs go on here)."""
        with self._lock:
            self._closed.set()
            remote, self._remote = self._remote, None
        if remote is not None:
            remote.close()

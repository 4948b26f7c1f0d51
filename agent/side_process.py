"""A model session in a child process: where a shadow candidate runs.

A shadow candidate run on the side thread of the agent's own process competes with the
requests for the GIL: every one of its runs releases and takes the GIL back, and each
take-back may force a switch away from a request thread. For a model that answers in tens
of microseconds that was a third more on the served model's p99 at 10% sampling
(docs/benchmarks.md, shadow). A :class:`ProcessSession` opens the model in a child process
instead (its own interpreter and GIL) and runs a whole batch of sampled requests per round
trip (:meth:`ProcessSession.run_many`): the side thread pickles the batch, waits on the
pipe without the GIL, and unpickles the answers, once per batch. The child runs at a lower
priority (:data:`SIDE_NICE`): when the CPU is busy the served model goes first, the
candidate's runs wait (so its measured latency includes that wait) and more sampled
requests find the queue full (counted as dropped, as before).

The child is spawned, not forked (the agent has threads, onnxruntime has a pool). It ends
when the parent closes its end of the pipe (:meth:`ProcessSession.close`, or the session
garbage-collected, or the agent gone) or is killed after :data:`ANSWER_TIMEOUT_S` without an
answer. Once the child is gone every run fails with :class:`ModelLoadError`: for a
comparison those are counted errors of the candidate, never a request's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from firmware_profiles.model import Accelerator

from .errors import ModelLoadError
from .sessions import Session, TensorInfo, open_session

__all__ = ["ANSWER_TIMEOUT_S", "SIDE_NICE", "ProcessSession", "RunResult", "run_many"]

log = logging.getLogger(__name__)

#: The child's niceness: on a busy device the candidate yields the CPU to the served model.
SIDE_NICE = 10

#: How long the parent waits for the child to open the model, or to answer one batch.
ANSWER_TIMEOUT_S = 60.0

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


def _timed(session: Session, feeds: Mapping[str, np.ndarray]) -> RunResult:
    start = time.perf_counter()
    try:
        outputs = session.run(feeds)
    except Exception as exc:  # the model's failure, reported with the request
        return None, str(exc) or type(exc).__name__, (time.perf_counter() - start) * 1e3
    return list(outputs), None, (time.perf_counter() - start) * 1e3


class ProcessSession:
    """A :class:`~agent.sessions.Session` opened in a child process. Thread-safe (one
    round trip at a time)."""

    def __init__(self, path: Path, fmt: str, accelerators: Sequence[Accelerator] = (),
                 threads: int = 0, *, timeout: float = ANSWER_TIMEOUT_S) -> None:
        self._timeout = timeout
        context = multiprocessing.get_context("spawn")
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_child, args=(child_end, str(path), fmt, tuple(accelerators), threads),
            name=f"edgefleet-side-{path.name}", daemon=True)
        self._process.start()
        child_end.close()
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

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One request (raises ModelLoadError with the child's reason when it fails)."""
        outputs, error, _ = self.run_many([feeds])[0]
        if outputs is None:
            raise ModelLoadError(error or "the side process gave no answer")
        return outputs

    def run_many(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[RunResult]:
        """Run every request of ``feeds`` in the child, in one round trip."""
        with self._lock:
            if not self._process.is_alive():
                return [(None, "the side process has ended", 0.0)] * len(feeds)
            try:
                self._conn.send([dict(one) for one in feeds])
                answer = self._answer(f"{self._process.name} gave no answer")
            except (OSError, EOFError, ValueError) as exc:
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
            return ("error", f"{silence}: it ended ({exc})")
        self._process.kill()
        return ("error", f"{silence} within {self._timeout:g} s; it was stopped")


def _stop(conn: Connection, process: multiprocessing.process.BaseProcess) -> None:
    conn.close()  # the child's recv sees EOF and returns
    process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(1.0)


def _child(conn: Connection, path: str, fmt: str, accelerators: tuple[Accelerator, ...],
           threads: int) -> None:
    """The child's loop: open the model, then answer batches until the pipe closes."""
    os.nice(SIDE_NICE)
    try:
        session = open_session(Path(path), fmt, accelerators, threads)
    except Exception as exc:  # told to the parent, which raises it as a load failure
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", session.inputs, session.outputs, session.backend, session.fallback,
               session.device))
    while True:
        try:
            feeds = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(("ran", [_timed(session, one) for one in feeds]))

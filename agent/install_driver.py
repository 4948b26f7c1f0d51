"""The adapter that performs the install state machine's actions.

:func:`agent.install_state.step` decides; :class:`InstallDriver` does: it persists each
record the step returns (before anything else), hands new states to the installer's
listeners, performs the actions (disk work through :class:`~agent.installer.Installer`,
loading and swapping through the runtime's :class:`ServingTable`) and feeds what came of
them back as the next event. Every exception an action raises becomes a ``failed`` event
with a reason (or a roll-back in probation), so nothing a bundle does can stop the agent or
leave an install looping.

All of it runs on one low-priority worker thread, one install step at a time, so installs
need no lock; the only thing shared with the request threads is the runtime's name -> model
table, changed by single assignments. Inference therefore never waits for an install. The
worker is a daemon thread: stopping the agent never waits for an install, which resumes at
the next start from its persisted record.

Fleet installs start in ``downloading`` before a byte is fetched: the record names the
desired bundle (``fleet:<sha256>``), the FETCH action hands it to the registered
:class:`Fetcher` (the fleet link), which calls :meth:`InstallDriver.fetched` or
:meth:`InstallDriver.fail` when it is done. After a restart such a record waits until a
fetcher is registered, then resumes from its partial file.

Why one module of about 560 lines: it is the one adapter of the install machine, and every
method either performs one action or feeds its outcome back on the one worker thread that
lets installs go without locks; the parts that stand alone are already apart (the
decisions in :mod:`agent.install_state` and :mod:`agent.probation`, the disk work in
:mod:`agent.installer`), and splitting the actions from the loop would share its private
state (probations, stand-by models) across modules.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from bundle.errors import BundleError

from .errors import AgentError, InstallError, ModelLoadError
from .install_state import (
    Action,
    InstallEvent,
    InstallRecord,
    InstallState,
    InvalidTransition,
    Trigger,
    step,
)
from .installer import FLEET_SOURCE, Installer, is_disk_full
from .model_store import StoredModel
from .probation import ProbationPolicy, judge

__all__ = ["Fetcher", "InstallDriver", "ServingTable"]

log = logging.getLogger(__name__)
_INSTALL_NICE = 10
# A p99 from fewer samples than this is noise, not a baseline.
_BASELINE_SAMPLES = 200
_T = TypeVar("_T")
S, T, A = InstallState, Trigger, Action


class ServedLike(Protocol):
    """What the driver needs of a loaded model."""

    version: int | None

    @property
    def figures(self) -> dict[str, float | int | None]: ...


class ServingTable(Protocol):
    """The runtime's side: which model serves under a name, and loading one."""

    def serving(self, name: str) -> ServedLike | None:
        """The model serving under ``name``, or None."""
        ...

    def swap(self, name: str, model: ServedLike | None) -> None:
        """Serve ``model`` under ``name`` from now on (None: stop serving the name)."""
        ...

    def load(self, stored: StoredModel, *, candidate: bool = False) -> ServedLike:
        """Load, self-test and warm up a stored model; raises ModelLoadError/InstallError.
        A ``candidate`` never serves (a shadow): it may be given fewer resources."""
        ...


class Fetcher(Protocol):
    """Brings a fleet bundle into the state dir (the fleet link)."""

    def start_fetch(self, record: InstallRecord) -> None:
        """Start fetching ``record``'s bundle into ``installer.partial_path(record)``; call
        :meth:`InstallDriver.fetched` or :meth:`InstallDriver.fail` later. Must not block."""
        ...


@dataclass
class _Probation:
    record: InstallRecord
    started: float
    baseline_p99_ms: float | None
    previous: ServedLike | None


class InstallDriver:
    """Runs installs against ``installer`` (disk) and ``table`` (the serving models)."""

    def __init__(self, installer: Installer, table: ServingTable, policy: ProbationPolicy,
                 monotonic: Callable[[], float] = time.monotonic, *,
                 after_crash: bool = True) -> None:
        self.installer = installer
        #: Whether the previous run crashed: only then do resumed installs count a restart.
        self.after_crash = after_crash
        self.table = table
        self.policy = policy
        self.monotonic = monotonic
        self.fetcher: Fetcher | None = None
        self._probations: dict[str, _Probation] = {}
        self._standby: dict[str, ServedLike | None] = {}  # previous model, activate -> watch
        # Models swapped in whose probation is not registered yet (activate -> watch): they
        # serve on trial already, and must be reported so.
        self._swapping: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue())
        self._worker = threading.Thread(target=self._work, name="edgefleet-install",
                                        daemon=True)
        self._worker.start()

    # -- the API (any thread) ----------------------------------------------------------------

    def install(self, bundle: Path) -> InstallRecord:
        """Install the bundle file ``bundle``; returns once it serves in probation or failed."""
        return self._call(lambda: self._start(self.installer.begin(str(bundle.absolute()))))

    def fetch(self, model: str, version: int, bundle_sha256: str, size: int, *,
              release_sha256: str | None = None) -> InstallRecord | None:
        """Start (or resume) installing the fleet bundle ``bundle_sha256`` of ``model``:
        the record enters ``downloading`` and the fetcher is asked for the bytes. None if
        that bundle was given up meanwhile. ``release_sha256``: the full bundle, when
        ``bundle_sha256`` is a delta bundle of it."""
        return self._call(lambda: self._fetch(model, version, bundle_sha256, size,
                                              release_sha256))

    def fetched(self, install_id: str) -> Future[object]:
        """The fetcher has the whole bundle of ``install_id``: verify and install it."""
        return self._submit(lambda: self._feed(install_id, InstallEvent(T.FETCHED)))

    def fail(self, install_id: str, reason: str, detail: str, *,
             retry: bool = False) -> Future[object]:
        """The fetcher could not get the bundle of ``install_id``."""
        return self._submit(lambda: self._feed(install_id, InstallEvent(
            T.FAILED, reason=reason, detail=detail, retry=retry)))

    def resume(self) -> Future[object]:
        """Hand unreported states to the listeners, then resume every unfinished install
        (oldest first). Call once the listeners are attached and the models are served."""
        return self._submit(self._resume_all)

    def check_probation(self) -> list[InstallRecord]:
        """Judge every model in probation; returns the installs this call concluded."""
        return self._call(self._check_all)

    def stage_candidate(self, record: InstallRecord) -> Future[ServedLike]:
        """Verify the bundle of ``record`` (fetched to its bundle path), stage its slot and
        load, self-test and warm it up without serving it: a shadow candidate. ``record``
        is not persisted and its transitions are not announced (a candidate never serves,
        so there is nothing to activate, watch, commit or roll back), and the trusted
        version floor stays where it is. The future raises InstallError (a rejected
        bundle, a failed self-test) or ModelLoadError."""
        def stage() -> ServedLike:
            try:
                stored = self.installer.verify_and_stage(record, raise_floor=False)
            finally:
                self.installer.drop_bundle(record)
            return self.table.load(stored, candidate=True)
        return self._submit(stage)

    def switch_back(self, name: str, version: int) -> bool:
        """Roll back the install of ``name`` in probation if the model it replaced, still
        loaded, is ``version`` (the desired state names it again): one swap, no load.
        False when no probation of ``name`` has that previous version."""
        return self._call(lambda: self._switch_back(name, version))

    def previous_version(self, name: str) -> int | None:
        """The version ``name``'s install in probation replaced, if it is loaded."""
        probation = self._probations.get(name)
        previous = None if probation is None else probation.previous
        return None if previous is None else previous.version

    def in_probation(self, name: str) -> bool:
        """Whether ``name`` serves a model still in probation."""
        return name in self._probations or name in self._swapping

    def close(self) -> None:
        """Stop the worker after the step under way (never waits for a whole install)."""
        self._queue.put(None)

    # -- the worker ------------------------------------------------------------------------

    def _submit(self, work: Callable[[], _T]) -> Future[_T]:
        future: Future[_T] = Future()
        self._queue.put((work, future))  # type: ignore[arg-type]
        return future

    def _call(self, work: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._worker:
            return work()
        return self._submit(work).result()

    def _work(self) -> None:
        _lower_thread_priority()
        while (item := self._queue.get()) is not None:
            work, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the caller, never kills the worker
                future.set_exception(exc)

    # -- running the machine ---------------------------------------------------------------

    def _start(self, record: InstallRecord) -> InstallRecord:
        return self._run(record, InstallEvent(T.START))

    def _fetch(self, model: str, version: int, sha256: str, size: int,
               release_sha256: str | None) -> InstallRecord | None:
        source = FLEET_SOURCE + sha256
        if self.installer.given_up().get(model) == sha256:
            return None  # it failed after the fetcher asked (a failure still queued then)
        for pending in self.installer.pending():
            if pending.source == source and pending.state is S.DOWNLOADING:
                return self._perform_all(pending, (A.FETCH,))
            if (pending.model == model and pending.state in (S.IDLE, S.DOWNLOADING)
                    and pending.source != source):
                self._run(pending, InstallEvent(
                    T.FAILED, reason="superseded", retry=True,
                    detail=f"the desired state now names {model} v{version}"))
        record = self.installer.begin(source, model=model, version=version,
                                      bundle_sha256=sha256, size=size,
                                      release_sha256=release_sha256)
        return self._start(record)

    def _feed(self, install_id: str, event: InstallEvent) -> InstallRecord | None:
        record = next((r for r in self.installer.pending() if r.install_id == install_id),
                      None)
        if record is None:
            log.warning("install %s is not under way; ignoring %s", install_id,
                        event.trigger.value)
            return None
        return self._run(record, event)

    def _resume_all(self) -> None:
        for record in self.installer.records()[::-1]:
            self.installer.announce(record)
        for record in self.installer.pending():
            # A version on probation is served and only being watched, as after any
            # install; an install stopped half-way is worth a warning.
            level = logging.INFO if record.state is InstallState.PROBATION else logging.WARNING
            log.log(level, "resuming install %s (%s) in %s", record.install_id,
                    record.source, record.state.value)
            self._run(record, InstallEvent(T.RESTARTED if self.after_crash else T.RESUMED))

    def _run(self, record: InstallRecord, event: InstallEvent) -> InstallRecord:
        """Step ``record`` with ``event`` and every event its actions produce, until an
        action waits for the outside world (a fetch, probation) or the install ends."""
        next_event: InstallEvent | None = event
        while next_event is not None:
            try:
                stepped, actions = step(record, next_event, self.installer.clock())
            except InvalidTransition as exc:
                log.error("%s", exc)  # a late event for an install that moved on
                return record
            try:
                record = self._persist(record, stepped)
            except OSError as exc:
                if stepped.done or not is_disk_full(exc):
                    raise
                # The next state cannot be recorded (say, a resume on a full disk): the
                # install fails for want of space, which _persist makes room to record.
                next_event = _failure(exc)
                continue
            next_event = None
            for action in actions:
                try:
                    next_event = self._perform(action, record)
                except Exception as exc:
                    if record.done:  # cleaning up after an ending: log, never loop
                        log.error("install %s: %s after %s failed: %s", record.install_id,
                                  action.value, record.state.value, exc)
                        continue
                    next_event = _failure(exc)
                    log.debug("install %s: %s failed", record.install_id, action.value,
                              exc_info=True)
                if next_event is not None:
                    break
        return record

    def _perform_all(self, record: InstallRecord, actions: tuple[Action, ...]) -> InstallRecord:
        for action in actions:
            try:
                event = self._perform(action, record)
            except Exception as exc:
                event = _failure(exc)
            if event is not None:
                return self._run(record, event)
        return record

    def _persist(self, before: InstallRecord, record: InstallRecord) -> InstallRecord:
        """Save ``record`` before any of its actions; on a full disk a failure frees the
        install's files first, so the record that says so can be written."""
        try:
            self.installer.save(record)
        except OSError as exc:
            if not (record.done and is_disk_full(exc)):
                raise
            self.installer.discard(record)
            try:
                self.installer.save(record)
            except OSError:
                log.error("install %s %s (%s) but the disk is too full to record it",
                          record.install_id, record.state.value, record.detail)
        if record.state is not before.state:
            if record.state in (S.FAILED, S.ROLLED_BACK):
                log.warning("install %s of %s: %s (%s)", record.install_id, record.source,
                            record.state.value, record.detail or record.reason)
            else:
                log.info("install %s: %s", record.install_id, record.state.value)
            record = self.installer.announce(record)
        return record

    # -- the actions -----------------------------------------------------------------------

    def _perform(self, action: Action, record: InstallRecord) -> InstallEvent | None:
        handlers: dict[Action, Callable[[InstallRecord], InstallEvent | None]] = {
            A.FETCH: self._fetch_bundle, A.VERIFY: self._verify, A.PREPARE: self._prepare,
            A.ACTIVATE: self._activate, A.WATCH: self._watch, A.COMMIT: self._commit,
            A.RESTORE_PREVIOUS: self._restore_previous, A.RECLAIM: self._reclaim}
        return handlers[action](record)

    def _verify(self, record: InstallRecord) -> InstallEvent:
        stored = self.installer.verify_and_stage(record)
        return InstallEvent(T.VERIFIED, model=stored.name, version=stored.version)

    def _commit(self, record: InstallRecord) -> None:
        assert record.model is not None
        self._probations.pop(record.model, None)
        self._standby.pop(record.model, None)
        self._sweep(record.model)
        self.installer.forget_old()

    def _reclaim(self, record: InstallRecord) -> None:
        self.installer.discard(record)

    def _fetch_bundle(self, record: InstallRecord) -> InstallEvent | None:
        if record.source.startswith(FLEET_SOURCE):
            if self.fetcher is None:
                log.info("install %s waits for the fleet link to fetch its bundle",
                         record.install_id)
                return None
            if record.size is not None and not self.installer.partial_path(record).exists():
                self.installer.check_space(record.size, f"bundle {record.source}")
            self.fetcher.start_fetch(record)
            return None
        return InstallEvent(T.FETCHED, bundle_sha256=self.installer.copy_in(record))

    def _prepare(self, record: InstallRecord) -> InstallEvent:
        name, version = record.model, record.version
        assert name is not None, "staged records know their model"
        assert version is not None, "staged records know their version"
        probation = self._probations.get(name)
        if probation is not None and probation.record.install_id != record.install_id:
            # The newest install wins: the one in probation is judged now on what it has
            # served (committed if healthy, so it becomes the rollback target; rolled back
            # if not), then the new one goes through its own probation.
            self._conclude(name, probation, superseded_by=version)
        pointer = self.installer.store.active(name)
        previous = None if pointer is None else (
            pointer.version if pointer.version != version else pointer.previous)
        return InstallEvent(T.PREPARED, previous_version=previous)

    def _activate(self, record: InstallRecord) -> InstallEvent:
        name, version = record.model, record.version
        assert name is not None
        assert version is not None
        store = self.installer.store
        self.installer.drop_bundle(record)  # left behind if the agent died right after staging
        current = self.table.serving(name)
        if current is not None and current.version == version:
            new = current  # restored at start-up: the pointer was flipped before the crash
            current = None
        else:
            try:
                new = self.table.load(store.slot(name, version))
            except (ModelLoadError, AgentError) as exc:
                if isinstance(exc, InstallError):
                    raise
                raise InstallError("load_failed", str(exc)) from exc
        store.set_active(name, version, record.previous_version)
        if current is None and record.previous_version is not None:
            current = self._load_previous(name, record.previous_version)
        self._standby[name] = current
        self._swapping.add(name)
        self.table.swap(name, new)  # the swap
        return InstallEvent(T.ACTIVATED)

    def _watch(self, record: InstallRecord) -> InstallEvent | None:
        name = record.model
        assert name is not None
        served = self.table.serving(name)
        if served is None or served.version != record.version:
            self._swapping.discard(name)
            return InstallEvent(T.FAILED, reason="probation_failed", detail=(
                "the new model could not be restored after a restart during probation"))
        if name in self._standby:
            previous = self._standby.pop(name)
        else:  # resumed after a restart
            previous = (None if record.previous_version is None
                        else self._load_previous(name, record.previous_version))
        baseline = None
        if previous is not None:
            figures = previous.figures
            samples = figures["samples"]
            if isinstance(samples, int) and samples >= _BASELINE_SAMPLES:
                baseline = figures["p99_ms"]
        self._probations[name] = _Probation(record, self.monotonic(),
                                            baseline if isinstance(baseline, float) else None,
                                            previous)
        self._swapping.discard(name)
        log.info("%s v%s serving in probation for %g s", name, record.version,
                 self.policy.window_s)
        return None

    def _restore_previous(self, record: InstallRecord) -> None:
        name = record.model
        if name is None or record.version is None:
            return
        probation = self._probations.pop(name, None)
        standby = self._standby.pop(name, None)
        self._swapping.discard(name)
        store = self.installer.store
        try:
            pointer = store.active(name)
        except AgentError:
            pointer = None
        serving = self.table.serving(name)
        flipped = pointer is not None and pointer.version == record.version
        swapped = serving is not None and serving.version == record.version
        if not (flipped or swapped):
            return  # it never served: nothing to undo
        previous = probation.previous if probation else standby
        if previous is None and record.previous_version is not None:
            previous = self._load_previous(name, record.previous_version)
        if previous is not None and previous.version is not None:
            store.set_active(name, previous.version, None)
            self.table.swap(name, previous)
        else:
            store.deactivate(name)
            self.table.swap(name, None)

    def _load_previous(self, name: str, version: int) -> ServedLike | None:
        try:
            return self.table.load(self.installer.store.slot(name, version))
        except (AgentError, BundleError) as exc:
            log.error("previous version %s v%d cannot be loaded (%s); going on without a "
                      "rollback target", name, version, exc)
            return None

    def _sweep(self, name: str) -> None:
        installing = {r.version for r in self.installer.pending()
                      if r.model == name and r.version is not None}
        self.installer.store.sweep(name, installing)

    def _switch_back(self, name: str, version: int) -> bool:
        probation = self._probations.get(name)
        if (probation is None or probation.previous is None
                or probation.previous.version != version):
            return False
        del self._probations[name]
        self._standby[name] = probation.previous
        # retry: the bundle did nothing wrong, so a desired state naming it again installs it.
        self._run(probation.record, InstallEvent(
            T.UNHEALTHY, reason="switched_back", retry=True,
            detail=f"the desired state names v{version} again; switched back to it (loaded)"))
        return True

    # -- probation -------------------------------------------------------------------------

    def _check_all(self) -> list[InstallRecord]:
        concluded = []
        for name, probation in list(self._probations.items()):
            record = self._conclude(name, probation)
            if record is not None:
                concluded.append(record)
        return concluded

    def _conclude(self, name: str, probation: _Probation,
                  superseded_by: int | None = None) -> InstallRecord | None:
        """Judge one probation; with ``superseded_by`` the window counts as over."""
        served = self.table.serving(name)
        figures = served.figures if served is not None else {}
        elapsed = self.monotonic() - probation.started
        verdict = judge(self.policy, elapsed,
                        requests=int(figures.get("requests") or 0),
                        errors=int(figures.get("errors") or 0),
                        p99_ms=_float(figures.get("p99_ms")),
                        baseline_p99_ms=probation.baseline_p99_ms,
                        latency_samples=int(figures.get("samples") or 0),
                        final=superseded_by is not None)
        if verdict.decision == "wait":
            return None
        reason = verdict.reason
        if superseded_by is not None:
            reason = f"superseded by v{superseded_by}: {reason}"
        # Out of probation before the verdict is recorded, so what the listeners see then
        # (the reported state) no longer says "probation"; the previous model stands by
        # for a roll-back.
        del self._probations[name]
        self._standby[name] = probation.previous
        if verdict.decision == "commit":
            return self._run(probation.record, InstallEvent(T.HEALTHY, detail=reason))
        return self._run(probation.record, InstallEvent(T.UNHEALTHY, reason="probation_failed",
                                                        detail=reason))


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _failure(exc: Exception) -> InstallEvent:
    """The ``failed`` event for an exception an action raised: a typed reason, whatever
    the exception (a reader bug in a bundle library included)."""
    if isinstance(exc, InstallError):
        reason, retry = exc.reason, exc.transient
    elif isinstance(exc, BundleError):
        reason, retry = f"rejected:{type(exc).__name__}", exc.transient
    elif is_disk_full(exc):
        reason, retry = "disk_full", True
    elif isinstance(exc, (OSError, AgentError)):
        reason, retry = "install_error", False
    else:
        log.error("install step raised %s", type(exc).__name__, exc_info=exc)
        reason, retry = "internal_error", False
    if reason == "disk_full" and not isinstance(exc, InstallError):
        detail = (f"disk full: {exc}; free some space under the agent's state directory "
                  "(the install is retried once there is room)")
    else:
        detail = str(exc) or type(exc).__name__
    return InstallEvent(T.FAILED, reason=reason, detail=detail, retry=retry)


def _lower_thread_priority() -> None:
    # Linux gives each thread its own nice value; elsewhere this is a no-op.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _INSTALL_NICE)
    except (OSError, AttributeError) as exc:
        log.debug("cannot lower the install thread's priority: %s", exc)


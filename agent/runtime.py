"""The in-process runtime: named models served concurrently, installs with hot-swap.

:class:`Runtime` is what the local HTTP API and ``edge-agent`` drive, and what an app on the
device may use directly::

    runtime = Runtime(state_dir=Path("/var/lib/edgefleet/agent"), profile=profile)
    runtime.install(Path("digits-v2.bundle"))
    outputs = runtime.infer("digits", {"input": x})

Hot-swap: the new model is loaded beside the serving one, warmed up and self-tested with the
bundle's golden samples; only then is the name pointed at it (one dict assignment, atomic
under the GIL). A request holds a reference to the model it started on, so in-flight
requests finish on the old session, which is released when the last of them returns. The
old model stays loaded through probation, so a rollback is as instant as the swap.

Watching the served models never slows a request: each served model carries a
:class:`~agent.side_runner.SideChannel` that hands a sampled share of its requests to one
side thread, where the monitor folds them into statistics (:mod:`agent.monitor`) and a
shadow candidate or the kept previous version runs them for comparison
(:mod:`agent.comparison`). With ``compare_previous`` set for a name (:meth:`keep_previous`)
the model an install replaces stays loaded after probation too (blue-green), so
:meth:`switch_back` to it is one swap.

Why one class of some 500 lines: the serving table, the kept previous versions and the
watchers of each name change together under one lock (a swap re-wires the comparisons,
a switch back swaps and keeps the other version), so they stay in one object; loading and
opening sessions are :mod:`agent.served_model`'s and :mod:`agent.sessions`'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bundle.manifest import Manifest
from firmware_profiles.model import Profile
from firmware_profiles.runtimes import import_litert, onnxruntime_installed

from .comparison import Comparison, compared_output
from .composite import CompositeSession
from .config import MonitorConfig
from .errors import AgentError, InstallError, ModelLoadError, ModelNotFoundError
from .install_driver import InstallDriver, ServedLike
from .install_state import InstallRecord
from .installer import Installer, StateDirs, Verifier
from .model_store import StoredModel
from .monitor import ModelMonitor, monitor_plan
from .probation import ProbationPolicy
from .served_model import (
    ModelInfo,
    RequestStats,
    ServedModel,
    StatTotals,
    request_bytes,
    self_test,
)
from .sessions import Session, open_session, warm_up
from .side_process import MovingSession, ProcessSession, worth_moving
from .side_runner import SideChannel, SideRunner, SideTask

# The served model's records are re-exported: they are the runtime's public vocabulary.
__all__ = ["ModelInfo", "RequestStats", "Runtime", "ServedModel", "StatTotals"]

log = logging.getLogger(__name__)
_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
_WARMUP_RUNS = 3


class Runtime:
    """Models served by name, offline; installs bundles when given a state directory.

    Without ``state_dir`` the runtime serves model files only (:meth:`load_file`). With it,
    the constructor serves what the store says is active (falling back to the previous
    version, or the newest intact one, when a slot or the pointer is damaged); installs
    that a crash interrupted resume only when :meth:`resume_installs` is called, so the
    caller can serve first and attach listeners (the fleet link) before they run.
    ``profile`` is this device's firmware profile (None: a generic CPU).
    """

    def __init__(self, state_dir: Path | None = None, profile: Profile | None = None, *,
                 policy: ProbationPolicy | None = None, threads: int = 0,
                 clock: Callable[[], float] = time.time,
                 verifier: Verifier | None = None,
                 monitoring: MonitorConfig | None = None) -> None:
        self.profile = profile
        self.policy = policy or ProbationPolicy()
        self.threads = threads
        self.monitoring = monitoring or MonitorConfig()
        #: The one thread that runs the watchers of every served model.
        self.side_runner = SideRunner(self.monitoring.queue)
        self._serving: dict[str, ServedModel] = {}
        # Per name: comparisons by role ("shadow", "previous") with their sampling rates,
        # the share of requests to compare with the replaced version, and that version.
        self._comparisons: dict[str, dict[str, tuple[Comparison, float]]] = {}
        self._keep_rates: dict[str, float] = {}
        self._kept: dict[str, ServedModel] = {}
        self._previous_comparison: dict[str, Comparison] = {}
        self._watch_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Problems found while restoring models at start-up, for status reports.
        self.problems: list[str] = []
        self.installer: Installer | None = None
        self.installs: InstallDriver | None = None
        if state_dir is not None:
            # Only the formats a runtime here can serve: an agent-litert install must not
            # pick a bundle's .onnx variant (agent-onnx likewise .tflite).
            formats = (({"onnx"} if onnxruntime_installed() else set())
                       | ({"tflite"} if import_litert() is not None else set()))
            self.installer = Installer(StateDirs(state_dir), profile, formats, clock,
                                       verifier=verifier)
            crashed = self.installer.begin_run()  # before loading: a model may crash it
            self._restore()
            self.installer.sweep()
            self.installs = InstallDriver(self.installer, self, self.policy,
                                          after_crash=crashed)

    # -- inference -----------------------------------------------------------------------

    def infer(self, name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run model ``name`` on ``inputs`` (input name -> array); outputs by name.

        Raises ModelNotFoundError, InvalidInputError (the request's fault) or AgentError
        (the model failed; counted against it during probation).
        """
        served = self._serving.get(name)
        if served is None:
            raise ModelNotFoundError(f"no model named {name!r} is served; loaded: "
                                     f"{', '.join(sorted(self._serving)) or 'none'}")
        return served.run(inputs)

    def model(self, name: str) -> ModelInfo:
        """Metadata of the served model ``name``."""
        served = self._serving.get(name)
        if served is None:
            raise ModelNotFoundError(f"no model named {name!r} is served")
        in_probation = self.installs is not None and self.installs.in_probation(name)
        return served.info("probation" if in_probation else "serving")

    def models(self) -> list[ModelInfo]:
        """Every served model."""
        return [self.model(name) for name in sorted(self._serving)]

    def served(self, name: str) -> ServedModel:
        """The live model object behind ``name`` (its stats, its session)."""
        served = self._serving.get(name)
        if served is None:
            raise ModelNotFoundError(f"no model named {name!r} is served")
        return served

    # -- the serving table (the install driver's port) -------------------------------------

    def serving(self, name: str) -> ServedModel | None:
        """The model serving under ``name``, or None."""
        return self._serving.get(name)

    def swap(self, name: str, model: ServedLike | None) -> None:
        """Serve ``model`` under ``name`` from now on: one dict assignment, so a request
        either gets the old model or the new one, and finishes on the one it got.

        With :meth:`keep_previous` set for ``name``, the model replaced stays loaded and is
        compared with the new one on that share of requests."""
        with self._watch_lock:
            old = self._serving.get(name)
            if model is None:
                self._serving.pop(name, None)
            else:
                assert isinstance(model, ServedModel)
                self._watch(model)
                self._serving[name] = model
            if (old is not None and model is not None and old is not model
                    and old.version != model.version and self._keep_rates.get(name, 0.0) > 0):
                self._kept[name] = old
            if self._kept.get(name) is model:
                self._kept.pop(name)  # switched back to it: it serves, nothing to compare
            self._rewire(name)

    # -- watching: monitor, shadow, previous version ------------------------------------------

    def keep_previous(self, name: str, rate: float) -> None:
        """Keep the version the next install of ``name`` replaces loaded and run it on
        ``rate`` of the requests, compared (0: release it; the desired state's
        ``compare_previous``)."""
        with self._watch_lock:
            self._keep_rates[name] = rate
            if rate <= 0:
                self._kept.pop(name, None)
            self._rewire(name)

    def previous_version(self, name: str) -> int | None:
        """A version of ``name`` loaded beside the served one that :meth:`switch_back` can
        serve at once: the one kept by :meth:`keep_previous`, or the one an install in
        probation replaced. None if there is none."""
        kept = self._kept.get(name)
        if kept is not None:
            return kept.version
        return None if self.installs is None else self.installs.previous_version(name)

    def keep_rate(self, name: str) -> float:
        """The share of ``name``'s requests run on the previous version (:meth:`keep_previous`)."""
        return self._keep_rates.get(name, 0.0)

    def shadow_of(self, name: str) -> tuple[ServedModel, float] | None:
        """The shadow candidate running beside ``name`` and its sampling rate, or None."""
        with self._watch_lock:
            entry = self._comparisons.get(name, {}).get("shadow")
        if entry is None:
            return None
        model = entry[0].model
        assert isinstance(model, ServedModel)
        return model, entry[1]

    def switch_back(self, name: str, version: int) -> bool:
        """Serve ``version`` of ``name`` again if it is still loaded: the previous model of
        an install in probation, or the one kept by :meth:`keep_previous`. One swap, no
        fetch and no load; False when that version is not loaded."""
        with self._watch_lock:
            kept, current = self._kept.get(name), self._serving.get(name)
            kept_here = kept is not None and kept.version == version and current is not None
        if not kept_here:
            # Maybe the previous model of an install still in probation (the install
            # worker swaps it in, taking the lock: so not held here).
            return self.installs is not None and self.installs.switch_back(name, version)
        with self._watch_lock:
            kept, current = self._kept.get(name), self._serving.get(name)
            if kept is None or kept.version != version or current is None:
                return False  # changed meanwhile
            self.swap(name, kept)
            if self._keep_rates.get(name, 0.0) > 0:
                self._kept[name] = current
                self._rewire(name)
        # The pointer follows the swap rather than leading it: both versions were committed,
        # and an fsync behind other disk writes can take tens of milliseconds, which the
        # switch back must not wait for. A crash in between serves the newer one at the
        # next start, until the desired state installs this one again.
        if self.installer is not None:
            self.installer.store.set_active(name, version, current.version)
        log.info("%s: switched back to v%d (kept loaded)", name, version)
        return True

    def attach(self, name: str, role: str, model: ServedModel, rate: float) -> None:
        """Run ``model`` beside ``name``'s served model on ``rate`` of its requests and
        compare the answers (``role`` "shadow": a candidate that never serves)."""
        with self._watch_lock:
            self._comparisons.setdefault(name, {})[role] = (
                self._comparison(name, role, model), rate)
            self._rewire(name)

    def detach(self, name: str, role: str) -> ServedModel | None:
        """Stop running the ``role`` model beside ``name``; returns it (None if none)."""
        with self._watch_lock:
            entry = self._comparisons.get(name, {}).pop(role, None)
            self._rewire(name)
        if entry is None:
            return None
        model = entry[0].model
        assert isinstance(model, ServedModel)
        return model

    def flush_watchers(self, name: str, timeout: float = 1.0) -> None:
        """Hand over the requests held for ``name``'s watchers and wait (up to ``timeout``)
        until the side thread has handled them, so a report counts them."""
        served = self._serving.get(name)
        side = None if served is None else served.side
        if side is not None:
            side.flush()
            self.side_runner.wait_idle(timeout)

    def comparisons(self, name: str) -> dict[str, Comparison]:
        """The comparisons running beside ``name`` by role (``shadow``, ``previous``)."""
        with self._watch_lock:
            found = {role: c for role, (c, _) in self._comparisons.get(name, {}).items()}
            previous = self._previous_comparison.get(name)
        if previous is not None:
            found["previous"] = previous
        return found

    def _comparison(self, name: str, role: str, model: ServedModel) -> Comparison:
        served = self._serving.get(name)
        plan = (served or model).plan
        output, position, metric = compared_output([(o.name, o.kind) for o in plan.outputs])
        names = model.output_names
        # The candidate's output of that name, else the one in the same place.
        if output in names:
            position = names.index(output)
        stored = model.stored  # the kept previous version of a small model: runs move out
        session = (MovingSession(model.session, stored.path, stored.format,
                                 delay_s=self.policy.window_s)
                   if role == "previous" and stored is not None and worth_moving(stored.path)
                   else None)
        return Comparison(role, model, output, position, metric,
                          request_bytes=request_bytes(model.session), session=session)

    def _watch(self, model: ServedModel) -> None:
        if model.monitor is None and self.monitoring.sample_rate > 0:
            model.monitor = ModelMonitor(model.plan, model.version,
                                         request_bytes(model.session))

    def _rewire(self, name: str) -> None:
        """Give ``name``'s served model the side channel of its current watchers."""
        served = self._serving.get(name)
        if served is None:
            return
        watchers: list[tuple[SideTask, float]] = []
        if served.monitor is not None:
            watchers.append((served.monitor, self.monitoring.sample_rate))
        watchers += [(c, rate) for c, rate in self._comparisons.get(name, {}).values()]
        kept, rate = self._kept.get(name), self._keep_rates.get(name, 0.0)
        previous = self._previous_comparison.get(name)
        if kept is not None and rate > 0:
            if previous is None or previous.model is not kept:
                previous = self._comparison(name, "previous", kept)
                self._previous_comparison[name] = previous
            watchers.append((previous, rate))
        else:
            self._previous_comparison.pop(name, None)
        served.side = SideChannel(self.side_runner, watchers) if watchers else None

    def load(self, stored: StoredModel, *, candidate: bool = False) -> ServedModel:
        """Load, self-test and warm up a stored model (checking its file's hash first).

        A ``candidate`` (a shadow, which only ever runs beside the served model) gets one
        intra-op thread, so it takes at most one core from the model that serves, and runs
        in a child process (:mod:`agent.side_process`), off this process's GIL."""
        if not stored.intact():
            raise ModelLoadError(f"{stored.path} no longer matches its sha256 {stored.sha256[:16]}"
                                 "; the file was damaged on disk")
        threads = 1 if candidate else self.threads
        if stored.members:  # a composite candidate runs in the agent: its members share it
            session = self._open_composite(stored, threads)
        else:
            session = self._open(stored.path, stored.format, stored.manifest, threads=threads,
                                 side_process=candidate)
        return ServedModel(stored.name, stored.version, session,
                           f"{stored.name} v{stored.version} ({stored.dtype} {stored.format})",
                           stored)

    # -- loading -------------------------------------------------------------------------

    def load_file(self, path: Path, name: str | None = None,
                  baseline: Mapping[str, Any] | None = None) -> ModelInfo:
        """Serve the model file ``path`` (.onnx or .tflite) as ``name`` (default: its stem).

        Unsigned and not persisted: for offline use without a fleet. Replaces a model of the
        same name with the same hot-swap as an install. ``baseline`` is a drift baseline
        for the monitor (``edge-compress``'s report.json ``baseline``); without one only
        outputs are watched.
        """
        fmt = _FORMATS_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise ModelLoadError(f"{path}: cannot tell the format from the suffix; use .onnx "
                                 "or .tflite (or install a bundle)")
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        name = name or path.stem
        served = ServedModel(name, None, self._open(path, fmt, None), str(path))
        if baseline is not None:
            served.plan = monitor_plan(baseline, served.session.inputs, served.session.outputs)
        self.swap(name, served)
        return self.model(name)

    def _open(self, path: Path, fmt: str, manifest: Manifest | None, *,
              threads: int | None = None, side_process: bool = False) -> Session:
        """Open, self-test and warm up a model; raises ModelLoadError or InstallError."""
        accelerators = self.profile.accelerators if self.profile else ()
        opener = ProcessSession if side_process else open_session
        session = opener(path, fmt, accelerators, self.threads if threads is None else threads)
        return _prove(session, manifest)

    def _open_composite(self, stored: StoredModel, threads: int) -> Session:
        """Open every member of a composite slot as one session, self-tested and warmed up
        as a whole (the bundle's self-test is of what the composite answers)."""
        decl = stored.manifest.composite
        if decl is None:
            raise ModelLoadError(f"{stored.name} v{stored.version} has member files but its "
                                 "manifest declares no composite; reinstall its bundle")
        accelerators = self.profile.accelerators if self.profile else ()
        members = [open_session(m.path, m.format, accelerators, threads)
                   for m in stored.members]
        return _prove(CompositeSession(decl, members), stored.manifest)

    # -- installing ----------------------------------------------------------------------

    def install(self, bundle: Path) -> InstallRecord:
        """Install the bundle file at ``bundle`` and swap it in.

        Returns the record once the new model serves in probation, or failed (the serving
        model untouched; ``record.reason`` says why). Probation ends in :meth:`check_probation`.
        """
        return self._require_installs().install(bundle)

    def load_candidate(self, record: InstallRecord) -> Future[ServedLike]:
        """Verify, stage and load the bundle of ``record`` (in its bundle path) as a
        candidate that never serves, on the install worker (attach it with :meth:`attach`).
        """
        return self._require_installs().stage_candidate(record)

    def candidate_record(self, name: str | None, version: int | None, source: str,
                         bundle_sha256: str | None = None, size: int | None = None,
                         ) -> InstallRecord:
        """A record for a candidate bundle (never persisted): where to fetch it to."""
        installer = self._require_installer()
        record = installer.begin(source, model=name, version=version,
                                 bundle_sha256=bundle_sha256, size=size)
        return replace(record, install_id=f"candidate-{record.install_id}")

    def load_shadow(self, bundle: Path) -> ServedModel:
        """Verify, stage and load the bundle file ``bundle`` as a candidate that never
        serves; raises InstallError or ModelLoadError like an install would fail."""
        installer = self._require_installer()
        record = self.candidate_record(None, None, str(bundle.absolute()))
        record = replace(record, bundle_sha256=installer.copy_in(record))
        model = self.load_candidate(record).result()
        assert isinstance(model, ServedModel)
        return model

    def resume_installs(self, wait: bool = True) -> None:
        """Report installs' unreported states and resume those a stop interrupted, behind
        the models already serving (``wait=False``: in the background)."""
        future = self._require_installs().resume()
        if wait:
            future.result()

    def check_probation(self) -> list[InstallRecord]:
        """Judge every model in probation; returns the installs this call concluded."""
        return [] if self.installs is None else self.installs.check_probation()

    def _restore(self) -> None:
        """Serve what the store says is active; fall back past damaged slots or pointers."""
        installer = self._require_installer()
        store = installer.store
        installing = {(r.model, r.version) for r in installer.pending()}
        for name in store.all_names():
            try:
                pointer = store.active(name)
            except AgentError as exc:
                self._problem(f"{name}: {exc}; serving the newest intact version instead")
                candidates = [v for v in sorted(store.versions(name), reverse=True)
                              if (name, v) not in installing]
                pointer = None
            else:
                if pointer is None:
                    continue
                candidates = [v for v in (pointer.version, pointer.previous) if v is not None]
            for version in candidates:
                try:
                    self.swap(name, self.load(store.slot(name, version)))
                except (AgentError, InstallError) as exc:
                    self._problem(f"{name} v{version} cannot be served: {exc}")
                    continue
                if pointer is None or version != pointer.version:
                    store.set_active(name, version, None)
                break
            else:
                if candidates:
                    # Nothing intact to serve: forget the pointer, so the next install of
                    # this model is a clean first one rather than a reuse of a broken slot.
                    store.deactivate(name)

    def _problem(self, problem: str) -> None:
        self.problems.append(problem)
        log.error("%s", problem)

    def _require_installer(self) -> Installer:
        if self.installer is None:
            raise AgentError("this runtime has no state directory, so it cannot install "
                             "bundles; start it with a state directory")
        return self.installer

    def _require_installs(self) -> InstallDriver:
        self._require_installer()
        assert self.installs is not None
        return self.installs

    # -- lifecycle -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Models, their figures, installs in progress and recent ones; JSON-ready."""
        models = []
        for info in self.models():
            figures = self._serving[info.name].stats.snapshot()
            models.append({"name": info.name, "version": info.version, "state": info.state,
                           "backend": info.backend, "device": info.device,
                           "fallback": info.fallback, "source": info.source, **figures})
        installs = [] if self.installer is None else [
            r.summary() for r in self.installer.records()[:10]]
        return {"models": models, "installs": installs, "problems": list(self.problems),
                "profile": self.profile.name if self.profile else None}

    def start(self, interval_s: float = 0.5) -> None:
        """Judge probations in a background thread every ``interval_s``."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check_probation()
                except Exception:  # the watchdog must outlive any one failure
                    log.exception("probation check failed")

        self._thread = threading.Thread(target=loop, name="edgefleet-probation", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background threads (an install under way resumes at the next start)."""
        self._stop.set()
        if self.installs is not None:
            self.installs.close()
        self.side_runner.close()
        if self.installer is not None:
            self.installer.end_run()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _prove(session: Session, manifest: Manifest | None) -> Session:
    """``session`` once it passed the manifest's self-test (if any) and is warmed up."""
    feeds = self_test(session, manifest) if manifest is not None else None
    warm_up(session, feeds, _WARMUP_RUNS)
    return session

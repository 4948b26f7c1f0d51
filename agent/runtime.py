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
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle.manifest import Manifest
from firmware_profiles.model import Profile
from firmware_profiles.runtimes import import_litert

from .errors import AgentError, InstallError, InvalidInputError, ModelLoadError, ModelNotFoundError
from .install_state import InstallRecord, InstallState, Step, plan_resume
from .installer import Installer, StateDirs
from .model_store import StoredModel
from .probation import ProbationPolicy, judge
from .sessions import Session, TensorInfo, open_session
from .tensors import check_feeds, from_manifest_tensor

__all__ = ["ModelInfo", "RequestStats", "Runtime", "ServedModel"]

log = logging.getLogger(__name__)
_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
_WARMUP_RUNS = 3
_INSTALL_NICE = 10
# A p99 from fewer samples than this is noise, not a baseline.
_BASELINE_SAMPLES = 200


@dataclass(frozen=True)
class ModelInfo:
    """What is known about one served model (the API's model metadata)."""

    name: str
    version: int | None  # None for a model file served without a bundle
    backend: str
    fallback: str | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    source: str
    state: str  # "serving" or "probation"


class RequestStats:
    """Counts and recent latencies of one loaded model; thread-safe."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float) -> None:
        with self._lock:
            self.requests += 1
            self._latencies.append(seconds)

    def record_error(self) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1

    def read(self) -> tuple[int, int, tuple[float, ...]]:
        """Requests, errors and the recent latencies (seconds), read together so they agree."""
        with self._lock:
            return self.requests, self.errors, tuple(self._latencies)

    def snapshot(self) -> dict[str, Any]:
        """Requests, errors and p50/p99 in milliseconds (None without samples)."""
        with self._lock:
            latencies = np.array(self._latencies)
            requests, errors = self.requests, self.errors
        p50, p99 = (np.percentile(latencies, [50, 99]) * 1e3 if len(latencies)
                    else (None, None))
        return {"requests": requests, "errors": errors, "samples": len(latencies),
                "p50_ms": None if p50 is None else float(p50),
                "p99_ms": None if p99 is None else float(p99)}


class ServedModel:
    """A loaded model under a name: one session, its identity and its request figures."""

    def __init__(self, name: str, version: int | None, session: Session, source: str,
                 stored: StoredModel | None = None) -> None:
        self.name = name
        self.version = version
        self.session = session
        self.source = source
        self.stored = stored
        self.stats = RequestStats()
        self.output_names = [o.name for o in session.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request. The runtime checks the feeds; ours are checked only on failure,
        to explain it, which keeps the successful path as short as a bare session call."""
        start = time.perf_counter()
        try:
            outputs = self.session.run(inputs)
        except Exception as exc:  # whatever the runtime raises, explain it
            problem = check_feeds(self.session.inputs, inputs)
            if problem is not None:
                raise InvalidInputError(f"model {self.name}: {problem}") from None
            self.stats.record_error()
            raise AgentError(f"model {self.name} v{self.version}: inference failed "
                             f"({exc})") from exc
        self.stats.record(time.perf_counter() - start)
        return dict(zip(self.output_names, outputs, strict=True))

    def info(self, state: str) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.session.backend, self.session.fallback,
                         self.session.inputs, self.session.outputs, self.source, state)


@dataclass
class _Probation:
    record: InstallRecord
    started: float
    baseline_p99_ms: float | None
    previous: ServedModel | None


class Runtime:
    """Models served by name, offline; installs bundles when given a state directory.

    Without ``state_dir`` the runtime serves model files only (:meth:`load_file`). With it,
    the constructor restores what was serving and resumes any install a crash interrupted.
    ``profile`` is this device's firmware profile (None: a generic CPU).
    """

    def __init__(self, state_dir: Path | None = None, profile: Profile | None = None, *,
                 policy: ProbationPolicy | None = None, threads: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.profile = profile
        self.policy = policy or ProbationPolicy()
        self.threads = threads
        self._serving: dict[str, ServedModel] = {}
        self._probations: dict[str, _Probation] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Installs run on one worker at a lower OS priority: verifying, staging and loading
        # a model are CPU work that must not take a core from the requests being served
        # meanwhile (hot-swap latency, docs/benchmarks.md).
        self._install_worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgefleet-install",
            initializer=_lower_thread_priority)
        #: Problems found while restoring models at start-up, for status reports.
        self.problems: list[str] = []
        self.installer: Installer | None = None
        if state_dir is not None:
            formats = {"onnx"} | ({"tflite"} if import_litert() is not None else set())
            self.installer = Installer(StateDirs(state_dir), profile, formats, clock)
            self._restore()

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
        return served.info("probation" if name in self._probations else "serving")

    def models(self) -> list[ModelInfo]:
        """Every served model."""
        return [self.model(name) for name in sorted(self._serving)]

    def served(self, name: str) -> ServedModel:
        """The live model object behind ``name`` (its stats, its session)."""
        served = self._serving.get(name)
        if served is None:
            raise ModelNotFoundError(f"no model named {name!r} is served")
        return served

    # -- loading -------------------------------------------------------------------------

    def load_file(self, path: Path, name: str | None = None) -> ModelInfo:
        """Serve the model file ``path`` (.onnx or .tflite) as ``name`` (default: its stem).

        Unsigned and not persisted: for offline use without a fleet. Replaces a model of the
        same name with the same hot-swap as an install.
        """
        fmt = _FORMATS_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise ModelLoadError(f"{path}: cannot tell the format from the suffix; use .onnx "
                                 "or .tflite (or install a bundle)")
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        name = name or path.stem
        served = ServedModel(name, None, self._open(path, fmt, None), str(path))
        with self._lock:
            self._serving[name] = served
        return self.model(name)

    def _open(self, path: Path, fmt: str, manifest: Manifest | None) -> Session:
        """Open, self-test and warm up a model; raises ModelLoadError or InstallError."""
        accelerators = self.profile.accelerators if self.profile else ()
        session = open_session(path, fmt, accelerators, self.threads)
        feeds = _self_test(session, manifest) if manifest is not None else None
        feeds = feeds or _zeros(session.inputs)
        for _ in range(_WARMUP_RUNS):
            session.run(feeds)
        return session

    def _load_stored(self, stored: StoredModel) -> ServedModel:
        if not stored.intact():
            raise ModelLoadError(f"{stored.path} no longer matches its sha256 {stored.sha256[:16]}"
                                 "; the file was damaged on disk")
        session = self._open(stored.path, stored.format, stored.manifest)
        return ServedModel(stored.name, stored.version, session,
                           f"{stored.name} v{stored.version} ({stored.dtype} {stored.format})",
                           stored)

    # -- installing ----------------------------------------------------------------------

    def install(self, bundle: Path) -> InstallRecord:
        """Install the bundle file at ``bundle`` and swap it in.

        Returns the record once the new model serves in probation, or failed (the serving
        model untouched; ``record.reason`` says why). Probation ends in :meth:`check_probation`.
        """
        self._require_installer()
        return self._install_worker.submit(self._install_now, bundle).result()

    def _install_now(self, bundle: Path) -> InstallRecord:
        installer = self._require_installer()
        with self._lock:
            record = installer.begin(bundle)
            return self._drive(record, Step.DOWNLOAD)

    def _drive(self, record: InstallRecord, step: Step) -> InstallRecord:
        installer = self._require_installer()
        try:
            if step in (Step.DOWNLOAD, Step.VERIFY):
                if step is Step.DOWNLOAD:
                    if record.state is InstallState.IDLE:
                        record = installer.move(record, InstallState.DOWNLOADING)
                    record = installer.download(record)
                record, _ = installer.verify_and_stage(record)
                step = Step.ACTIVATE
            if step is Step.ACTIVATE:
                return self._activate(record)
            if step is Step.PROBATION:
                return self._resume_probation(record)
            if step is Step.ROLL_BACK:
                return self._roll_back(record, f"the agent restarted {record.restarts} times "
                                       "during probation; the new model may be crashing it")
            if step is Step.FAIL:
                raise InstallError("crash_loop", f"the agent restarted {record.restarts} times "
                                   "while activating; the new model may be crashing it")
            return record
        except InstallError as exc:
            return self._fail(record, exc.reason, str(exc))
        except (AgentError, OSError) as exc:
            return self._fail(record, "install_error", str(exc))

    def _activate(self, record: InstallRecord) -> InstallRecord:
        installer = self._require_installer()
        name, version = record.model, record.version
        assert name is not None, "staged records know their model"
        assert version is not None, "staged records know their version"
        store = installer.store
        installer.drop_bundle(record)  # left behind if the agent died right after staging
        probation = self._probations.get(name)
        if probation is not None and probation.record.install_id != record.install_id:
            # The newest install wins: the one in probation is judged now on what it has
            # served (committed if healthy, so it becomes the rollback target; rolled back
            # if not), then the new one goes through its own probation.
            self._conclude(name, probation, superseded_by=version)
        if record.state is InstallState.STAGED:
            pointer = store.active(name)
            previous_version = None if pointer is None else (
                pointer.version if pointer.version != version else pointer.previous)
            record = installer.move(record, InstallState.ACTIVATING,
                                    previous_version=previous_version)
        else:
            installer.save(record)  # a resumed activation: keep the restart count
        current = self._serving.get(name)
        if current is not None and current.version == version:
            new = current  # restored at start-up: the pointer was flipped before the crash
            current = None
        else:
            try:
                new = self._load_stored(store.slot(name, version))
            except ModelLoadError as exc:
                raise InstallError("load_failed", str(exc)) from exc
        store.set_active(name, version, record.previous_version)
        record = installer.move(record, InstallState.PROBATION)
        previous = current
        if previous is None and record.previous_version is not None:
            previous = self._load_previous(name, record.previous_version)
        self._serving[name] = new  # the swap
        self._start_probation(record, previous)
        return record

    def _resume_probation(self, record: InstallRecord) -> InstallRecord:
        installer = self._require_installer()
        installer.save(record)
        assert record.model is not None
        served = self._serving.get(record.model)
        if served is None or served.version != record.version:
            return self._roll_back(record, "the new model could not be restored after a "
                                   "restart during probation")
        standby = (None if record.previous_version is None
                   else self._load_previous(record.model, record.previous_version))
        self._start_probation(record, standby)
        return record

    def _load_previous(self, name: str, version: int) -> ServedModel | None:
        try:
            return self._load_stored(self._require_installer().store.slot(name, version))
        except (AgentError, InstallError) as exc:
            log.error("previous version %s v%d cannot be loaded (%s); probation continues "
                      "without a rollback target", name, version, exc)
            return None

    def _start_probation(self, record: InstallRecord, previous: ServedModel | None) -> None:
        assert record.model is not None
        baseline = None
        if previous is not None:
            figures = previous.stats.snapshot()
            if figures["samples"] >= _BASELINE_SAMPLES:
                baseline = figures["p99_ms"]
        self._probations[record.model] = _Probation(record, time.monotonic(), baseline,
                                                    previous)
        log.info("%s v%s serving in probation for %g s", record.model, record.version,
                 self.policy.window_s)

    def check_probation(self) -> list[InstallRecord]:
        """Judge every model in probation; returns the installs this call concluded."""
        concluded = []
        with self._lock:
            for name, probation in list(self._probations.items()):
                record = self._conclude(name, probation)
                if record is not None:
                    concluded.append(record)
        return concluded

    def _conclude(self, name: str, probation: _Probation,
                  superseded_by: int | None = None) -> InstallRecord | None:
        """Judge one probation; with ``superseded_by`` the window counts as over."""
        figures = self._serving[name].stats.snapshot()
        elapsed = time.monotonic() - probation.started
        verdict = judge(self.policy, self.policy.window_s if superseded_by else elapsed,
                        requests=figures["requests"], errors=figures["errors"],
                        p99_ms=figures["p99_ms"], baseline_p99_ms=probation.baseline_p99_ms,
                        latency_samples=figures["samples"])
        reason = verdict.reason
        if superseded_by is not None:
            reason = f"superseded by v{superseded_by} after {elapsed:.0f} s: {reason}"
        if verdict.decision == "commit":
            return self._commit(name, probation, reason,
                                keep=() if superseded_by is None else (superseded_by,))
        if verdict.decision == "roll_back":
            return self._roll_back(probation.record, reason)
        return None

    def _commit(self, name: str, probation: _Probation, reason: str,
                keep: tuple[int, ...] = ()) -> InstallRecord:
        installer = self._require_installer()
        del self._probations[name]
        record = installer.move(probation.record, InstallState.COMMITTED, detail=reason)
        installer.store.prune(name, keep)
        installer.forget_old()
        return record

    def _roll_back(self, record: InstallRecord, reason: str) -> InstallRecord:
        installer = self._require_installer()
        name, previous_version = record.model, record.previous_version
        assert name is not None
        probation = self._probations.pop(name, None)
        previous = probation.previous if probation else None
        if previous is None and previous_version is not None:
            previous = self._load_previous(name, previous_version)
        if previous is not None:
            installer.store.set_active(name, previous.version or 0, None)
            self._serving[name] = previous
        else:
            installer.store.deactivate(name)
            self._serving.pop(name, None)
        record = installer.move(record, InstallState.ROLLED_BACK, reason="probation_failed",
                                detail=reason)
        installer.discard(record)
        return record

    def _fail(self, record: InstallRecord, reason: str, detail: str) -> InstallRecord:
        installer = self._require_installer()
        if record.model is not None and record.version is not None:
            pointer = installer.store.active(record.model)
            if pointer is not None and pointer.version == record.version:
                # Interrupted after the flip: the previous version is the known-good one.
                self._probations.pop(record.model, None)
                if record.previous_version is None:
                    installer.store.deactivate(record.model)
                    self._serving.pop(record.model, None)
                else:
                    installer.store.set_active(record.model, record.previous_version, None)
                    previous = self._load_previous(record.model, record.previous_version)
                    if previous is not None:
                        self._serving[record.model] = previous
        record = installer.move(record, InstallState.FAILED, reason=reason, detail=detail)
        installer.discard(record)
        return record

    def _restore(self) -> None:
        """Serve what the store says is active, then resume interrupted installs."""
        installer = self._require_installer()
        store = installer.store
        for name in store.names():
            pointer = store.active(name)
            assert pointer is not None
            for version in (pointer.version, pointer.previous):
                if version is None:
                    continue
                try:
                    self._serving[name] = self._load_stored(store.slot(name, version))
                except (AgentError, InstallError) as exc:
                    self.problems.append(f"{name} v{version} cannot be served: {exc}")
                    log.error("%s", self.problems[-1])
                    continue
                if version != pointer.version:
                    store.set_active(name, version, None)
                break
        for record in installer.pending():
            resumed, step = plan_resume(record)
            log.warning("resuming install %s (%s) at %s: %s", record.install_id,
                        record.source, record.state.value, step.value)
            self._drive(resumed, step)

    def _require_installer(self) -> Installer:
        if self.installer is None:
            raise AgentError("this runtime has no state directory, so it cannot install "
                             "bundles; start it with a state directory")
        return self.installer

    # -- lifecycle -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Models, their figures, installs in progress and recent ones; JSON-ready."""
        models = []
        for info in self.models():
            figures = self._serving[info.name].stats.snapshot()
            models.append({"name": info.name, "version": info.version, "state": info.state,
                           "backend": info.backend, "fallback": info.fallback,
                           "source": info.source, **figures})
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
        """Stop the background threads."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._install_worker.shutdown()


def _lower_thread_priority() -> None:
    # Linux gives each thread its own nice value; elsewhere this is a no-op.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _INSTALL_NICE)
    except (OSError, AttributeError) as exc:
        log.debug("cannot lower the install thread's priority: %s", exc)


def _self_test(session: Session, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """Run the manifest's golden cases; raises InstallError on a mismatch. Returns the first
    case's feeds, for warm-up."""
    first = None
    for number, case in enumerate(manifest.self_test, 1):
        feeds = {name: from_manifest_tensor(t) for name, t in case.inputs.items()}
        try:
            outputs = session.run(feeds)
        except Exception as exc:
            raise InstallError("self_test_failed", f"{manifest.name} v{manifest.version}: "
                               f"self-test case {number} did not run ({exc})") from exc
        names = [o.name for o in session.outputs]
        for position, (name, tensor) in enumerate(case.expected_outputs.items()):
            # A converted artifact may rename outputs (TFLite's Identity); order is kept.
            got = outputs[names.index(name) if name in names else position]
            expected = from_manifest_tensor(tensor)
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=case.rtol,
                                                               atol=case.atol):
                deviation = (float(np.max(np.abs(got - expected)))
                             if got.shape == expected.shape else float("inf"))
                raise InstallError("self_test_failed", f"{manifest.name} v{manifest.version}: "
                                   f"self-test case {number} output {name} deviates by "
                                   f"{deviation:.3g} (tolerance {case.atol:g}); the artifact "
                                   "does not compute what was signed off")
        first = first or feeds
    return first


def _zeros(inputs: tuple[TensorInfo, ...]) -> dict[str, np.ndarray]:
    return {i.name: np.zeros([1 if d is None else d for d in i.shape], dtype=i.dtype)
            for i in inputs}

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
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bundle.manifest import Manifest
from firmware_profiles.model import Profile
from firmware_profiles.runtimes import import_litert, onnxruntime_installed

from .errors import AgentError, InstallError, InvalidInputError, ModelLoadError, ModelNotFoundError
from .install_driver import InstallDriver, ServedLike
from .install_state import InstallRecord
from .installer import Installer, StateDirs, Verifier
from .model_store import StoredModel
from .probation import ProbationPolicy
from .sessions import Session, TensorInfo, open_session, warm_up
from .tensors import check_feeds, from_manifest_tensor

__all__ = ["ModelInfo", "RequestStats", "Runtime", "ServedModel", "StatTotals"]

log = logging.getLogger(__name__)
_FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}
_WARMUP_RUNS = 3


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
    device: str = "cpu"  # what actually runs it (Session.device)


@dataclass(frozen=True)
class StatTotals:
    """A model's cumulative figures since it was loaded (the statistics extension's)."""

    successes: int
    failures: int
    success_s: float  # summed run time of the successful requests
    failure_s: float
    last_at: float | None  # wall-clock time (epoch seconds) of the last request, if any


class RequestStats:
    """Counts and recent latencies of one loaded model; thread-safe."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self._success_s = 0.0
        self._failure_s = 0.0
        # perf_counter() of the last request's end; turned into wall-clock time when read,
        # so the hot path pays for one clock, not two.
        self._last: float | None = None
        self._latencies: deque[float] = deque(maxlen=keep)

    def record(self, seconds: float, end: float) -> None:
        """A successful request that took ``seconds`` and ended at perf_counter() ``end``."""
        with self._lock:
            self.requests += 1
            self._success_s += seconds
            self._last = end
            self._latencies.append(seconds)

    def record_error(self, seconds: float, end: float) -> None:
        """A failed request that took ``seconds`` and ended at perf_counter() ``end``."""
        with self._lock:
            self.requests += 1
            self.errors += 1
            self._failure_s += seconds
            self._last = end

    def read(self) -> tuple[int, int, tuple[float, ...]]:
        """Requests, errors and the recent latencies (seconds), read together so they agree."""
        with self._lock:
            return self.requests, self.errors, tuple(self._latencies)

    def totals(self) -> StatTotals:
        """The cumulative figures, read together."""
        with self._lock:
            last = self._last
            totals = StatTotals(self.requests - self.errors, self.errors, self._success_s,
                                self._failure_s, None)
        if last is None:
            return totals
        return replace(totals, last_at=time.time() - (time.perf_counter() - last))

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
            end = time.perf_counter()
            self.stats.record_error(end - start, end)
            raise AgentError(f"model {self.name} v{self.version}: inference failed "
                             f"({exc})") from exc
        end = time.perf_counter()
        self.stats.record(end - start, end)
        return dict(zip(self.output_names, outputs, strict=True))

    @property
    def figures(self) -> dict[str, Any]:
        """Requests, errors, latency samples and p50/p99 (ms) so far."""
        return self.stats.snapshot()

    def info(self, state: str) -> ModelInfo:
        return ModelInfo(self.name, self.version, self.session.backend, self.session.fallback,
                         self.session.inputs, self.session.outputs, self.source, state,
                         self.session.device)


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
                 verifier: Verifier | None = None) -> None:
        self.profile = profile
        self.policy = policy or ProbationPolicy()
        self.threads = threads
        self._serving: dict[str, ServedModel] = {}
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
        either gets the old model or the new one, and finishes on the one it got."""
        if model is None:
            self._serving.pop(name, None)
        else:
            assert isinstance(model, ServedModel)
            self._serving[name] = model

    def load(self, stored: StoredModel) -> ServedModel:
        """Load, self-test and warm up a stored model (checking its file's hash first)."""
        if not stored.intact():
            raise ModelLoadError(f"{stored.path} no longer matches its sha256 {stored.sha256[:16]}"
                                 "; the file was damaged on disk")
        session = self._open(stored.path, stored.format, stored.manifest)
        return ServedModel(stored.name, stored.version, session,
                           f"{stored.name} v{stored.version} ({stored.dtype} {stored.format})",
                           stored)

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
        self.swap(name, ServedModel(name, None, self._open(path, fmt, None), str(path)))
        return self.model(name)

    def _open(self, path: Path, fmt: str, manifest: Manifest | None) -> Session:
        """Open, self-test and warm up a model; raises ModelLoadError or InstallError."""
        accelerators = self.profile.accelerators if self.profile else ()
        session = open_session(path, fmt, accelerators, self.threads)
        feeds = _self_test(session, manifest) if manifest is not None else None
        warm_up(session, feeds, _WARMUP_RUNS)
        return session

    # -- installing ----------------------------------------------------------------------

    def install(self, bundle: Path) -> InstallRecord:
        """Install the bundle file at ``bundle`` and swap it in.

        Returns the record once the new model serves in probation, or failed (the serving
        model untouched; ``record.reason`` says why). Probation ends in :meth:`check_probation`.
        """
        return self._require_installs().install(bundle)

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
                    self._serving[name] = self.load(store.slot(name, version))
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
        if self.installer is not None:
            self.installer.end_run()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


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




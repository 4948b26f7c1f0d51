"""``compress()``: one trained model in, the best artifact per firmware profile out.

The flow: check inputs (``compressor.job``: the model's signature, the data bound to its
inputs, the profiles); run the model as given over the evaluation data (the reference every
candidate is judged against, with the measure that fits each output); prepare the graph (the
fp32 candidate); build the ONNX candidates the profiles' dtypes call for, and for profiles
that prefer or need TFLite the TFLite variants (``passes.tflite``, when TensorFlow and onnx2tf
are installed; otherwise a note says so); time all candidates interleaved; choose per profile
and write artifacts and ``report.json`` (``compressor.output``). A ``.tflite`` model is
translated to ONNX first (tf2onnx), and competes itself as ``tflite-fp32``.

A candidate that fails to build, load or run is rejected with its reason and the run goes on.
Everything is built in a scratch directory beside ``out_dir`` and renamed into place at the
end, so a failure at any point leaves no partial output.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from firmware_profiles import Profile

from .candidates import Candidate, Failure, Judge, Pool, build_candidate, renamed, stage_of
from .choose import Measured
from .errors import CompressorError
from .evaluate import calibration_calls, first_call, measure_latency_interleaved, run_dataset
from .job import CompressOptions, Job, Progress, plan_job, resolve_labels, resolve_metrics
from .output import Finish, write_output
from .passes import (
    ConvertFp16,
    ConvertTflite,
    ModelPass,
    OptimizeGraph,
    PassContext,
    PassError,
    PruneChannels,
    QuantizeDynamic,
    QuantizeStatic,
)
from .passes.base import graph_facts
from .passes.tflite import TFLITE_VARIANTS, tflite_unavailable, to_onnx
from .runner import ModelLoadError, ModelRunError, open_runner

__all__ = ["CompressOptions", "NoArtifactError", "UnsupportedTargetError", "compress",
           "wants_tflite"]

log = logging.getLogger(__name__)


class UnsupportedTargetError(CompressorError):
    """A profile cannot run this model (format, or an op it must avoid)."""


class NoArtifactError(CompressorError):
    """For some profile no candidate met the accuracy budget; report.json says why."""


def wants_tflite(profile: Profile) -> bool:
    """Whether TFLite candidates are built for ``profile``.

    They are when the profile prefers TFLite to ONNX (or runs no ONNX), or needs int8-full,
    which only TFLite makes. A profile listing tflite after onnx would never get a TFLite
    artifact (the chooser takes the preferred format when it has a qualifying candidate, and
    ONNX fp32 always qualifies), so converting for it would only cost time.
    """
    formats = profile.formats
    if "tflite" not in formats:
        return False
    return ("onnx" not in formats or formats.index("tflite") < formats.index("onnx")
            or "int8-full" in profile.dtypes)


def _check_profiles(job: Job, tflite_missing: str | None) -> None:
    ops = graph_facts(job.model).ops if job.source_format == "onnx" else frozenset()
    for profile in job.profiles:
        if "onnx" not in profile.formats and tflite_missing is not None and (
                job.source_format != "tflite"):
            raise UnsupportedTargetError(
                f"profile {profile.name} runs only {', '.join(profile.formats)} artifacts, and "
                f"the TFLite converter is missing here: {tflite_missing} (or drop that "
                "--profile).")
        avoided = sorted(ops & set(profile.avoid_ops))
        if avoided:
            raise UnsupportedTargetError(
                f"the model uses {', '.join(avoided)}, which profile {profile.name} cannot run "
                "(its avoid_ops); change the model or target another profile.")


def _candidate_passes(profile: Profile) -> list[ModelPass]:
    passes: list[ModelPass] = []
    if "int8" in profile.dtypes:
        passes += [QuantizeDynamic(), QuantizeStatic()]
    if "fp16" in profile.dtypes:
        passes.append(ConvertFp16())
    return passes


def compress(model: Path, profiles: list[Profile], out_dir: Path, *,
             calibration: Path | None = None, evaluation: Path | None = None,
             options: CompressOptions | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Compress ``model`` for ``profiles`` into ``out_dir``; returns the report written there.

    Raises :class:`NoArtifactError` (after writing ``report.json`` and the artifacts of the
    profiles that did get one) when some profile gets no artifact within the budget.
    """
    options = options or CompressOptions()
    if not profiles:
        raise CompressorError("no profile given; pass --profile NAME (see edge-compress "
                              "profiles).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CompressorError(f"{out_dir} exists and is not empty; choose a new --out "
                              "directory or remove it.")
    job = plan_job(model, profiles, calibration, evaluation, options=options,
                   progress=progress)
    tflite_missing = (tflite_unavailable()
                      if job.source_format == "tflite" or any(wants_tflite(p) for p in profiles)
                      else None)
    _check_profiles(job, tflite_missing)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report = _Run(job, scratch, tflite_missing).run()
        final = scratch / "out"
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(final, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    missing = [d["profile"] for d in report["decisions"] if d["chosen"] is None]
    if missing:
        raise NoArtifactError(f"no artifact within the accuracy budget of "
                              f"{options.max_accuracy_drop:g} for {', '.join(missing)}; "
                              f"{out_dir / 'report.json'} lists every candidate and why it "
                              "was rejected.")
    return report


class _Run:
    """One run's steps over a scratch directory (see the module docstring)."""

    def __init__(self, job: Job, scratch: Path, tflite_missing: str | None) -> None:
        self.job, self.scratch, self.tflite_missing = job, scratch, tflite_missing
        self.work = scratch / "work"
        self.work.mkdir()
        self.options = job.options
        # Candidates depend on the profiles' dtypes and on reduce_range (CPUs without VNNI
        # or dotprod); each distinct (pass, reduce_range) is built once, shared by profiles.
        self.reduce_ranges = sorted({not p.cpu.fast_int8 for p in job.profiles})
        self.tflite_profiles = [p for p in job.profiles if wants_tflite(p)]
        self.plan = self._plan()
        self.total = (len(self.plan) + 4 + bool(self.options.prune_channels)
                      + bool(self.tflite_profiles) + (job.source_format == "tflite"))
        self.step = 0
        self.pool = Pool()
        self.tflite_problem: str | None = None
        self.translation_notes: tuple[str, ...] = ()  # of a .tflite model's ONNX form

    def progress(self, what: str) -> None:
        self.step += 1
        self.job.progress(min(self.step, self.total), self.total, what)

    def _plan(self) -> list[tuple[ModelPass, bool, bool]]:
        """Which passes to build: (pass, reduce_range, on the pruned model), each once."""
        plan: list[tuple[ModelPass, bool, bool]] = []
        for rr in self.reduce_ranges:
            passes: dict[str, ModelPass] = {}
            for profile in self.job.profiles:
                if (not profile.cpu.fast_int8) == rr:
                    passes.update((p.name, p) for p in _candidate_passes(profile))
            plan += [(p, rr, False) for p in passes.values()]
            if self.options.prune_channels and "int8-dynamic" in passes:
                plan.append((QuantizeDynamic(), rr, True))
        return plan

    def run(self) -> dict[str, Any]:
        job = self.job
        self.progress("running the model as given (the reference)")
        reference_runner = open_runner(job.model, self.options.threads)
        try:
            reference = run_dataset(reference_runner, job.binding, job.evaluation)
        except ModelRunError as exc:
            raise ModelLoadError(f"{job.model}: the model itself fails on the evaluation "
                                 f"data ({exc}); check the data against its inputs.") from exc
        metrics = resolve_metrics(job.signature, job.binding, reference, self.options.metrics)
        labels = resolve_labels(job.evaluation, job.binding, metrics)
        self.judge = Judge(job.binding, job.evaluation, reference, metrics, labels,
                           self.options.threads)
        calls = calibration_calls(reference_runner, job.binding, job.calibration,
                                  self.options.calibration_samples)
        count = self.options.self_test_samples
        golden = calibration_calls(reference_runner, job.binding, job.evaluation.head(count),
                                   count)
        expected = [reference_runner.run(call) for call in golden]
        self.ctx = PassContext(workdir=self.work, calibration=calls)
        reference_name = "fp32"
        onnx_source: Path | None = job.model
        if job.source_format == "tflite":
            self.pool.add(Candidate("tflite-fp32", "fp32", job.model,
                                    ("the model as given",), "tflite"),
                          reference_runner, self.judge(reference_runner), self.reduce_ranges)
            reference_name, onnx_source = "tflite-fp32", self._translate()
        else:
            del reference_runner  # a large model's session would otherwise stay all run long
        self.progress("preparing the graph (shape inference, optimisation)")
        if onnx_source is not None:
            self._prepare(onnx_source)
        if "fp32" not in self.pool.candidates and reference_name == "fp32":
            raise ModelLoadError(f"{job.model}: {self.pool.failures['fp32'].reason}")
        if "fp32" in self.pool.candidates:
            reference_name = "fp32"
            self._build_all()
        self.progress(f"measuring latency of {len(self.pool.runners)} candidates")
        latency = measure_latency_interleaved(
            self.pool.runners, first_call(job.binding, job.evaluation),
            self.options.latency_rounds, self.options.latency_iterations,
            budget_s=self.options.latency_budget_s)
        measured = {name: Measured(name, c.dtype, c.path.stat().st_size, latency[name].p50_ms,
                                   latency[name].p99_ms, self.pool.quality[name].drop,
                                   format=c.format)
                    for name, c in self.pool.candidates.items()}
        self.job.progress(self.total, self.total, "choosing and writing artifacts")
        finish = Finish(reference_name, golden, expected, self.tflite_problem,
                        {p.name: wants_tflite(p) for p in job.profiles}, self.judge.metrics,
                        reference)
        return write_output(job, self.pool, measured, finish, self.scratch / "out")

    def _translate(self) -> Path | None:
        """The ONNX form of a TFLite model (tf2onnx), or None with a note why not."""
        if self.tflite_missing is not None:
            self._note(f"no ONNX candidates: translating TFLite needs the converter: "
                       f"{self.tflite_missing}")
            return None
        self.progress("translating the TFLite model to ONNX (tf2onnx)")
        try:
            path, notes = to_onnx(self.job.model, self.work / "from-tflite")
        except PassError as exc:
            self._note(f"no ONNX candidates: the TFLite model does not translate to ONNX "
                       f"({exc})")
            return None
        self.translation_notes = notes
        return path

    def _prepare(self, source: Path) -> None:
        """The fp32 candidate: the prepared graph, else the source as it is."""
        notes = self.translation_notes
        try:
            prepared = OptimizeGraph()(source, self.ctx)
            path, notes = prepared.model, (*notes, *prepared.notes)
        except PassError as exc:
            self._note(f"graph preparation failed ({exc}); the fp32 candidate is the model "
                       "as given")
            path = source
        for attempt in dict.fromkeys([path, source]):
            try:
                runner, quality = self.judge.load(attempt)
            except (ModelLoadError, ModelRunError) as exc:
                if attempt == source:
                    self.pool.fail(Failure("fp32", stage_of(exc), str(exc)), self.reduce_ranges)
                    return
                self._note(f"the prepared graph does not run ({exc}); the fp32 candidate is "
                           "the model as given")
                continue
            self.pool.add(Candidate("fp32", "fp32", attempt, notes), runner, quality,
                          self.reduce_ranges)
            return

    def _build_all(self) -> None:
        options, pool = self.options, self.pool
        sources = {False: pool.candidates["fp32"].path}
        pruned_name = f"{PruneChannels.name}{int((options.prune_channels or 0) * 100)}"
        if options.prune_channels:
            self.progress(f"building {pruned_name}")
            built = self._try(PruneChannels(options.prune_channels), sources[False],
                              self.ctx, name=pruned_name, reduce_ranges=self.reduce_ranges)
            if built is not None:
                sources[True] = built.path
        for model_pass, rr, on_pruned in self.plan:
            name = (f"{pruned_name}+" if on_pruned else "") + model_pass.name + (
                "-rr" if rr else "")
            self.progress(f"building {name}")
            if on_pruned and True not in sources:
                pool.fail(Failure(name, "build", f"{pruned_name} did not build"), [rr])
                continue
            prefix = pool.candidates[pruned_name].notes if on_pruned else ()
            self._try(model_pass, sources[on_pruned], replace(self.ctx, fast_int8=not rr),
                      name=name, reduce_ranges=[rr], prefix_notes=prefix)
        if self.tflite_profiles:
            self._add_tflite(sources[False])

    def _try(self, model_pass: ModelPass, source: Path, ctx: PassContext, *, name: str,
             reduce_ranges: list[bool], prefix_notes: tuple[str, ...] = ()) -> Candidate | None:
        """Build one candidate into the pool; a failure is recorded and the run goes on."""
        try:
            candidate, runner, quality = build_candidate(
                model_pass, source, ctx, self.judge,
                max_drop=self.options.max_accuracy_drop, name=name)
        except CompressorError as exc:
            self.pool.fail(Failure(name, stage_of(exc), str(exc)), reduce_ranges)
            return None
        candidate = renamed(candidate, name, prefix_notes)
        self.pool.add(candidate, runner, quality, reduce_ranges)
        return candidate

    def _add_tflite(self, source: Path) -> None:
        """Convert, then judge each TFLite variant into the pool; failures become notes."""
        if self.tflite_missing is not None:
            names = ", ".join(p.name for p in self.tflite_profiles)
            self._note(f"no TFLite candidates for {names}: {self.tflite_missing}",
                       tflite=True)
            return
        dtypes = {d for p in self.tflite_profiles for d in p.dtypes}
        have = set(self.pool.candidates)
        # tflite-fp32 always (the latency bar), unless the model was given as TFLite.
        variants = tuple(v for v, d in TFLITE_VARIANTS.items() if v not in have
                         and (v == "tflite-fp32" or d in dtypes))
        self.progress(f"converting to TFLite: {len(variants)} variants")
        try:
            built = ConvertTflite(variants).build(source, self.ctx)
        except PassError as exc:  # TfliteUnavailableError included: a note, never a crash
            self._note(f"no TFLite candidates: the conversion failed: {exc}", tflite=True)
            return
        if not built.artifacts:
            self._note("no TFLite candidates: every variant failed to convert", tflite=True)
        for name, reason in built.skipped.items():
            self.pool.fail(Failure(name, "build", reason), [], fmt="tflite")
        for artifact in built.artifacts:
            try:
                runner, quality = self.judge.load(artifact.path)
            except (ModelLoadError, ModelRunError) as exc:
                # The converter can emit models LiteRT then refuses or fails on (say, a
                # quantized division whose divisor rounds to zero): not offered, and why.
                self.pool.fail(Failure(artifact.name, stage_of(exc), str(exc)), [],
                               fmt="tflite")
                continue
            candidate = Candidate(artifact.name, artifact.dtype, artifact.path, artifact.notes,
                                  "tflite", artifact.io_quantization)
            self.pool.add(candidate, runner, quality, [])
        if not any(c.format == "tflite" for c in self.pool.candidates.values()):
            self.tflite_problem = self.tflite_problem or "every TFLite variant failed"

    def _note(self, note: str, tflite: bool = False) -> None:
        log.warning("%s", note)
        self.pool.notes.append(note)
        if tflite:
            self.tflite_problem = note


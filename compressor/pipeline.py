"""``compress()``: one trained ONNX model in, the best artifact per firmware profile out.

The flow: check inputs (model loads, data fits the model's input, every profile runs a format
the compressor can build here and none of the model's ops is one it must avoid); optimise the
graph (the fp32 reference); build the ONNX candidates the profiles' dtypes call for, and for
profiles that prefer or need TFLite the TFLite variants (``passes.tflite``, when TensorFlow and
onnx2tf are installed; otherwise a note says so); measure each candidate's quality against the
reference on the evaluation data and all latencies interleaved; for a static-int8 candidate
over budget, keep its first and last weight layers in float and try again; choose per profile
(``compressor.choose``); write artifacts and ``report.json``.

Everything is built in a scratch directory beside ``out_dir`` and renamed into place at the
end, so a failure at any point leaves no partial output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from firmware_profiles import Profile

from .choose import Decision, Measured, accuracy_drop, choose
from .errors import CompressorError
from .evaluate import (
    DatasetError,
    EvalData,
    ModelLoadError,
    ModelRunner,
    accuracy,
    agreement,
    load_eval_data,
    measure_latency_interleaved,
    open_runner,
    predict,
    quantize,
    read_npz,
)
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
from .passes.tflite import TFLITE_VARIANTS, tflite_unavailable
from .report import input_baseline, self_test_cases, tool_versions

__all__ = ["CompressOptions", "NoArtifactError", "UnsupportedTargetError", "compress",
           "wants_tflite"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


class UnsupportedTargetError(CompressorError):
    """A profile cannot run this model (format, or an op it must avoid)."""


class NoArtifactError(CompressorError):
    """For some profile no candidate met the accuracy budget; report.json says why."""


@dataclass(frozen=True)
class CompressOptions:
    """Tunables of one compression run; defaults suit models up to tens of MB here."""

    max_accuracy_drop: float = 1.0  # top-1 points (or disagreement points without labels)
    calibration_samples: int = 128
    self_test_samples: int = 4
    latency_rounds: int = 5
    latency_iterations: int = 20
    threads: int = 1
    # Share of hidden units/channels structured pruning removes; None builds no pruned
    # candidates (pruning without retraining costs accuracy, so it is opt-in).
    prune_channels: float | None = None


@dataclass(frozen=True)
class _Candidate:
    name: str
    dtype: str
    path: Path
    notes: tuple[str, ...]
    format: str = "onnx"
    # int8-full TFLite: each input's/output's dtype, scale and zero point (a runtime quantizes
    # float inputs and dequantizes outputs with them).
    io_quantization: dict[str, list[dict[str, Any]]] | None = None


@dataclass(frozen=True)
class _Reference:
    outputs: np.ndarray
    quality: tuple[float | None, float]


@dataclass(frozen=True)
class _ModelIO:
    input_name: str
    input_shape: tuple[int | str | None, ...]
    output_name: str
    ops: frozenset[str]
    signature: dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class _Job:
    model: Path
    profiles: list[Profile]
    io: _ModelIO
    calib: np.ndarray
    eval_data: EvalData
    options: CompressOptions
    progress: Progress
    tflite_missing: str | None  # why TFLite candidates cannot be built here, if they cannot


def _read_model_io(model: Path) -> _ModelIO:
    import onnx

    if model.suffix.lower() != ".onnx":
        raise ModelLoadError(f"{model}: the compressor takes an ONNX model (.onnx); export "
                             "the model to ONNX first.")
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others for bad files
        raise ModelLoadError(f"{model}: not a readable ONNX model ({exc}).") from exc
    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(graph_inputs) != 1 or len(proto.graph.output) < 1:
        raise ModelLoadError(f"{model}: the compressor handles models with exactly one input; "
                             f"this one has {len(graph_inputs)}.")

    def spec(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": dims}

    inputs = [spec(graph_inputs[0])]
    outputs = [spec(o) for o in proto.graph.output]
    return _ModelIO(input_name=graph_inputs[0].name, input_shape=tuple(inputs[0]["shape"]),
                    output_name=proto.graph.output[0].name,
                    ops=frozenset(n.op_type for n in proto.graph.node),
                    signature={"inputs": inputs, "outputs": outputs})


def _check_shape(data: np.ndarray, io: _ModelIO, source: str) -> None:
    expected = io.input_shape
    fits = data.ndim == len(expected) and all(
        not isinstance(want, int) or want <= 0 or want == got
        for want, got in zip(expected[1:], data.shape[1:], strict=True))
    if not fits:
        shown = [d if isinstance(d, int) and d > 0 else "batch" for d in expected]
        raise DatasetError(f"{source}: inputs have shape {list(data.shape)} but model input "
                           f"'{io.input_name}' expects {shown}; reshape the data to match.")
    if data.dtype != np.float32:
        raise DatasetError(f"{source}: inputs are {data.dtype}, model input "
                           f"'{io.input_name}' expects float32; convert with astype.")


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


def _check_profiles(profiles: list[Profile], io: _ModelIO, tflite_missing: str | None) -> None:
    for profile in profiles:
        if "onnx" not in profile.formats and tflite_missing is not None:
            raise UnsupportedTargetError(
                f"profile {profile.name} runs only {', '.join(profile.formats)} artifacts, and "
                f"the TFLite converter is missing here: {tflite_missing} (or drop that "
                "--profile).")
        avoided = sorted(io.ops & set(profile.avoid_ops))
        if avoided:
            raise UnsupportedTargetError(
                f"the model uses {', '.join(avoided)}, which profile {profile.name} cannot run "
                "(its avoid_ops); change the model or target another profile.")


def _load_calibration(path: Path | None, evaluation: EvalData | None,
                      limit: int) -> np.ndarray:
    if path is None:
        if evaluation is None:
            raise DatasetError("no data: pass --calibration DATA.npz and/or --eval DATA.npz "
                               "so candidates can be calibrated and checked for accuracy.")
        return evaluation.x[:limit]
    arrays = read_npz(path)
    x = arrays.get("calib_x", arrays.get("x"))
    if x is None:
        raise DatasetError(f"{path}: no 'calib_x' (or 'x') array; found {sorted(arrays)}.")
    return x[:limit]


def _candidate_passes(profile: Profile) -> list[ModelPass]:
    passes: list[ModelPass] = []
    if "int8" in profile.dtypes:
        passes += [QuantizeDynamic(), QuantizeStatic()]
    if "fp16" in profile.dtypes:
        passes.append(ConvertFp16())
    return passes


def _weight_nodes(model: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type in {"Conv", "Gemm", "MatMul"} and n.name]


def compress(model: Path, profiles: list[Profile], out_dir: Path, *,
             calibration: Path | None = None, evaluation: Path | None = None,
             options: CompressOptions = CompressOptions(),
             progress: Progress | None = None) -> dict[str, Any]:
    """Compress ``model`` for ``profiles`` into ``out_dir``; returns the report written there.

    Raises :class:`NoArtifactError` (after writing ``report.json`` and the artifacts of the
    profiles that did get one) when some profile gets no artifact within the budget.
    """
    if not profiles:
        raise CompressorError("no profile given; pass --profile NAME (see edge-compress "
                              "profiles).")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CompressorError(f"{out_dir} exists and is not empty; choose a new --out "
                              "directory or remove it.")
    io = _read_model_io(model)
    eval_data = load_eval_data(evaluation) if evaluation else None
    calib = _load_calibration(calibration, eval_data, options.calibration_samples)
    eval_data = eval_data or EvalData(x=calib, y=None)
    _check_shape(calib, io, str(calibration or evaluation))
    _check_shape(eval_data.x, io, str(evaluation or calibration))
    tflite_missing = (tflite_unavailable() if any(wants_tflite(p) for p in profiles)
                      else None)
    _check_profiles(profiles, io, tflite_missing)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        job = _Job(model, profiles, io, calib, eval_data, options,
                   progress or (lambda step, total, what: None), tflite_missing)
        report = _run(job, scratch)
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


@dataclass
class _Pool:
    """The candidates built so far, their loaded runners and measured quality."""

    reference_outputs: np.ndarray
    candidates: dict[str, _Candidate] = field(default_factory=dict)
    runners: dict[str, ModelRunner] = field(default_factory=dict)
    quality: dict[str, tuple[float | None, float]] = field(default_factory=dict)
    by_reduce_range: dict[bool, list[str]] = field(default_factory=dict)
    tflite: list[str] = field(default_factory=list)  # for the profiles that want TFLite
    notes: list[str] = field(default_factory=list)  # for report.json and the CLI

    def add(self, candidate: _Candidate, runner: ModelRunner, outputs: np.ndarray,
            eval_data: EvalData, reduce_ranges: list[bool]) -> None:
        self.candidates[candidate.name] = candidate
        self.runners[candidate.name] = runner
        self.quality[candidate.name] = _quality(outputs, self.reference_outputs, eval_data)
        for rr in reduce_ranges:
            self.by_reduce_range.setdefault(rr, []).append(candidate.name)
        if candidate.format == "tflite":
            self.tflite.append(candidate.name)

    def candidates_for(self, profile: Profile) -> list[str]:
        """The candidates built for ``profile``: ONNX ones for its reduce_range, TFLite."""
        names = self.by_reduce_range[not profile.cpu.fast_int8]
        return names + (self.tflite if wants_tflite(profile) else [])


def _plan(job: _Job) -> tuple[list[bool], list[tuple[ModelPass, bool, bool]]]:
    """Which passes to build: (pass, reduce_range, on the pruned model), each once."""
    # Candidates depend on the profiles' dtypes and on reduce_range (CPUs without VNNI or
    # dotprod); each distinct (pass, reduce_range) is built once and shared by the profiles.
    reduce_ranges = sorted({not p.cpu.fast_int8 for p in job.profiles})
    plan: list[tuple[ModelPass, bool, bool]] = []
    for rr in reduce_ranges:
        passes: dict[str, ModelPass] = {}
        for profile in job.profiles:
            if (not profile.cpu.fast_int8) == rr:
                passes.update((p.name, p) for p in _candidate_passes(profile))
        plan += [(p, rr, False) for p in passes.values()]
        if job.options.prune_channels and "int8-dynamic" in passes:
            plan.append((QuantizeDynamic(), rr, True))
    return reduce_ranges, plan


def _run(job: _Job, scratch: Path) -> dict[str, Any]:
    options, eval_data = job.options, job.eval_data
    work = scratch / "work"
    work.mkdir()
    reduce_ranges, plan = _plan(job)
    tflite_profiles, pool_notes = _tflite_plan(job)
    total = len(plan) + 3 + bool(options.prune_channels) + bool(tflite_profiles)
    step = 1
    job.progress(step, total, "optimising the fp32 graph")
    base_ctx = PassContext(workdir=work, input_name=job.io.input_name, calibration=job.calib)
    optimised = OptimizeGraph().run(job.model, base_ctx)
    runner = open_runner(optimised.model, options.threads)
    pool = _Pool(reference_outputs=predict(runner, eval_data.x), notes=pool_notes)
    pool.add(_Candidate("fp32", "fp32", optimised.model, optimised.notes), runner,
             pool.reference_outputs, eval_data, reduce_ranges)
    ref = _Reference(pool.reference_outputs, pool.quality["fp32"])
    sources = {False: optimised.model}
    if options.prune_channels:
        step += 1
        pruner = PruneChannels(options.prune_channels)
        job.progress(step, total, f"building {_pruned_name(options)}")
        pruned = pruner.run(optimised.model, base_ctx)
        sources[True] = pruned.model
        runner = open_runner(pruned.model, options.threads)
        pool.add(_Candidate(_pruned_name(options), "fp32", pruned.model, pruned.notes), runner,
                 predict(runner, eval_data.x), eval_data, reduce_ranges)

    for model_pass, rr, on_pruned in plan:
        step += 1
        prefix = f"{_pruned_name(options)}+" if on_pruned else ""
        job.progress(step, total, f"building {prefix}{model_pass.name}{'-rr' if rr else ''}")
        candidate, outputs = _build(job, model_pass, sources[on_pruned],
                                    replace(base_ctx, fast_int8=not rr), ref)
        if on_pruned:
            pruning_notes = pool.candidates[_pruned_name(options)].notes
            candidate = replace(candidate, name=prefix + candidate.name,
                                notes=(*pruning_notes, *candidate.notes))
        pool.add(candidate, open_runner(candidate.path, options.threads), outputs, eval_data,
                 [rr])

    if tflite_profiles:
        step += 1
        variants = _tflite_variants(tflite_profiles)
        job.progress(step, total, f"converting to TFLite: {len(variants)} variants")
        _add_tflite(job, pool, ConvertTflite(variants), optimised.model, base_ctx)

    step += 1
    job.progress(step, total, f"measuring latency of {len(pool.runners)} candidates")
    latency = measure_latency_interleaved(pool.runners, eval_data.x[:1], options.latency_rounds,
                                          options.latency_iterations)
    measured = {name: Measured(name, c.dtype, c.path.stat().st_size, latency[name].p50_ms,
                               latency[name].p99_ms, *pool.quality[name], format=c.format)
                for name, c in pool.candidates.items()}
    job.progress(total, total, "choosing and writing artifacts")
    return _finish(job, pool, measured, scratch / "out")


def _finish(job: _Job, pool: _Pool, measured: dict[str, Measured],
            final: Path) -> dict[str, Any]:
    """Choose per profile, then write the chosen artifacts and report.json into ``final``."""
    options, io = job.options, job.io
    final.mkdir()
    # Each format's latency bar is its own fp32 artifact: int8 LiteRT against float LiteRT.
    baselines = {fmt: measured[name] for fmt, name in (("onnx", "fp32"),
                                                       ("tflite", "tflite-fp32"))
                 if name in measured}
    decisions = {p.name: choose([measured[n] for n in pool.candidates_for(p)],
                                measured["fp32"], options.max_accuracy_drop, p.dtypes,
                                formats=p.formats, baselines=baselines)
                 for p in job.profiles}
    variants = _write_variants(job.model, decisions, pool.candidates, measured, final)
    golden = job.eval_data.x[:options.self_test_samples]
    expected = pool.reference_outputs[:len(golden)]
    chosen = {d.chosen.name for d in decisions.values() if d.chosen}
    deviations = {name: float(np.max(np.abs(predict(pool.runners[name], golden) - expected)))
                  for name in chosen}
    deviation = max(deviations.values(), default=0.0)
    for variant in variants:
        # Each artifact's own tolerance, for a runtime that checks it alone; the shared
        # self_test below must pass every chosen artifact, so it takes the largest.
        variant["self_test_atol"] = max(1e-4, 2 * deviations[variant["candidate"]])
        quantization = pool.candidates[variant["candidate"]].io_quantization
        if quantization is not None:
            variant["self_test"] = _integer_self_test(io, quantization, golden, expected,
                                                      predict(pool.runners[variant["candidate"]],
                                                              golden))
    report: dict[str, Any] = {
        "format_version": 1,
        "model": {"file": job.model.name, "size_bytes": job.model.stat().st_size},
        "profiles": [p.name for p in job.profiles],
        "max_accuracy_drop": options.max_accuracy_drop,
        "variants": variants,
        "decisions": [_decision_json(name, d) for name, d in decisions.items()],
        "candidates": [_measured_json(m, measured["fp32"], pool.candidates[m.name])
                       for m in measured.values()],
        "notes": pool.notes,
        **io.signature,
        # Tolerance: twice the largest deviation any chosen artifact showed on these samples,
        # so each passes its own self-test and a wrong or corrupted model does not.
        "self_test": self_test_cases(io.input_name, io.output_name, golden, expected,
                                     max(1e-4, 2 * deviation)),
        "baseline": input_baseline(io.input_name, job.calib),
        "tools": tool_versions(),
    }
    (final / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _build(job: _Job, model_pass: ModelPass, source: Path, ctx: PassContext,
           ref: _Reference) -> tuple[_Candidate, np.ndarray]:
    """Run one candidate pass; for static int8 over budget, keep sensitive layers in float."""
    options, eval_data = job.options, job.eval_data
    result = model_pass.run(source, ctx)
    dtype = "fp16" if isinstance(model_pass, ConvertFp16) else "int8"
    outputs = predict(open_runner(result.model, options.threads), eval_data.x)
    if isinstance(model_pass, QuantizeStatic):
        weights = _weight_nodes(source)
        for keep in (1, 2):
            drop = _drop(outputs, ref, eval_data)
            if drop <= options.max_accuracy_drop or len(weights) <= 2 * keep:
                break
            # The first and last weight layers are the usual int8 casualties (raw inputs, and
            # logits whose small margins decide the top-1); keep them in float and retry.
            exclude = (*weights[:keep], *weights[-keep:])
            log.info("int8-static drop %.2f over budget; keeping %s in float", drop, exclude)
            result = replace(model_pass, exclude=exclude).run(source, ctx)
            outputs = predict(open_runner(result.model, options.threads), eval_data.x)
    name = f"{model_pass.name}{'' if ctx.fast_int8 else '-rr'}"
    return _Candidate(name, dtype, result.model, result.notes), outputs


def _pruned_name(options: CompressOptions) -> str:
    return f"{PruneChannels.name}{int((options.prune_channels or 0) * 100)}"


def _quality(outputs: np.ndarray, ref_out: np.ndarray,
             eval_data: EvalData) -> tuple[float | None, float]:
    acc = accuracy(outputs, eval_data.y) if eval_data.y is not None else None
    return acc, agreement(outputs, ref_out).top1


def _drop(outputs: np.ndarray, ref: _Reference, eval_data: EvalData) -> float:
    acc, agree = _quality(outputs, ref.outputs, eval_data)
    probe = Measured("", "", 0, 0.0, 0.0, acc, agree)
    return accuracy_drop(probe, Measured("", "", 0, 0.0, 0.0, *ref.quality))


def _write_variants(model: Path, decisions: dict[str, Decision],
                    candidates: dict[str, _Candidate], measured: dict[str, Measured],
                    final: Path) -> list[dict[str, Any]]:
    variants = []
    for profile, decision in decisions.items():
        if decision.chosen is None:
            continue
        chosen = candidates[decision.chosen.name]
        file = f"{model.stem}.{profile}.{chosen.name}.{chosen.format}"
        shutil.copyfile(chosen.path, final / file)
        entry = {"file": file, "format": chosen.format, "dtype": chosen.dtype,
                 "profile": profile, "candidate": chosen.name,
                 **_measured_json(decision.chosen, measured["fp32"], replace(chosen, notes=()))}
        variants.append(entry)
    return variants


def _measured_json(m: Measured, reference: Measured, candidate: _Candidate) -> dict[str, Any]:
    out = {"name": m.name, "format": m.format, "dtype": m.dtype, "size_bytes": m.size_bytes,
           "accuracy": None if m.accuracy is None else round(m.accuracy, 2),
           "accuracy_drop": round(accuracy_drop(m, reference), 2),
           "top1_agreement": round(m.agreement, 4),
           "latency_p50_ms": round(m.latency_p50_ms, 4),
           "latency_p99_ms": round(m.latency_p99_ms, 4),
           "sparsity": 0.0, "notes": list(candidate.notes)}
    if candidate.io_quantization is not None:
        out["io_quantization"] = candidate.io_quantization
    return out


def _decision_json(profile: str, decision: Decision) -> dict[str, Any]:
    return {"profile": profile,
            "chosen": decision.chosen.name if decision.chosen else None,
            "rejected": [{"candidate": r.name, "reason": r.reason} for r in decision.rejected],
            "notes": list(decision.notes)}


def _integer_self_test(io: _ModelIO, quantization: dict[str, list[dict[str, Any]]],
                       golden: np.ndarray, expected: np.ndarray,
                       outputs: np.ndarray) -> list[dict[str, Any]]:
    """Golden cases in an int8-full artifact's own integer I/O, for runtimes that feed it raw.

    Inputs are the float golden inputs quantized with the input's parameters; expected
    outputs are the fp32 reference's outputs quantized with the output's, and the tolerance,
    in quantization steps, is twice the largest difference the artifact showed (at least 1).
    """
    (inp,), (out, *_) = quantization["inputs"], quantization["outputs"]
    q_in = quantize(golden, inp["scale"], inp["zero_point"], inp["dtype"])
    q_expected = quantize(expected, out["scale"], out["zero_point"], out["dtype"])
    q_got = quantize(outputs, out["scale"], out["zero_point"], out["dtype"])
    steps = int(np.max(np.abs(q_got.astype(np.int32) - q_expected.astype(np.int32))))
    return self_test_cases(io.input_name, io.output_name, q_in, q_expected,
                           float(max(1, 2 * steps)))


def _tflite_plan(job: _Job) -> tuple[list[Profile], list[str]]:
    """The profiles to convert to TFLite for, and a note when the converter is missing."""
    profiles = [p for p in job.profiles if wants_tflite(p)]
    if not profiles or job.tflite_missing is None:
        return profiles, []
    note = (f"no TFLite candidates for {', '.join(p.name for p in profiles)}: "
            f"{job.tflite_missing}")
    log.warning("%s", note)
    return [], [note]


def _tflite_variants(profiles: list[Profile]) -> tuple[str, ...]:
    """The TFLite variants the profiles' dtypes call for; fp32 always (the latency bar)."""
    dtypes = {d for p in profiles for d in p.dtypes}
    return tuple(v for v, d in TFLITE_VARIANTS.items() if v == "tflite-fp32" or d in dtypes)


def _add_tflite(job: _Job, pool: _Pool, converter: ConvertTflite, source: Path,
                ctx: PassContext) -> None:
    """Convert, then evaluate each TFLite variant into the pool; failures become notes."""
    try:
        built = converter.build(source, ctx, (job.io.output_name,))
    except PassError as exc:  # TfliteUnavailableError included: a note, never a crash
        pool.notes.append(f"no TFLite candidates: {exc}")
        log.warning("no TFLite candidates: %s", exc)
        return
    if not built.artifacts:
        pool.notes.append("no TFLite candidates: every variant failed to convert")
    pool.notes += [f"{name} not built: {reason}" for name, reason in built.skipped.items()]
    for artifact in built.artifacts:
        try:
            runner = open_runner(artifact.path, job.options.threads)
            outputs = predict(runner, job.eval_data.x)
        except (ModelLoadError, RuntimeError, ValueError) as exc:
            # The converter can emit models LiteRT then refuses or fails on (say, a quantized
            # division whose divisor rounds to zero): not a candidate, and the note says why.
            pool.notes.append(f"{artifact.name} not offered: LiteRT cannot run it "
                              f"({str(exc).splitlines()[0][:200]})")
            continue
        if outputs.shape != pool.reference_outputs.shape:
            # onnx2tf moves 3-D+ outputs to channels-last; a runtime would hand callers a
            # tensor in another layout than the ONNX model's, so the variant is not offered.
            pool.notes.append(f"{artifact.name} not offered: its output has shape "
                              f"{list(outputs.shape[1:])} per sample where the ONNX model's "
                              f"has {list(pool.reference_outputs.shape[1:])} (layout changed "
                              "by the converter)")
            continue
        candidate = _Candidate(artifact.name, artifact.dtype, artifact.path, artifact.notes,
                               "tflite", artifact.io_quantization)
        pool.add(candidate, runner, outputs, job.eval_data, [])

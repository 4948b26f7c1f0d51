"""The end of a run: choose per profile, copy the chosen artifacts, write ``report.json``.

Golden self-test cases are whole model calls (every input, every output); report.json
carries as many as fit ``CompressOptions.self_test_budget_bytes`` and, when some do not fit,
all of them go to ``self_test.npz`` beside it, so the report (which the bundle embeds) stays
small whatever the model's input size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from firmware_profiles import Profile

from .candidates import Candidate, Pool
from .choose import Decision, Measured, Rejection, choose
from .dataset import save_calls
from .evaluate import matched
from .job import Job
from .metrics import Metric, Quality
from .report import (
    cases_within_budget,
    input_baseline,
    output_baseline,
    self_test_cases,
    tool_versions,
)
from .runner import ModelRunner, quantize

__all__ = ["Finish", "write_output"]

#: Where golden cases that do not fit report.json go, beside it.
SELF_TEST_FILE = "self_test.npz"


@dataclass(frozen=True)
class Finish:
    """What the end of a run needs besides the job and the pool."""

    reference: str  # the candidate every other one is gated against (ONNX fp32, usually)
    # Golden cases: whole calls of the evaluation data, and the original model's outputs.
    golden: Sequence[Mapping[str, np.ndarray]]
    expected: Sequence[Mapping[str, np.ndarray]]
    tflite_problem: str | None  # why TFLite candidates are missing, if they are
    wants_tflite: Mapping[str, bool]  # by profile name
    metrics: Mapping[str, Metric]  # by output name ("none" for outputs not scored)
    # The reference's outputs over the evaluation data, one row per sample (output baseline).
    reference_outputs: Mapping[str, np.ndarray]


def write_output(job: Job, pool: Pool, measured: dict[str, Measured], finish: Finish,
                 final: Path) -> dict[str, Any]:
    """Choose per profile, then write the chosen artifacts and report.json into ``final``."""
    options = job.options
    final.mkdir()
    reference = measured[finish.reference]
    # Each format's latency bar is its own fp32 artifact: int8 LiteRT against float LiteRT.
    baselines = {c.format: measured[name] for name, c in pool.candidates.items()
                 if c.dtype == "fp32" and name in {"fp32", "tflite-fp32"}}
    decisions = {p.name: _decide(pool, measured, p, reference=reference, finish=finish,
                                 max_drop=options.max_accuracy_drop, baselines=baselines)
                 for p in job.profiles}
    variants = _write_variants(job.model, decisions, pool, final)
    golden, expected = finish.golden, finish.expected
    chosen = {d.chosen.name for d in decisions.values() if d.chosen}
    deviations = {name: _deviation(pool.runners[name], golden, expected) for name in chosen}
    deviation = max(deviations.values(), default=0.0)
    kept = cases_within_budget(golden, expected, options.self_test_budget_bytes,
                               options.max_case_bytes)
    for variant in variants:
        # Each artifact's own tolerance, for a runtime that checks it alone; the shared
        # self_test below must pass every chosen artifact, so it takes the largest.
        name = variant["candidate"]
        variant["self_test_atol"] = max(1e-4, 2 * deviations[name])
        quantization = pool.candidates[name].io_quantization
        if quantization is not None:
            outputs = [pool.runners[name].run(call) for call in golden[:kept]]
            variant["self_test"] = _integer_self_test(quantization, golden[:kept],
                                                      expected[:kept], outputs)
    report: dict[str, Any] = {
        "format_version": 1,
        "model": {"file": job.model.name, "format": job.source_format,
                  "size_bytes": job.model.stat().st_size},
        "profiles": [p.name for p in job.profiles],
        "max_accuracy_drop": options.max_accuracy_drop,
        "metrics": {name: str(metric) for name, metric in finish.metrics.items()},
        "state": [{"output": p.output, "input": p.input} for p in job.binding.state],
        "variants": variants,
        "decisions": [_decision_json(name, d) for name, d in decisions.items()],
        "candidates": [_measured_json(m, pool.candidates[m.name], pool.quality[m.name])
                       for m in measured.values()],
        "failed": [f.to_json() for f in pool.failures.values()],
        "notes": pool.notes,
        **job.signature.to_json(),
        # Tolerance: twice the largest deviation any chosen artifact showed on these cases,
        # so each passes its own self-test and a wrong or corrupted model does not.
        "self_test": self_test_cases(golden[:kept], expected[:kept], max(1e-4, 2 * deviation)),
        "baseline": {
            **input_baseline(_baseline_inputs(job), max_features=options.baseline_features),
            "outputs": output_baseline(finish.reference_outputs,
                                       {n: m.kind for n, m in finish.metrics.items()})},
        "tools": tool_versions(),
    }
    if kept < len(golden):
        _save_cases(golden, expected, final / SELF_TEST_FILE)
        report["self_test_file"] = SELF_TEST_FILE
        report["notes"] = [*pool.notes, f"report.json carries {kept} of {len(golden)} golden "
                           f"cases (budget {options.self_test_budget_bytes} bytes); all are "
                           f"in {SELF_TEST_FILE}"]
    (final / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def _decide(pool: Pool, measured: dict[str, Measured], profile: Profile, *,
            reference: Measured, finish: Finish, max_drop: float,
            baselines: Mapping[str, Measured]) -> Decision:
    wants, formats = finish.wants_tflite[profile.name], profile.formats
    names = list(dict.fromkeys(pool.names_for(not profile.cpu.fast_int8, wants)))
    decision = choose([measured[n] for n in names if n in measured], reference, max_drop,
                      profile.dtypes, formats=formats, baselines=baselines)
    failed = tuple(Rejection(n, f"{pool.failures[n].stage} failed: {pool.failures[n].reason}")
                   for n in names if n in pool.failures)
    notes = decision.notes
    if wants and decision.chosen is not None and decision.chosen.format != "tflite":
        why = finish.tflite_problem or "no TFLite candidate qualified (see rejected)"
        notes = (*notes, f"wanted TFLite (formats {', '.join(formats)}) but got "
                         f"{decision.chosen.format}: {why}")
    return replace(decision, rejected=(*decision.rejected, *failed), notes=notes)


def _write_variants(model: Path, decisions: dict[str, Decision], pool: Pool,
                    final: Path) -> list[dict[str, Any]]:
    variants = []
    for profile, decision in decisions.items():
        if decision.chosen is None:
            continue
        chosen = pool.candidates[decision.chosen.name]
        file = f"{model.stem}.{profile}.{chosen.name}.{chosen.format}"
        shutil.copyfile(chosen.path, final / file)
        entry = {"file": file, "format": chosen.format, "dtype": chosen.dtype,
                 "profile": profile, "candidate": chosen.name,
                 **_measured_json(decision.chosen, replace(chosen, notes=()),
                                  pool.quality[chosen.name])}
        variants.append(entry)
    return variants


def _deviation(runner: ModelRunner, calls: Sequence[Mapping[str, np.ndarray]],
               expected: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The largest absolute difference from the expected outputs over the golden calls."""
    worst = 0.0
    for call, want in zip(calls, expected, strict=True):
        got = matched(runner.run(call), want)
        for name, value in want.items():
            diff = np.abs(got[name].astype(np.float64) - value.astype(np.float64))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _baseline_inputs(job: Job) -> dict[str, np.ndarray]:
    """Calibration inputs by name, one row per sample (per call for sequences)."""
    varying = job.binding.varying(job.calibration)
    if job.binding.sequences:
        return {n: v.reshape(-1, *v.shape[2:]) for n, v in varying.items()}
    return varying


def _save_cases(calls: Sequence[Mapping[str, np.ndarray]],
                expected: Sequence[Mapping[str, np.ndarray]], path: Path) -> None:
    """Every golden case: ``<case>/<input>`` as :func:`save_calls` writes calls, and the
    expected outputs under ``<case>/expected/<output>``."""
    merged = [{**call, **{f"expected/{n}": v for n, v in outs.items()}}
              for call, outs in zip(calls, expected, strict=True)]
    save_calls(merged, path)


def _measured_json(m: Measured, candidate: Candidate, quality: Quality) -> dict[str, Any]:
    first = next(iter(quality.outputs.values()), None)
    out = {"name": m.name, "format": m.format, "dtype": m.dtype, "size_bytes": m.size_bytes,
           # The first scored output's labelled score (the single-output report's accuracy).
           "accuracy": round(first.score, 2) if first and quality.labelled else None,
           "accuracy_drop": round(m.drop, 2),
           "quality": {name: {"metric": q.metric, "score": round(q.score, 4),
                              "reference_score": round(q.reference_score, 4),
                              "drop": round(q.drop, 4), **q.details}
                       for name, q in quality.outputs.items()},
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


def _integer_self_test(quantization: dict[str, list[dict[str, Any]]],
                       calls: Sequence[Mapping[str, np.ndarray]],
                       expected: Sequence[Mapping[str, np.ndarray]],
                       outputs: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Golden cases in an int8-full artifact's own integer I/O, for runtimes that feed it raw.

    Inputs are the float golden inputs quantized with each input's parameters; expected
    outputs are the reference's outputs quantized with each output's, and the tolerance, in
    quantization steps, is twice the largest difference the artifact showed (at least 1).
    """
    def by_name(params: list[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any]]:
        known = {p["name"]: p for p in params}
        return {n: known.get(n, params[i]) for i, n in enumerate(names) if i < len(params)}

    q_calls, q_expected, steps = [], [], 0
    for call, want, got in zip(calls, expected, outputs, strict=True):
        ins = by_name(quantization["inputs"], list(call))
        outs = by_name(quantization["outputs"], list(want))
        q_calls.append({n: _quantize(v, ins[n]) if n in ins else v for n, v in call.items()})
        q_want = {n: _quantize(v, outs[n]) for n, v in want.items() if n in outs}
        q_got = {n: _quantize(v, outs[n]) for n, v in matched(got, want).items() if n in outs}
        for name, value in q_want.items():
            diff = np.abs(q_got[name].astype(np.int32) - value.astype(np.int32))
            steps = max(steps, int(diff.max()) if diff.size else 0)
        q_expected.append(q_want)
    return self_test_cases(q_calls, q_expected, float(max(1, 2 * steps)))


def _quantize(value: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return quantize(value, params["scale"], params["zero_point"], params["dtype"])

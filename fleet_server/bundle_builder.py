"""``fleet bundle build``: gather artifacts, describe them, sign them with the key store.

Inputs (docs/bundle-format.md, "Build inputs"): a directory as written by ``edge-compress``
(artifact files plus an optional ``report.json``) or a single model file. The model's
input/output signature is read from an ONNX artifact when the ``onnx`` package is importable,
else taken from report.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bundle.crypto import public_key_from_bytes
from bundle.errors import BundleError
from bundle.manifest import TensorSpec, self_tests_from_obj, tensor_specs_from_obj
from bundle.signing import ArtifactInput, BundleSpec, build_bundle
from common.atomic import write_atomic

from .errors import BundleInputError
from .keys import KeyStore, RepositoryState

__all__ = ["BuildRequest", "build", "load_artifacts"]

log = logging.getLogger(__name__)

#: Used when report.json is absent: file extension -> artifact format (dtype fp32).
FORMATS_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}


@dataclass(frozen=True)
class BuildRequest:
    """Arguments of ``fleet bundle build``, already parsed."""

    name: str
    version: int
    keys_dir: Path
    out: Path
    artifacts_dir: Path | None = None
    model: Path | None = None
    profiles: tuple[str, ...] = ()
    encrypt_for: tuple[Path, ...] = ()
    valid_days: int = 30


@dataclass(frozen=True)
class _Inputs:
    artifacts: tuple[ArtifactInput, ...]
    report: dict[str, Any]


def build(request: BuildRequest) -> BundleSpec:
    """Build, sign and write the bundle; returns what was put in it."""
    store = KeyStore.at(request.keys_dir)
    state = store.state()
    last = state.models.get(request.name)
    if last is not None and request.version <= last:
        raise BundleInputError(f"{request.name} v{last} was already built; versions only go "
                               f"up, use --version {last + 1} or higher")
    inputs = _gather(request)
    spec = _spec(request, inputs)
    recipients = [public_key_from_bytes(_read(p)) for p in request.encrypt_for]
    version = state.metadata_version + 1
    online = {role: store.signers(role) for role in ("targets", "snapshot", "timestamp")}
    expires = (datetime.now(timezone.utc) + timedelta(days=request.valid_days)).replace(
        microsecond=0)
    data = build_bundle(spec, root_chain=store.root_chain(), signers=online,
                        metadata_version=version, expires=expires, recipients=recipients)
    try:
        write_atomic(request.out, data)
    except OSError as exc:
        raise BundleInputError(f"cannot write {request.out} ({exc.strerror})") from exc
    store.save_state(RepositoryState(version, {**state.models, request.name: request.version}))
    log.info("built %s v%d (%d bytes, metadata v%d)", spec.name, spec.version, len(data),
             version)
    return spec


def load_artifacts(directory: Path) -> tuple[tuple[ArtifactInput, ...], dict[str, Any]]:
    """Artifacts and report of an ``edge-compress`` output directory."""
    if not directory.is_dir():
        raise BundleInputError(f"{directory} is not a directory; point --artifacts at "
                               "edge-compress output")
    report_path = directory / "report.json"
    if not report_path.exists():
        files = sorted(p for p in directory.iterdir() if p.suffix in FORMATS_BY_SUFFIX)
        if not files:
            raise BundleInputError(f"{directory} has no report.json and no .onnx or .tflite "
                                   "files; point --artifacts at edge-compress output")
        return tuple(_artifact(p, FORMATS_BY_SUFFIX[p.suffix], "fp32", None)
                     for p in files), {}
    try:
        report = json.loads(_read(report_path))
        variants = report["variants"]
        artifacts = tuple(
            _artifact(_inside(directory, str(v["file"])), str(v["format"]), str(v["dtype"]),
                      None if v.get("profile") is None else str(v["profile"]))
            for v in variants)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleInputError(f"{report_path} is invalid ({exc!r}); it needs a 'variants' "
                               "list of {file, format, dtype, profile}") from exc
    if not isinstance(report, dict) or not artifacts:
        raise BundleInputError(f"{report_path} lists no variants")
    return artifacts, report


def _gather(request: BuildRequest) -> _Inputs:
    if request.model is not None and request.artifacts_dir is None:
        suffix = request.model.suffix
        fmt = FORMATS_BY_SUFFIX.get(suffix, suffix.lstrip(".") or "bin")
        return _Inputs((_artifact(request.model, fmt, "fp32", None),), {})
    if request.artifacts_dir is not None and request.model is None:
        return _Inputs(*load_artifacts(request.artifacts_dir))
    raise BundleInputError("give exactly one of --artifacts DIR or --model FILE")


def _spec(request: BuildRequest, inputs: _Inputs) -> BundleSpec:
    report = inputs.report
    profiles = request.profiles or tuple(report.get("profiles", ())) or tuple(
        sorted({a.profile for a in inputs.artifacts if a.profile is not None}))
    if not profiles:
        raise BundleInputError("no target profile: give --profile NAME (repeatable) or list "
                               "profiles in report.json")
    try:
        io_from_onnx = _onnx_signature(inputs.artifacts)
        signature = io_from_onnx or (
            tensor_specs_from_obj(report.get("inputs", []), "report.inputs"),
            tensor_specs_from_obj(report.get("outputs", []), "report.outputs"))
        self_test = self_tests_from_obj(report.get("self_test", []), "report.self_test")
        baseline = report.get("baseline", {})
        if not isinstance(baseline, dict):
            raise BundleInputError("report.json 'baseline' must be an object")
    except BundleError as exc:
        raise BundleInputError(f"report.json: {exc}") from exc
    return BundleSpec(name=request.name, version=request.version, profiles=profiles,
                      artifacts=inputs.artifacts, inputs=signature[0], outputs=signature[1],
                      self_test=self_test, baseline=baseline, compression_report=report)


def _onnx_signature(artifacts: Sequence[ArtifactInput],
                    ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None:
    """Inputs and outputs of the first ONNX artifact, or ``None`` without ``onnx``."""
    model_bytes = next((a.data for a in artifacts if a.format == "onnx"), None)
    if model_bytes is None:
        return None
    try:
        import onnx
        from onnx import helper
    except ImportError:
        log.info("onnx is not installed: taking the model signature from report.json")
        return None
    try:
        graph = onnx.load_model_from_string(model_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others without a common root
        raise BundleInputError(f"the ONNX artifact does not parse ({exc})") from exc
    initializers = {i.name for i in graph.initializer}

    def specs(values: Any) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in t.shape.dim)
            out.append(TensorSpec(v.name, helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                                  dims))
        return tuple(out)

    return specs(graph.input), specs(graph.output)


def _artifact(path: Path, fmt: str, dtype: str, profile: str | None) -> ArtifactInput:
    return ArtifactInput(file_name=path.name, data=_read(path), format=fmt, dtype=dtype,
                         profile=profile)


def _inside(directory: Path, name: str) -> Path:
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise BundleInputError(f"report.json names {name!r}, outside {directory}")
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleInputError(f"cannot read {path} ({exc.strerror})") from exc

"""``fleet bundle build``: gather artifacts, describe them, sign them with the key store.

Inputs (docs/bundle-format.md, "Build inputs"): a directory as written by ``edge-compress``
(artifact files plus an optional ``report.json``) or a single model file. The model's
input/output signature is read from an ONNX artifact when the ``onnx`` package is importable,
else taken from report.json.

Versions: the model version is the operator's (``--version``) and must exceed every earlier
build of the model; the metadata version is the next one. Both are counted in the key
store (``KEYS/repository/state.json``) and, given a server (``--data``/``--server``), also
above every bundle that server stores, re-releases included (:mod:`fleet_server.releases`).
Recipients for encryption are X25519 public key files, or ``device:ID``, ``group:G``,
``profile:P`` selectors resolved with the server's list of devices.

Composites (``--composite DECL.json``): the ``composite`` declaration ``edge-compress
composite ... --declare`` prints goes into the manifest as it is; its members must be
artifacts of the build (``artifacts/<file name>``), which signing checks.

Deltas (``--delta-from OLD.efb``, repeatable): for each earlier bundle of the model, a
delta bundle of the same release is written beside ``--out`` as ``STEM.from-vN.efb``; it
carries, for every artifact whose file name the old bundle has too, the delta that
rebuilds it from the old one (docs/bundle-format.md §8). ``fleet publish`` uploads them
with the full bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bundle.composite import CompositeDecl, composite_from_obj
from bundle.crypto import public_key_from_bytes
from bundle.errors import BundleError
from bundle.manifest import TensorSpec, self_tests_from_obj, tensor_specs_from_obj
from bundle.signing import ArtifactInput, BundleSpec, DeltaBase, build_release, read_contents
from common.atomic import write_atomic

from .api_client import ServerClient
from .errors import BundleInputError, FleetError
from .keys import KeyStore, RepositoryState
from .recipients import Candidate, is_selector, select_recipients

__all__ = ["BuildRequest", "Built", "build", "delta_path", "load_artifacts"]

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
    #: Public key files (PEM) and ``device:``/``group:``/``profile:`` selectors.
    encrypt_for: tuple[str, ...] = ()
    valid_days: int = 30
    #: The fleet server to take versions and recipients' keys from (None: the key store's
    #: counts only, key files only).
    server: ServerClient | None = None
    #: Earlier bundles of the model to write delta bundles from.
    delta_from: tuple[Path, ...] = ()
    #: A composite declaration (JSON file) to serve the model as an ensemble or cascade.
    composite: Path | None = None


@dataclass(frozen=True)
class Built:
    """What :func:`build` wrote: the spec, the full bundle's size, and per base version the
    delta bundle's path and size."""

    spec: BundleSpec
    size: int
    deltas: dict[int, tuple[Path, int]]


def delta_path(out: Path, base_version: int) -> Path:
    """Where the delta bundle from ``base_version`` of the bundle at ``out`` is written."""
    return out.with_name(f"{out.stem}.from-v{base_version}{out.suffix}")


@dataclass(frozen=True)
class _Inputs:
    artifacts: tuple[ArtifactInput, ...]
    report: dict[str, Any]


def build(request: BuildRequest) -> Built:
    """Build, sign and write the bundle (and its delta bundles); returns what was written."""
    store = KeyStore.at(request.keys_dir)
    state = store.state()
    released_model, released_metadata = _released(request)
    last = max(state.models.get(request.name, 0), released_model)
    if request.version <= last:
        raise BundleInputError(f"{request.name} v{last} was already built or released; "
                               f"versions only go up, use --version {last + 1} or higher")
    inputs = _gather(request)
    inputs = _Inputs(_with_bases(request, inputs.artifacts), inputs.report)
    spec = _spec(request, inputs)
    recipients = _recipients(request)
    version = max(state.metadata_version, released_metadata) + 1
    online = {role: store.signers(role) for role in ("targets", "snapshot", "timestamp")}
    expires = (datetime.now(timezone.utc) + timedelta(days=request.valid_days)).replace(
        microsecond=0)
    try:
        release = build_release(spec, root_chain=store.root_chain(), signers=online,
                                metadata_version=version, expires=expires,
                                recipients=recipients)
    except BundleError as exc:
        raise BundleInputError(str(exc)) from exc
    written = {base: (delta_path(request.out, base), data)
               for base, data in release.deltas.items()}
    try:
        for path, data in written.values():
            write_atomic(path, data)
        write_atomic(request.out, release.full)
    except OSError as exc:
        raise BundleInputError(f"cannot write {exc.filename} ({exc.strerror})") from exc
    store.save_state(RepositoryState(version, {**state.models, request.name: request.version}))
    log.info("built %s v%d (%d bytes, metadata v%d)", spec.name, spec.version,
             len(release.full), version)
    return Built(spec, len(release.full),
                 {base: (path, len(data)) for base, (path, data) in written.items()})


def _with_bases(request: BuildRequest, artifacts: tuple[ArtifactInput, ...],
                ) -> tuple[ArtifactInput, ...]:
    """``artifacts``, each with the same file of every ``--delta-from`` bundle as a base."""
    bases: dict[str, list[DeltaBase]] = {}
    for path in request.delta_from:
        version, files = _base_artifacts(path, request)
        for name, data in files.items():
            bases.setdefault(name, []).append(DeltaBase(version, data))
    if request.delta_from and not any(a.file_name in bases for a in artifacts):
        raise BundleInputError("no artifact of this build has the file name of an artifact "
                               "in the --delta-from bundles; deltas pair artifacts by name")
    return tuple(replace(a, bases=tuple(bases.get(a.file_name, ()))) for a in artifacts)


def _base_artifacts(path: Path, request: BuildRequest) -> tuple[int, dict[str, bytes]]:
    """The version and the artifacts (file name -> bytes) of an earlier bundle of the
    model. Its artifacts are checked against its manifest; its signatures are not (it may
    have expired since: it is only the reference the deltas are computed against, and a
    device checks the base it holds against the new manifest)."""
    try:
        contents = read_contents(path)
    except OSError as exc:
        raise BundleInputError(f"cannot read {path} ({exc.strerror})") from exc
    except BundleError as exc:
        raise BundleInputError(f"{path} is not a bundle ({exc})") from exc
    manifest = contents.manifest
    if manifest.key_wrap is not None:
        raise BundleInputError(f"{path} is encrypted; deltas need the plain bundle")
    files = {p.removeprefix("artifacts/"): d for p, d in contents.artifacts.items()}
    if manifest.name != request.name or manifest.version >= request.version:
        raise BundleInputError(f"{path} holds {manifest.name} v{manifest.version}; "
                               f"--delta-from takes earlier bundles of {request.name}")
    return manifest.version, files


def _released(request: BuildRequest) -> tuple[int, int]:
    """The highest version of the model and the highest metadata version the server
    stores ((0, 0) without a server)."""
    if request.server is None:
        return 0, 0
    bundles = request.server.get("/api/bundles")["bundles"]
    return (max((int(b["version"]) for b in bundles if b["name"] == request.name), default=0),
            max((int(b.get("metadata_version") or 0) for b in bundles), default=0))


def _recipients(request: BuildRequest) -> list[X25519PublicKey]:
    selectors = [e for e in request.encrypt_for if is_selector(e)]
    keys = [public_key_from_bytes(_read(Path(e))) for e in request.encrypt_for
            if not is_selector(e)]
    if not selectors:
        return keys
    if request.server is None:
        raise BundleInputError(f"--encrypt-for {selectors[0]} needs the devices' keys from "
                               "the fleet server: give --data DIR or --server URL")
    devices = request.server.get("/api/devices")["devices"]
    try:
        chosen = select_recipients(selectors, (
            Candidate(d["id"], d["group"], d["profile"], d.get("encryption_key"))
            for d in devices))
    except FleetError as exc:
        raise BundleInputError(str(exc)) from exc
    log.info("encrypting for %d device(s): %s", len(chosen.devices), ", ".join(chosen.devices))
    return keys + list(chosen.keys)


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
                      self_test=self_test, baseline=baseline, compression_report=report,
                      composite=None if request.composite is None
                      else _composite(request.composite))


def _composite(path: Path) -> CompositeDecl:
    """The composite declaration in ``path``; BundleInputError names what is wrong."""
    try:
        return composite_from_obj(json.loads(_read(path)))
    except ValueError as exc:
        raise BundleInputError(f"{path} is not JSON ({exc}); give the declaration "
                               "`edge-compress composite ... --declare` prints") from exc
    except BundleError as exc:
        raise BundleInputError(f"{path}: {exc}") from exc


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

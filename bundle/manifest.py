"""The bundle manifest: what a bundle contains, as frozen dataclasses.

The data model is separate from its serialization (like tuf's ``api/metadata.py``): the
dataclasses below hold parsed values; :func:`manifest_from_json` and :func:`manifest_to_json`
convert to and from the canonical bytes stored as ``manifest.json`` in a bundle. Fields this
reader does not know are kept in ``unrecognized`` and written back unchanged, so an older
server can re-sign a newer manifest without losing data. See docs/bundle-format.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.names import is_valid_name

from .composite import CompositeDecl, composite_from_obj, composite_to_obj
from .errors import MalformedBundleError

__all__ = [
    "FORMAT_VERSION",
    "MAX_VERSION",
    "ArtifactDelta",
    "ArtifactEncryption",
    "ArtifactVariant",
    "KeyWrap",
    "Manifest",
    "Recipient",
    "SelfTestCase",
    "Tensor",
    "TensorSpec",
    "canonical_json",
    "manifest_from_json",
    "manifest_to_json",
    "self_tests_from_obj",
    "tensor_specs_from_obj",
]

#: The manifest layout this code writes; readers reject a higher one (fields may be added
#: within a format version, never removed or changed in meaning).
FORMAT_VERSION = 1
#: The highest model version: devices report versions as protocol integers and the
#: registry stores them as SQL BIGINT, both at most 2**63 - 1.
MAX_VERSION = 2**63 - 1

_ARTIFACT_PATH = re.compile(r"artifacts/[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, element type and shape (``None`` = dynamic dim)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Tensor:
    """A concrete tensor: raw little-endian C-order ``data`` of ``dtype`` and ``shape``."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class SelfTestCase:
    """Golden inputs and the outputs the model must reproduce within the tolerances."""

    inputs: Mapping[str, Tensor]
    expected_outputs: Mapping[str, Tensor]
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class ArtifactEncryption:
    """How one stored artifact was encrypted (AES-256-GCM under the bundle's content key)."""

    nonce: bytes
    plaintext_sha256: str
    plaintext_size: int


@dataclass(frozen=True)
class ArtifactDelta:
    """A delta that rebuilds an artifact from the same variant of an earlier version.

    ``path`` is its TUF target (signed like the artifacts: ``sha256`` and ``size`` are of
    the delta's bytes); ``base_sha256`` is the sha256 of the earlier version's artifact,
    which the device must hold. A bundle file carries either the artifacts or the deltas
    from one base version (docs/bundle-format.md §8).
    """

    path: str
    base_version: int
    base_sha256: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactVariant:
    """One artifact file: a model in one format/dtype, optionally for one profile.

    ``sha256`` and ``size`` describe the bytes stored in the bundle (the ciphertext when
    ``encryption`` is set); they must equal the signed TUF target info for ``path``.
    """

    path: str
    format: str
    dtype: str
    sha256: str
    size: int
    profile: str | None = None
    encryption: ArtifactEncryption | None = None
    deltas: tuple[ArtifactDelta, ...] = ()
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    def delta_from(self, base_version: int) -> ArtifactDelta | None:
        """The delta that rebuilds this artifact from ``base_version``, if there is one."""
        return next((d for d in self.deltas if d.base_version == base_version), None)


@dataclass(frozen=True)
class Recipient:
    """The content key wrapped for one X25519 public key (a device's or a group's)."""

    key_id: str
    ephemeral_public_key: bytes
    nonce: bytes
    wrapped_key: bytes


@dataclass(frozen=True)
class KeyWrap:
    """The bundle's content key, wrapped once per recipient."""

    recipients: tuple[Recipient, ...]
    algorithm: str = "X25519-HKDF-SHA256+A256GCM"


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to know about a bundle besides the artifact bytes."""

    name: str
    version: int
    profiles: tuple[str, ...]
    artifacts: tuple[ArtifactVariant, ...]
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    self_test: tuple[SelfTestCase, ...] = ()
    baseline: Mapping[str, Any] = field(default_factory=dict)
    compression_report: Mapping[str, Any] = field(default_factory=dict)
    key_wrap: KeyWrap | None = None
    #: Set on a re-release that makes an earlier version current again (a rollback): the
    #: version whose contents this one carries. Informational for devices: what they
    #: check is ``version``, which is higher than anything released before.
    rollback_of: int | None = None
    #: Set when the model name is served by several members (bundle/composite.py).
    composite: CompositeDecl | None = None
    format_version: int = FORMAT_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate on construction too, so the server cannot sign what a device would reject.
        _check(is_valid_name(self.name), "name",
               f"{self.name!r} is not a valid name (1 to 64 letters, digits, '.', '_', '-', "
               "starting with a letter or digit)")
        _check(1 <= self.version <= MAX_VERSION, "version",
               f"must be from 1 to {MAX_VERSION} (2**63 - 1)")
        _check(self.rollback_of is None or 1 <= self.rollback_of < self.version,
               "rollback_of", "must be an earlier version (>= 1, below version)")
        _check(len(self.profiles) > 0, "profiles", "must list at least one profile")
        _check(len(self.artifacts) > 0, "artifacts", "must list at least one artifact")
        paths = [a.path for a in self.artifacts] + [d.path for a in self.artifacts
                                                     for d in a.deltas]
        _check(len(set(paths)) == len(paths), "artifacts", "paths must be unique")
        for art in self.artifacts:
            _check(_ARTIFACT_PATH.fullmatch(art.path) is not None, "artifacts.path",
                   f"{art.path!r} must look like 'artifacts/<file name>'")
            _check(_SHA256.fullmatch(art.sha256) is not None, "artifacts.sha256",
                   "must be 64 lowercase hex digits")
            _check(art.size >= 0, "artifacts.size", "must be >= 0")
            _check(not (art.deltas and art.encryption), "artifacts.deltas",
                   "an encrypted artifact cannot have deltas")
            bases = [d.base_version for d in art.deltas]
            _check(len(set(bases)) == len(bases), "artifacts.deltas",
                   "one delta per base version")
            for delta in art.deltas:
                _check(_ARTIFACT_PATH.fullmatch(delta.path) is not None, "deltas.path",
                       f"{delta.path!r} must look like 'artifacts/<file name>'")
                _check(_SHA256.fullmatch(delta.sha256) is not None
                       and _SHA256.fullmatch(delta.base_sha256) is not None, "deltas.sha256",
                       "must be 64 lowercase hex digits")
                _check(1 <= delta.base_version < self.version, "deltas.base_version",
                       "must be an earlier version")
                _check(delta.size >= 0, "deltas.size", "must be >= 0")
        if self.composite is not None:
            self.composite.check_members(set(paths))
        if any(a.encryption is not None for a in self.artifacts):
            _check(self.key_wrap is not None, "key_wrap",
                   "encrypted artifacts need a key_wrap with recipients")

    def variant(self, path: str) -> ArtifactVariant:
        """The artifact variant stored at ``path``; ``KeyError`` if there is none."""
        for art in self.artifacts:
            if art.path == path:
                return art
        raise KeyError(path)

    def delta_bases(self) -> tuple[int, ...]:
        """The base versions some artifact has a delta from, ascending."""
        return tuple(sorted({d.base_version for a in self.artifacts for d in a.deltas}))


def canonical_json(obj: Any) -> bytes:
    """The one serialization used for JSON written into bundles: sorted keys, no spaces,
    ASCII only, no trailing newline. Readers hash the bytes; they never re-serialize."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def manifest_to_json(manifest: Manifest) -> bytes:
    """Serialize ``manifest`` to the canonical bytes stored as ``manifest.json``."""
    return canonical_json(_manifest_to_dict(manifest))


def manifest_from_json(data: bytes) -> Manifest:
    """Parse ``manifest.json`` bytes; raise :class:`MalformedBundleError` if invalid."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedBundleError(
            f"manifest.json is not valid UTF-8 JSON ({exc}); rebuild the bundle") from exc
    try:
        return _manifest_from_dict(_as_dict(obj, "manifest"))
    except (TypeError, ValueError, binascii.Error) as exc:
        # A field of the right JSON type but an impossible value (e.g. huge base64).
        raise MalformedBundleError(f"manifest.json: {exc}; rebuild the bundle") from exc


# --- serialization -------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tensor_to_dict(t: Tensor) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": list(t.shape), "data": _b64(t.data)}


def _spec_to_dict(s: TensorSpec) -> dict[str, Any]:
    return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}


def _variant_to_dict(a: ArtifactVariant) -> dict[str, Any]:
    out: dict[str, Any] = {**a.unrecognized, "path": a.path, "format": a.format,
                           "dtype": a.dtype, "profile": a.profile, "sha256": a.sha256,
                           "size": a.size, "encryption": None}
    if a.encryption is not None:
        out["encryption"] = {"nonce": _b64(a.encryption.nonce),
                             "plaintext_sha256": a.encryption.plaintext_sha256,
                             "plaintext_size": a.encryption.plaintext_size}
    if a.deltas:  # written only when set, so manifests without deltas keep their bytes
        out["deltas"] = [{"path": d.path, "base_version": d.base_version,
                          "base_sha256": d.base_sha256, "sha256": d.sha256, "size": d.size}
                         for d in a.deltas]
    return out


def _manifest_to_dict(m: Manifest) -> dict[str, Any]:
    key_wrap = None
    if m.key_wrap is not None:
        key_wrap = {"algorithm": m.key_wrap.algorithm, "recipients": [
            {"key_id": r.key_id, "ephemeral_public_key": _b64(r.ephemeral_public_key),
             "nonce": _b64(r.nonce), "wrapped_key": _b64(r.wrapped_key)}
            for r in m.key_wrap.recipients]}
    # Written only when set, so manifests without it keep their exact bytes.
    rollback = {} if m.rollback_of is None else {"rollback_of": m.rollback_of}
    composite = {} if m.composite is None else {"composite": composite_to_obj(m.composite)}
    return {
        **m.unrecognized,
        **rollback,
        **composite,
        "format_version": m.format_version,
        "name": m.name,
        "version": m.version,
        "profiles": list(m.profiles),
        "artifacts": [_variant_to_dict(a) for a in m.artifacts],
        "inputs": [_spec_to_dict(s) for s in m.inputs],
        "outputs": [_spec_to_dict(s) for s in m.outputs],
        "self_test": [{"inputs": {k: _tensor_to_dict(v) for k, v in c.inputs.items()},
                       "expected_outputs": {k: _tensor_to_dict(v)
                                            for k, v in c.expected_outputs.items()},
                       "atol": c.atol, "rtol": c.rtol} for c in m.self_test],
        "baseline": dict(m.baseline),
        "compression_report": dict(m.compression_report),
        "key_wrap": key_wrap,
    }


# --- parsing: every accessor names the field it was reading --------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in bundle JSON")


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise MalformedBundleError(f"manifest field {where!r}: {what}; rebuild the bundle")


def _as_dict(obj: Any, where: str) -> dict[str, Any]:
    _check(isinstance(obj, dict), where, "must be a JSON object")
    return dict(obj)


def _as_list(obj: Any, where: str) -> list[Any]:
    _check(isinstance(obj, list), where, "must be a JSON array")
    return list(obj)


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    _check(isinstance(value, str), f"{where}.{key}", "must be a string")
    return str(value)


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _int(obj: dict[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    # bool is an int subclass in Python but not a number in the format.
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedBundleError(f"manifest field '{where}.{key}': must be an integer; "
                                   "rebuild the bundle")
    return value


def _float(obj: dict[str, Any], key: str, where: str, default: float) -> float:
    value = obj.get(key, default)
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{key}",
           "must be a number")
    return float(value)


def _bytes(obj: dict[str, Any], key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_str(obj, key, where), validate=True)
    except binascii.Error as exc:
        raise MalformedBundleError(
            f"manifest field '{where}.{key}': not base64 ({exc}); rebuild the bundle") from exc


def _tensor(obj: Any, where: str) -> Tensor:
    d = _as_dict(obj, where)
    shape = _as_list(d.get("shape"), f"{where}.shape")
    _check(all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape),
           f"{where}.shape", "must be non-negative integers")
    return Tensor(dtype=_str(d, "dtype", where), shape=tuple(shape),
                  data=_bytes(d, "data", where))


def _spec(obj: Any, where: str) -> TensorSpec:
    d = _as_dict(obj, where)
    shape = _as_list(d.get("shape"), f"{where}.shape")
    _check(all(x is None or (isinstance(x, (int, str)) and not isinstance(x, bool))
               for x in shape), f"{where}.shape", "dims must be integers, strings or null")
    return TensorSpec(name=_str(d, "name", where), dtype=_str(d, "dtype", where),
                      shape=tuple(shape))


def _tensor_map(obj: Any, where: str) -> dict[str, Tensor]:
    return {str(k): _tensor(v, f"{where}.{k}") for k, v in _as_dict(obj, where).items()}


def _self_test(obj: Any, where: str) -> SelfTestCase:
    d = _as_dict(obj, where)
    return SelfTestCase(inputs=_tensor_map(d.get("inputs"), f"{where}.inputs"),
                        expected_outputs=_tensor_map(d.get("expected_outputs"),
                                                     f"{where}.expected_outputs"),
                        atol=_float(d, "atol", where, 1e-4), rtol=_float(d, "rtol", where, 1e-3))


def tensor_specs_from_obj(obj: Any, where: str) -> tuple[TensorSpec, ...]:
    """Parse a JSON array of tensor specs (as in ``inputs``); used for report.json too."""
    return tuple(_spec(s, f"{where}[{i}]") for i, s in enumerate(_as_list(obj, where)))


def self_tests_from_obj(obj: Any, where: str) -> tuple[SelfTestCase, ...]:
    """Parse a JSON array of self-test cases (as in ``self_test``); used for report.json too."""
    return tuple(_self_test(c, f"{where}[{i}]") for i, c in enumerate(_as_list(obj, where)))


_VARIANT_KEYS = {"path", "format", "dtype", "profile", "sha256", "size", "encryption",
                 "deltas"}


def _delta(obj: Any, where: str) -> ArtifactDelta:
    d = _as_dict(obj, where)
    return ArtifactDelta(path=_str(d, "path", where), base_version=_int(d, "base_version", where),
                         base_sha256=_str(d, "base_sha256", where),
                         sha256=_str(d, "sha256", where), size=_int(d, "size", where))


def _variant(obj: Any, where: str) -> ArtifactVariant:
    d = _as_dict(obj, where)
    encryption = None
    if d.get("encryption") is not None:
        e = _as_dict(d["encryption"], f"{where}.encryption")
        encryption = ArtifactEncryption(
            nonce=_bytes(e, "nonce", f"{where}.encryption"),
            plaintext_sha256=_str(e, "plaintext_sha256", f"{where}.encryption"),
            plaintext_size=_int(e, "plaintext_size", f"{where}.encryption"))
    return ArtifactVariant(
        path=_str(d, "path", where), format=_str(d, "format", where),
        dtype=_str(d, "dtype", where), sha256=_str(d, "sha256", where),
        size=_int(d, "size", where), profile=_opt_str(d, "profile", where),
        encryption=encryption,
        deltas=tuple(_delta(x, f"{where}.deltas[{i}]")
                     for i, x in enumerate(_as_list(d.get("deltas", []), f"{where}.deltas"))),
        unrecognized={k: v for k, v in d.items() if k not in _VARIANT_KEYS})


def _key_wrap(obj: Any) -> KeyWrap | None:
    if obj is None:
        return None
    d = _as_dict(obj, "key_wrap")
    recipients = []
    for i, r in enumerate(_as_list(d.get("recipients"), "key_wrap.recipients")):
        where = f"key_wrap.recipients[{i}]"
        rd = _as_dict(r, where)
        recipients.append(Recipient(
            key_id=_str(rd, "key_id", where),
            ephemeral_public_key=_bytes(rd, "ephemeral_public_key", where),
            nonce=_bytes(rd, "nonce", where), wrapped_key=_bytes(rd, "wrapped_key", where)))
    return KeyWrap(recipients=tuple(recipients), algorithm=_str(d, "algorithm", "key_wrap"))


_MANIFEST_KEYS = {"format_version", "name", "version", "profiles", "artifacts", "inputs",
                  "outputs", "self_test", "baseline", "compression_report", "key_wrap",
                  "rollback_of", "composite"}


def _manifest_from_dict(d: dict[str, Any]) -> Manifest:
    fmt = _int(d, "format_version", "manifest")
    _check(fmt <= FORMAT_VERSION, "format_version",
           f"{fmt} is newer than this reader ({FORMAT_VERSION}); upgrade edgefleet")
    profiles = _as_list(d.get("profiles"), "profiles")
    _check(all(isinstance(p, str) for p in profiles), "profiles", "must be strings")
    return Manifest(
        format_version=fmt,
        name=_str(d, "name", "manifest"),
        version=_int(d, "version", "manifest"),
        profiles=tuple(profiles),
        artifacts=tuple(_variant(a, f"artifacts[{i}]")
                        for i, a in enumerate(_as_list(d.get("artifacts"), "artifacts"))),
        inputs=tensor_specs_from_obj(d.get("inputs", []), "inputs"),
        outputs=tensor_specs_from_obj(d.get("outputs", []), "outputs"),
        self_test=self_tests_from_obj(d.get("self_test", []), "self_test"),
        baseline=_as_dict(d.get("baseline", {}), "baseline"),
        compression_report=_as_dict(d.get("compression_report", {}), "compression_report"),
        key_wrap=_key_wrap(d.get("key_wrap")),
        rollback_of=None if d.get("rollback_of") is None else _int(d, "rollback_of",
                                                                   "manifest"),
        composite=None if d.get("composite") is None else composite_from_obj(d["composite"]),
        unrecognized={k: v for k, v in d.items() if k not in _MANIFEST_KEYS},
    )

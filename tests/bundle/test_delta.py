"""Weight-level deltas (issue 18): the tensor index, making and applying deltas, and
releases whose bundles carry deltas instead of artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bundle.delta import apply_delta, make_delta, read_header
from bundle.errors import (
    ArtifactMismatchError,
    BundleError,
    DeltaBaseError,
    MalformedBundleError,
    MixAndMatchError,
    RebuildMismatchError,
)
from bundle.signing import ArtifactInput, DeltaBase, Release, build_release
from bundle.tensor_index import tensor_index
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import NOW, ONLINE, VALID, Repo, entries, forge_delta, replace, spec
from tests.bundle.repo import rebuild as reframe

MODELS = Path(__file__).resolve().parents[2] / "models"
ONNX = (MODELS / "digits_cnn.onnx").read_bytes()
TFLITE = (MODELS / "digits_cnn.tflite").read_bytes()


def finetune(data: bytes, fmt: str, *, last: int | None = 1, scale: float = 1e-3,
             seed: int = 0, prefix: str | None = None) -> bytes:
    """``data`` with the float tensors nudged as a few optimizer steps would: the ``last``
    largest-offset ones (None: all), or those whose name starts with ``prefix``."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    spans = [s for s in tensor_index(data, fmt) if s.elem_size == 4 and s.length >= 64]
    if prefix is not None:
        spans, last = [s for s in spans if s.name.startswith(prefix)], None
    for span in spans if last is None else spans[-last:]:
        values = np.frombuffer(data, np.float32, span.length // 4, span.offset)
        nudged = values + rng.normal(0, scale * (float(values.std()) + 1e-8),
                                     values.shape).astype(np.float32)
        out[span.offset:span.offset + span.length] = nudged.astype(np.float32).tobytes()
    return bytes(out)


def rebuild(base: bytes, delta: bytes, target: bytes) -> bytes:
    out = io.BytesIO()
    apply_delta([delta[i:i + 1000] for i in range(0, len(delta), 1000)], len(delta),
                io.BytesIO(base), out,
                base_sha256=hashlib.sha256(base).hexdigest(),
                target_sha256=hashlib.sha256(target).hexdigest(), target_size=len(target))
    return out.getvalue()


# --- the tensor index -----------------------------------------------------------------------

def test_the_onnx_index_finds_every_initializer_by_name() -> None:
    model = onnx.load_from_string(ONNX)
    spans = {s.name: s for s in tensor_index(ONNX, "onnx")}
    assert set(spans) == {t.name for t in model.graph.initializer}
    for init in model.graph.initializer:
        span = spans[init.name]
        array = numpy_helper.to_array(init)
        assert ONNX[span.offset:span.offset + span.length] == array.astype(
            array.dtype.newbyteorder("<")).tobytes()
        assert span.elem_size == array.dtype.itemsize


def test_the_tflite_index_finds_the_buffers_of_named_tensors() -> None:
    spans = tensor_index(TFLITE, "tflite")
    assert sum(s.length for s in spans) > 0.9 * len(TFLITE)
    assert any(s.elem_size == 4 and not s.name.startswith("buffer/") for s in spans)
    ends = [s.offset + s.length for s in spans]
    assert all(end <= nxt.offset for end, nxt in zip(ends, spans[1:], strict=False))


@pytest.mark.parametrize(("data", "fmt"), [(b"not a model" * 50, "onnx"),
                                           (ONNX[:1000], "onnx"), (TFLITE[:5000], "tflite"),
                                           (ONNX, "safetensors")])
def test_an_unreadable_or_unknown_file_has_no_tensors(data: bytes, fmt: str) -> None:
    assert tensor_index(data, fmt) == []


# --- making and applying --------------------------------------------------------------------

@pytest.mark.parametrize(("base", "fmt"), [(ONNX, "onnx"), (TFLITE, "tflite")])
@pytest.mark.parametrize("last", [1, None])
def test_a_fine_tune_rebuilds_exactly_from_a_delta_smaller_than_the_file(
        base: bytes, fmt: str, last: int | None) -> None:
    target = finetune(base, fmt, last=last)
    delta = make_delta(base, target, fmt)
    assert rebuild(base, delta, target) == target
    changed = sum(s.length for s in tensor_index(base, fmt)
                  if base[s.offset:s.offset + s.length] != target[s.offset:s.offset + s.length])
    # A nudge of 1e-3 keeps sign, exponent and the high mantissa bits: under 3/4 of the
    # changed tensors' bytes, plus a little for the rest of the file.
    assert len(delta) < 0.75 * changed + 2000


def test_unchanged_tensors_are_copied_and_changed_ones_encoded() -> None:
    target = finetune(ONNX, "onnx", last=1)
    delta = make_delta(ONNX, target, "onnx")
    ops = [o.op for o in read_header(io.BytesIO(delta), len(delta)).ops]
    assert "copy" in ops
    assert {"xor", "sub", "zdict", "zstd"} & set(ops)


def test_a_requantized_int8_tensor_is_encoded_as_small_steps() -> None:
    rng = np.random.default_rng(1)
    weights = rng.integers(-128, 127, 128 * 1024, dtype=np.int8)
    moved = np.clip(weights + rng.integers(-1, 2, weights.shape), -128, 127).astype(np.int8)
    span = max(tensor_index(ONNX, "onnx"), key=lambda s: s.length)
    base = ONNX[:span.offset] + weights.tobytes()[:span.length] + ONNX[span.offset + span.length:]
    target = (ONNX[:span.offset] + moved.tobytes()[:span.length]
              + ONNX[span.offset + span.length:])
    delta = make_delta(base, target, "onnx")
    assert rebuild(base, delta, target) == target
    assert len(delta) < span.length / 3


def test_a_file_of_unknown_format_is_diffed_as_bytes() -> None:
    base = bytes(np.random.default_rng(2).integers(0, 256, 300_000, dtype=np.uint8))
    target = base[:1000] + b"changed" + base[1007:]
    delta = make_delta(base, target, "bin")
    assert rebuild(base, delta, target) == target
    assert len(delta) < 1000


def test_a_few_scattered_changes_are_listed_byte_by_byte_and_applied_in_blocks() -> None:
    base = bytes(np.random.default_rng(3).integers(0, 256, 3_000_000, dtype=np.uint8))
    target = bytearray(base)
    for i in range(0, len(target), 9973):  # a re-calibration: scales here and there
        target[i] ^= 0x5A
    target[-1] ^= 1
    delta = make_delta(base, bytes(target), "bin")
    assert [o.op for o in read_header(io.BytesIO(delta), len(delta)).ops] == ["sparse"]
    assert len(delta) < 2000
    assert rebuild(base, delta, bytes(target)) == bytes(target)


def test_thousands_of_scattered_changes_are_applied_across_batches_and_blocks() -> None:
    # Decoded 512 changes at a time and applied in 64 KiB blocks: both boundaries crossed.
    base = bytes(np.random.default_rng(4).integers(0, 256, 1_000_000, dtype=np.uint8))
    target = bytearray(base)
    rng = np.random.default_rng(5)
    for i in sorted(rng.choice(len(base), 5000, replace=False)):
        target[i] ^= int(rng.integers(1, 256))
    delta = make_delta(base, bytes(target), "bin")
    assert [o.op for o in read_header(io.BytesIO(delta), len(delta)).ops] == ["sparse"]
    assert rebuild(base, delta, bytes(target)) == bytes(target)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_sparse_delta_raises_a_bundle_error_or_rebuilds_the_target(
        data: st.DataObject) -> None:
    delta = bytearray(_SPARSE)
    for _ in range(data.draw(st.integers(1, 4))):
        delta[data.draw(st.integers(0, len(delta) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(BundleError):
        assert rebuild(ONNX, bytes(delta), _SPARSE_TARGET) == _SPARSE_TARGET


_SPARSE_TARGET = bytes(b ^ (1 if i % 5000 == 0 else 0) for i, b in enumerate(ONNX))
_SPARSE = make_delta(ONNX, _SPARSE_TARGET, "bin")


def test_a_damaged_base_is_named_before_anything_is_written() -> None:
    target = finetune(ONNX, "onnx")
    delta = make_delta(ONNX, target, "onnx")
    damaged = bytearray(ONNX)
    damaged[5000] ^= 1
    out = io.BytesIO()
    with pytest.raises(DeltaBaseError, match="install the full bundle"):
        apply_delta([delta], len(delta), io.BytesIO(bytes(damaged)), out,
                    base_sha256=hashlib.sha256(ONNX).hexdigest(),
                    target_sha256=hashlib.sha256(target).hexdigest(), target_size=len(target))
    assert out.getvalue() == b""


def test_a_delta_that_rebuilds_another_artifact_is_rejected() -> None:
    target = finetune(ONNX, "onnx", seed=1)
    other = finetune(ONNX, "onnx", seed=2)
    delta = make_delta(ONNX, other, "onnx")
    with pytest.raises(RebuildMismatchError, match="install the full bundle"):
        rebuild(ONNX, delta, target)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_delta_raises_a_bundle_error_or_rebuilds_the_target(data: st.DataObject
                                                                       ) -> None:
    delta = bytearray(_DELTA)
    for _ in range(data.draw(st.integers(1, 4))):
        delta[data.draw(st.integers(0, len(delta) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(delta)))
    with contextlib.suppress(BundleError):
        assert rebuild(ONNX, bytes(delta[:cut]), _TARGET) == _TARGET


def test_a_frame_claiming_an_enormous_size_is_refused_before_any_allocation() -> None:
    # Found by the test above: one flipped bit in the header's zstd frame descriptor made it
    # declare 1.7e18 bytes, which one-shot decompression tried to allocate (MemoryError).
    delta = bytearray(_DELTA)
    delta[16] = 0xC0
    with pytest.raises(MalformedBundleError, match="claims 1737626060088218880 bytes"):
        rebuild(ONNX, bytes(delta), _TARGET)


_TARGET = finetune(ONNX, "onnx", last=2)
_DELTA = make_delta(ONNX, _TARGET, "onnx")


def test_a_header_that_claims_more_than_the_file_is_refused() -> None:
    with pytest.raises(MalformedBundleError, match="header claims"):
        read_header(io.BytesIO(_DELTA[:20]), 20)


# --- releases with deltas -------------------------------------------------------------------

def _release(repo: Repo, v2_onnx: bytes, v1_onnx: bytes = ONNX) -> tuple[bytes, Release]:
    v1 = repo.build(spec("digits", 1, artifacts=[ArtifactInput("model.onnx", v1_onnx, "onnx",
                                                               "fp32")]))
    repo.metadata_version += 1
    release = build_release(
        spec("digits", 2, artifacts=[ArtifactInput("model.onnx", v2_onnx, "onnx", "fp32",
                                                   bases=(DeltaBase(1, v1_onnx),))]),
        root_chain=repo.root_chain, signers={r: repo.signers[r] for r in ONLINE},
        metadata_version=repo.metadata_version, expires=VALID)
    return v1, release


def _trusting(repo: Repo, v1: bytes) -> TrustedState:
    verified = verify_bundle(v1, TrustedState(root=repo.root), now=NOW)
    return verified.trusted.with_installed("digits", 1, verified.manifest_sha256)


def test_a_release_has_a_full_and_a_delta_bundle_under_one_signed_manifest() -> None:
    repo = Repo()
    target = finetune(ONNX, "onnx", prefix="classifier.3.")  # the last layer
    v1, release = _release(repo, target)
    state = _trusting(repo, v1)
    full = verify_bundle(release.full, state, now=NOW)
    delta = verify_bundle(release.deltas[1], state, now=NOW)
    assert (full.delta_base, delta.delta_base) == (None, 1)
    assert full.manifest_sha256 == delta.manifest_sha256
    art = delta.manifest.artifacts[0]
    d = art.delta_from(1)
    assert d is not None
    assert (art.sha256, d.base_sha256) == (hashlib.sha256(target).hexdigest(),
                                           hashlib.sha256(ONNX).hexdigest())
    assert d.size < art.size / 50
    assert len(release.deltas[1]) < len(release.full) / 5  # the rest is TUF metadata
    assert rebuild(ONNX, delta.artifacts[d.path], target) == target
    assert full.artifacts == {art.path: target}


def test_a_bundle_mixing_artifacts_and_deltas_is_refused() -> None:
    repo = Repo()
    v1, release = _release(repo, finetune(ONNX, "onnx"))
    mixed = {**entries(release.full), **entries(release.deltas[1])}
    with pytest.raises(MixAndMatchError, match="neither the manifest's artifacts"):
        verify_bundle(reframe(mixed), _trusting(repo, v1), now=NOW)


def test_a_tampered_delta_is_refused_by_its_signed_hash() -> None:
    repo = Repo()
    v1, release = _release(repo, finetune(ONNX, "onnx"))
    path = "targets/artifacts/model.onnx.from-v1.delta"
    data = bytearray(entries(release.deltas[1])[path])
    data[-1] ^= 1
    with pytest.raises(ArtifactMismatchError):
        verify_bundle(replace(release.deltas[1], path, bytes(data)), _trusting(repo, v1),
                      now=NOW)


def test_a_validly_signed_delta_that_rebuilds_another_artifact_is_refused() -> None:
    repo = Repo()
    target = finetune(ONNX, "onnx", seed=1)
    v1, release = _release(repo, target)
    path = "artifacts/model.onnx.from-v1.delta"
    forged = forge_delta(release.deltas[1], path,
                         make_delta(ONNX, finetune(ONNX, "onnx", seed=2), "onnx"),
                         repo.signers["targets"])
    verified = verify_bundle(forged, _trusting(repo, v1), now=NOW)  # the signatures hold
    with pytest.raises(RebuildMismatchError):
        rebuild(ONNX, verified.artifacts[path], target)

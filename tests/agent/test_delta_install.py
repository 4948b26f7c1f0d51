"""Installing from a delta bundle (issue 18), with real bundles, sessions and files: the
artifact rebuilt from the stored base, checked against the signed one; a damaged base or
a delta that rebuilds another artifact fails the install and the old version keeps
serving."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.install_state import InstallState
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from bundle.delta import make_delta
from bundle.signing import DeltaBase, Release, build_release
from firmware_profiles.model import Profile
from tests.agent.bundles import DIGITS, digits_spec, outputs, samples
from tests.bundle.repo import ONLINE, VALID, Repo, forge_delta

pytestmark = pytest.mark.integration

QUICK = ProbationPolicy(window_s=0.0)
DELTA_PATH = "artifacts/digits.onnx.from-v1.delta"


def last_layer_tuned(seed: int = 0) -> bytes:
    """The digits model with its last layer nudged, as a short fine-tune would (another
    ``seed``: another fine-tune)."""
    model = onnx.load(str(DIGITS))
    for init in model.graph.initializer:
        if init.name.startswith("classifier.3."):
            values = numpy_helper.to_array(init)
            noise = np.random.default_rng(seed).normal(0, 0.01, values.shape)
            init.CopyFrom(numpy_helper.from_array(values + noise.astype(np.float32), init.name))
    return bytes(model.SerializeToString())


def release_v2(repo: Repo, model: bytes) -> Release:
    spec = digits_spec(2, model)
    spec = type(spec)(**{**spec.__dict__, "artifacts": tuple(
        type(a)(**{**a.__dict__, "bases": (DeltaBase(1, DIGITS.read_bytes()),)})
        for a in spec.artifacts)})
    repo.metadata_version += 1
    return build_release(spec, root_chain=repo.root_chain,
                         signers={r: repo.signers[r] for r in ONLINE},
                         metadata_version=repo.metadata_version, expires=VALID)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_delta_bundle_installs_the_artifact_rebuilt_from_the_stored_base(
        serving_v1: Runtime, repo: Repo, tmp_path: Path, state_dir: Path) -> None:
    v2 = last_layer_tuned()
    release = release_v2(repo, v2)
    assert len(release.deltas[1]) < len(release.full) / 3
    record = serving_v1.install(_write(tmp_path, "v2.delta.efb", release.deltas[1]))
    assert record.state is InstallState.PROBATION, record.detail
    stored = serving_v1.served("digits").stored
    assert stored is not None
    assert stored.path.read_bytes() == v2
    assert stored.sha256 == hashlib.sha256(v2).hexdigest()
    x = samples(2)
    np.testing.assert_allclose(serving_v1.infer("digits", {"input": x})["logits"],
                               outputs(v2, x), atol=1e-5)
    assert not list(state_dir.glob("incoming/*.rebuilt"))


def test_a_damaged_base_fails_the_delta_and_v1_keeps_serving(
        serving_v1: Runtime, repo: Repo, tmp_path: Path) -> None:
    stored = serving_v1.served("digits").stored
    assert stored is not None
    damaged = bytearray(stored.path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.path.write_bytes(bytes(damaged))
    release = release_v2(repo, last_layer_tuned())
    record = serving_v1.install(_write(tmp_path, "v2.delta.efb", release.deltas[1]))
    assert (record.state, record.reason) == (InstallState.FAILED, "rejected:DeltaBaseError")
    assert "install the full bundle" in (record.detail or "")
    assert serving_v1.model("digits").version == 1
    assert serving_v1.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)
    full = serving_v1.install(_write(tmp_path, "v2.efb", release.full))  # the fallback
    assert full.state is InstallState.PROBATION, full.detail


def test_a_signed_delta_that_rebuilds_another_artifact_is_rejected_and_v1_keeps_serving(
        serving_v1: Runtime, repo: Repo, tmp_path: Path) -> None:
    release = release_v2(repo, last_layer_tuned())
    other = make_delta(DIGITS.read_bytes(), last_layer_tuned(seed=7), "onnx")
    forged = forge_delta(release.deltas[1], DELTA_PATH, other, repo.signers["targets"])
    record = serving_v1.install(_write(tmp_path, "forged.efb", forged))
    assert (record.state, record.reason) == (InstallState.FAILED,
                                             "rejected:RebuildMismatchError")
    assert serving_v1.model("digits").version == 1
    assert serving_v1.infer("digits", {"input": samples(1)})["logits"].shape == (1, 10)


def test_a_delta_from_a_version_the_device_does_not_hold_fails_for_the_full_bundle(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    release = release_v2(repo, last_layer_tuned())
    record = runtime.install(_write(tmp_path, "v2.delta.efb", release.deltas[1]))
    assert (record.state, record.reason) == (InstallState.FAILED, "rejected:DeltaBaseError")


"""The in-process runtime with real onnxruntime/LiteRT sessions and real signed bundles."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from agent.errors import AgentError, InvalidInputError, ModelLoadError, ModelNotFoundError
from agent.install_state import InstallState
from agent.model_store import ModelStore
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from firmware_profiles.model import Profile
from tests.agent.bundles import (
    DIGITS,
    DIGITS_TFLITE,
    batch_one_only,
    digits_spec,
    outputs,
    perturbed_digits,
    samples,
    write_bundle,
)
from tests.agent.conftest import profile
from tests.bundle.repo import Repo, replace

S = InstallState
QUICK = ProbationPolicy(window_s=0.0, min_requests=10)
LONG = ProbationPolicy(window_s=3600.0, min_requests=10)
# Under a test's thread load the GIL's 5 ms switch interval dominates any p99, so tests
# that are about something else do not judge latency (tests/agent/test_probation.py does).
NO_LATENCY = ProbationPolicy(window_s=0.0, min_requests=10, max_latency_ratio=float("inf"))


def _installed(runtime: Runtime, repo: Repo, tmp_path: Path, version: int,
               model: bytes | None = None) -> S:
    bundle = write_bundle(repo, tmp_path, digits_spec(version, model))
    record = runtime.install(bundle)
    if record.state is S.PROBATION:
        concluded = runtime.check_probation()
        assert not concluded or concluded[0].state is S.COMMITTED, concluded
        return concluded[0].state if concluded else record.state
    return record.state


def test_a_model_file_serves_the_same_outputs_as_onnxruntime() -> None:
    runtime = Runtime()
    info = runtime.load_file(DIGITS)
    assert (info.name, info.version, info.backend) == ("digits_cnn", None,
                                                        "onnxruntime:CPUExecutionProvider")
    assert [i.describe() for i in info.inputs] == ["input: float32[?, 1, 8, 8]"]
    x = samples(8)
    got = runtime.infer("digits_cnn", {"input": x})["logits"]
    np.testing.assert_allclose(got, outputs(DIGITS.read_bytes(), x), rtol=1e-5, atol=1e-5)


def test_tflite_model_file_serves_the_same_classes() -> None:
    runtime = Runtime()
    runtime.load_file(DIGITS_TFLITE, "lite")
    x = samples(16)
    got = runtime.infer("lite", {"input": x})
    (name, logits), = got.items()
    assert name == "Identity"  # LiteRT names outputs after the converted graph
    assert logits.argmax(1).tolist() == outputs(DIGITS.read_bytes(), x).argmax(1).tolist()


def test_several_named_models_at_once() -> None:
    runtime = Runtime()
    runtime.load_file(DIGITS, "classifier")
    runtime.load_file(DIGITS_TFLITE, "detector")
    assert [m.name for m in runtime.models()] == ["classifier", "detector"]
    x = samples(1)
    assert runtime.infer("classifier", {"input": x})["logits"].shape == (1, 10)
    assert runtime.infer("detector", {"input": x})


@pytest.mark.parametrize(("feeds", "message"), [
    ({"image": samples(1)}, "unknown input image; the model expects input: float32[?, 1, 8, 8]"),
    ({}, "missing input input"),
    ({"input": samples(1).astype(np.float64)}, "input input has dtype float64, expected float32"),
    ({"input": samples(1).reshape(1, 64)}, "input input has shape [1, 64], expected [?, 1, 8, 8]"),
    ({"input": np.zeros((1, 1, 8, 9), np.float32)}, "has shape [1, 1, 8, 9]"),
    ({"input": [[1.0]]}, "input input is not an array"),
])
@pytest.mark.parametrize("model", [DIGITS, DIGITS_TFLITE])
def test_bad_input_names_the_tensor_and_the_signature(feeds: dict[str, object], message: str,
                                                     model: Path) -> None:
    runtime = Runtime()
    runtime.load_file(model, "m")
    with pytest.raises(InvalidInputError, match=r"model m: ") as caught:
        runtime.infer("m", feeds)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert runtime.served("m").stats.errors == 0  # the caller's fault, not the model's
    assert runtime.infer("m", {"input": samples(1)})


def test_unknown_model_and_bad_files() -> None:
    runtime = Runtime()
    with pytest.raises(ModelNotFoundError, match="no model named 'x' is served; loaded: none"):
        runtime.infer("x", {})
    with pytest.raises(ModelLoadError, match="cannot tell the format"):
        runtime.load_file(Path("model.pt"))
    with pytest.raises(ModelLoadError, match="no such model file"):
        runtime.load_file(Path("missing.onnx"))


def test_garbage_model_file_is_refused_and_the_served_one_kept(tmp_path: Path) -> None:
    runtime = Runtime()
    runtime.load_file(DIGITS, "m")
    garbage = tmp_path / "m.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        runtime.load_file(garbage, "m")
    assert runtime.infer("m", {"input": samples(1)})


def test_failed_delegate_falls_back_to_the_cpu() -> None:
    runtime = Runtime(profile=profile("coral-edgetpu"))
    info = runtime.load_file(DIGITS_TFLITE, "m")
    assert info.backend == "litert:xnnpack"
    assert info.fallback is not None
    assert "edgetpu delegate libedgetpu.so.1 failed to load" in info.fallback
    assert runtime.infer("m", {"input": samples(2)})

    runtime = Runtime(profile=profile("jetson-orin"))
    info = runtime.load_file(DIGITS, "m")
    assert info.backend == "onnxruntime:CPUExecutionProvider"
    assert info.fallback is not None
    assert "CUDAExecutionProvider is not available" in info.fallback


def test_install_commit_and_status(state_dir: Path, repo: Repo, tmp_path: Path,
                                   x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    record = runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    assert record.state is S.PROBATION
    assert runtime.model("digits").state == "probation"
    [committed] = runtime.check_probation()
    assert committed.state is S.COMMITTED
    assert [h[0] for h in committed.history] == [
        "idle", "downloading", "verifying", "staged", "activating", "probation", "committed"]
    status = runtime.status()
    assert status["models"][0]["version"] == 1
    assert status["models"][0]["state"] == "serving"
    assert status["installs"][0]["state"] == "committed"
    assert ModelStore(state_dir / "models").active("digits").version == 1  # type: ignore[union-attr]
    assert not list((state_dir / "incoming").iterdir())


def test_self_test_failure_keeps_the_old_model(state_dir: Path, repo: Repo, tmp_path: Path,
                                               x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    assert _installed(runtime, repo, tmp_path, 1) is S.COMMITTED
    bundle = write_bundle(repo, tmp_path, digits_spec(2, perturbed_digits(),
                                                      golden_from=DIGITS.read_bytes()))
    record = runtime.install(bundle)
    assert record.state is S.FAILED
    assert record.reason == "self_test_failed"
    assert "self-test case 1 output logits deviates by" in (record.detail or "")
    assert runtime.model("digits").version == 1
    assert ModelStore(state_dir / "models").versions("digits") == [1]


def test_a_rejected_bundle_keeps_the_old_model(state_dir: Path, repo: Repo, tmp_path: Path,
                                               x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    assert _installed(runtime, repo, tmp_path, 1) is S.COMMITTED
    good = repo.build(digits_spec(2))
    tampered = tmp_path / "tampered.efb"
    tampered.write_bytes(replace(good, "targets/artifacts/digits.onnx", perturbed_digits()))
    record = runtime.install(tampered)
    assert record.state is S.FAILED
    assert record.reason == "rejected:ArtifactMismatchError"
    assert runtime.model("digits").version == 1
    missing = runtime.install(tmp_path / "nope.efb")
    assert (missing.state, missing.reason) == (S.FAILED, "download_failed")


def test_a_bundle_for_another_profile_is_refused(state_dir: Path, repo: Repo, tmp_path: Path,
                                                 ) -> None:
    runtime = Runtime(state_dir, profile("rpi4"), policy=QUICK)
    record = runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    assert (record.state, record.reason) == (S.FAILED, "rejected:WrongProfileError")
    assert runtime.models() == []


def test_probation_errors_roll_back_to_the_previous_model(state_dir: Path, repo: Repo,
                                                          tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=LONG)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.policy = QUICK
    runtime.check_probation()
    runtime.policy = LONG
    record = runtime.install(write_bundle(repo, tmp_path, digits_spec(2, batch_one_only())))
    assert record.state is S.PROBATION
    assert runtime.model("digits").version == 2
    failures = 0
    for _ in range(12):
        try:
            runtime.infer("digits", {"input": samples(2)})
        except AgentError:
            failures += 1
    assert failures == 12
    [rolled] = runtime.check_probation()
    assert (rolled.state, rolled.reason) == (S.ROLLED_BACK, "probation_failed")
    assert "error rate 100.0%" in (rolled.detail or "")
    assert runtime.model("digits").version == 1
    assert runtime.infer("digits", {"input": samples(2)})["logits"].shape == (2, 10)
    assert ModelStore(state_dir / "models").versions("digits") == [1]
    # A restart serves v1, not the rolled-back v2.
    assert Runtime(state_dir, x86).model("digits").version == 1


def test_hot_swap_under_load_drops_nothing(state_dir: Path, repo: Repo, tmp_path: Path,
                                           x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=NO_LATENCY)
    assert _installed(runtime, repo, tmp_path, 1) is S.COMMITTED
    old = weakref.ref(runtime.served("digits").session)
    x = samples(4)
    expected = outputs(DIGITS.read_bytes(), x)
    stop = threading.Event()
    errors: list[BaseException] = []
    versions: set[int | None] = set()
    counts = [0, 0]

    def load(slot: int) -> None:
        while not stop.is_set():
            try:
                got = runtime.infer("digits", {"input": x})["logits"]
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
                versions.add(runtime.model("digits").version)
                counts[slot] += 1
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for version in (2, 3):
            assert _installed(runtime, repo, tmp_path, version) is S.COMMITTED
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert min(counts) > 0
    assert {1, 3} <= versions
    assert runtime.model("digits").version == 3
    # The first session was released once no request used it any more.
    assert old() is None
    assert ModelStore(state_dir / "models").versions("digits") == [2, 3]


def test_restart_serves_the_active_version_and_falls_back_when_it_is_damaged(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=QUICK)
    for version in (1, 2):
        assert _installed(runtime, repo, tmp_path, version) is S.COMMITTED
    assert Runtime(state_dir, x86).model("digits").version == 2
    damaged = state_dir / "models" / "digits" / "2" / "model.onnx"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    restarted = Runtime(state_dir, x86)
    assert restarted.model("digits").version == 1
    assert "digits v2 cannot be served" in restarted.problems[0]
    assert "no longer matches its sha256" in restarted.problems[0]
    assert ModelStore(state_dir / "models").active("digits").version == 1  # type: ignore[union-attr]


def test_a_runtime_without_state_cannot_install(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="no state directory"):
        Runtime().install(tmp_path / "b.efb")


def test_a_newer_install_supersedes_one_in_probation(state_dir: Path, repo: Repo,
                                                    tmp_path: Path, x86: Profile) -> None:
    runtime = Runtime(state_dir, x86, policy=LONG)
    assert runtime.install(write_bundle(repo, tmp_path, digits_spec(1))).state is S.PROBATION
    # v2 is unhealthy in its probation: superseding it judges it, and rolls it back.
    runtime.install(write_bundle(repo, tmp_path, digits_spec(2, batch_one_only())))
    for _ in range(12):
        with pytest.raises(AgentError):
            runtime.infer("digits", {"input": samples(2)})
    third = runtime.install(write_bundle(repo, tmp_path, digits_spec(3)))
    assert third.state is S.PROBATION
    assert third.previous_version == 1
    assert runtime.installer is not None
    by_version = {r.version: r for r in runtime.installer.records()}
    assert by_version[1].state is S.COMMITTED
    assert "superseded by v2" in (by_version[1].detail or "")
    assert by_version[2].state is S.ROLLED_BACK
    assert "superseded by v3" in (by_version[2].detail or "")
    assert "error rate 100.0%" in (by_version[2].detail or "")
    assert runtime.model("digits").version == 3
    assert ModelStore(state_dir / "models").versions("digits") == [1, 3]

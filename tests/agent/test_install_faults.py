"""Installs under faults, with real bundles, sessions and files: a reader that blows up, a
verification held for as long as it takes, a disk that is full, a damaged store."""

from __future__ import annotations

import json
import tarfile
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from agent.bundle_verifier import verify_in_child
from agent.install_state import InstallRecord, InstallState
from agent.probation import ProbationPolicy
from agent.runtime import Runtime
from bundle.archive import frame
from bundle.trust import TrustedState, VerifiedBundle
from firmware_profiles.model import Profile
from tests.agent.bundles import DIGITS, digits_spec, samples, write_bundle
from tests.agent.conftest import fill_disk
from tests.bundle.repo import Repo

pytestmark = pytest.mark.integration

S = InstallState
QUICK = ProbationPolicy(window_s=0.0)
LONG = ProbationPolicy(window_s=3600.0)


def _chained_long_names(path: Path, depth: int = 4000) -> Path:
    """An unsigned 'bundle' of ``depth`` chained GNU long-name headers (issue 9 item 1)."""
    name = b"targets/" + b"n" * 150 + b"\0"
    name += bytes(-len(name) % 512)
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = len(name)
    path.write_bytes(frame((info.tobuf(format=tarfile.GNU_FORMAT) + name) * depth
                           + bytes(1024)))
    return path


def _served_version(runtime: Runtime) -> int | None:
    assert runtime.infer("digits", {"input": samples(2)})["logits"].shape == (2, 10)
    return runtime.model("digits").version


def test_a_bundle_that_blows_up_the_reader_fails_once_with_a_reason(
        serving_v1: Runtime, state_dir: Path, tmp_path: Path, x86: Profile) -> None:
    # issue 9 item 1: RecursionError escaped, the install stayed 'verifying' and every
    # restart resumed it and crashed again.
    seen: list[InstallRecord] = []
    assert serving_v1.installer is not None
    serving_v1.installer.listeners.append(seen.append)
    record = serving_v1.install(_chained_long_names(tmp_path / "evil.efb"))
    assert (record.state, record.reason) == (S.FAILED, "rejected:MalformedBundleError")
    assert "extension header" in (record.detail or "")
    assert [r.state for r in seen].count(S.FAILED) == 1  # reported once
    assert not list((state_dir / "incoming").iterdir())  # nothing left on disk
    assert _served_version(serving_v1) == 1
    restarted = Runtime(state_dir, x86, policy=QUICK)
    restarted.resume_installs()
    assert restarted.installer is not None
    assert restarted.installer.pending() == []
    assert _served_version(restarted) == 1


def test_any_exception_in_verification_is_a_failed_install(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    def broken(path: Path, trusted: TrustedState, now: datetime,
               profile: str | None) -> VerifiedBundle:
        raise RecursionError("maximum recursion depth exceeded")  # a reader's bug

    runtime = Runtime(state_dir, x86, policy=QUICK, verifier=broken)
    record = runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    assert (record.state, record.reason) == (S.FAILED, "internal_error")
    assert "recursion" in (record.detail or "")
    assert runtime.models() == []


def test_requests_are_answered_while_an_install_is_held_in_verification(
        serving_v1: Runtime, state_dir: Path, repo: Repo, tmp_path: Path,
        x86: Profile) -> None:
    entered, release = threading.Event(), threading.Event()

    def held(path: Path, trusted: TrustedState, now: datetime,
             profile: str | None) -> VerifiedBundle:
        entered.set()
        assert release.wait(120)
        return verify_in_child(path, trusted, now, profile)

    runtime = Runtime(state_dir, x86, policy=LONG, verifier=held)
    v2 = write_bundle(repo, tmp_path, digits_spec(2))
    done: list[InstallRecord] = []
    installing = threading.Thread(target=lambda: done.append(runtime.install(v2)))
    installing.start()
    try:
        assert entered.wait(60)
        # The install is inside verification and stays there until released: everything
        # a request or an app needs is answered meanwhile, without waiting for it.
        for _ in range(50):
            assert _served_version(runtime) == 1
        assert runtime.status()["models"][0]["version"] == 1
        assert runtime.load_file(DIGITS, "other").name == "other"
        assert not done
        assert installing.is_alive()
    finally:
        release.set()
        installing.join(120)
    assert done[0].state is S.PROBATION
    assert _served_version(runtime) == 2


def test_a_corrupt_active_pointer_falls_back_to_the_newest_intact_version(
        serving_v1: Runtime, state_dir: Path, repo: Repo, tmp_path: Path,
        x86: Profile) -> None:
    serving_v1.install(write_bundle(repo, tmp_path, digits_spec(2)))
    serving_v1.check_probation()
    (state_dir / "models" / "digits" / "active.json").write_bytes(b"{not json")
    restarted = Runtime(state_dir, x86, policy=QUICK)
    assert _served_version(restarted) == 2
    assert any("active.json" in p for p in restarted.problems)


def test_with_every_slot_damaged_the_same_version_is_staged_again(
        serving_v1: Runtime, state_dir: Path, repo: Repo, tmp_path: Path,
        x86: Profile) -> None:
    # issue 10 item 8: the re-install reused the damaged slot and failed load_failed forever.
    (state_dir / "models" / "digits" / "1" / "model.onnx").write_bytes(b"rotten")
    restarted = Runtime(state_dir, x86, policy=QUICK)
    assert restarted.models() == []
    record = restarted.install(write_bundle(repo, tmp_path, digits_spec(1)))
    assert record.state is S.PROBATION, record.detail
    assert _served_version(restarted) == 1


def test_a_record_with_an_empty_history_does_not_stop_the_agent(
        serving_v1: Runtime, state_dir: Path, x86: Profile) -> None:
    record = next((state_dir / "installs").glob("*.json"))
    raw = json.loads(record.read_bytes())
    record.write_text(json.dumps({**raw, "history": []}))
    restarted = Runtime(state_dir, x86, policy=QUICK)
    restarted.resume_installs()
    assert _served_version(restarted) == 1
    assert restarted.status()["installs"][0]["at"] == 0.0


def _reflect_pad_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 2, 0, 2])
    graph = helper.make_graph([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
                              "pad", [x], [y], initializer=[pads])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_model_that_rejects_zeros_of_length_one_still_loads(tmp_path: Path) -> None:
    # issue 13 item 5: warm-up fed zeros with every dynamic dimension 1, which a reflect
    # Pad of 2 refuses, and the agent crashed at load.
    runtime = Runtime()
    info = runtime.load_file(_reflect_pad_model(tmp_path / "pad.onnx"))
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    assert runtime.infer(info.name, {"x": x})["y"].shape == (1, 10)


def test_a_full_disk_fails_the_install_once_and_keeps_the_old_version_serving(
        small_disk: Path, small_state_dir: Path, repo: Repo, tmp_path: Path,
        x86: Profile) -> None:
    # issue 10 item 2, for a local install: checked before the bundle is copied.
    state_dir = small_state_dir
    runtime = Runtime(state_dir, x86, policy=QUICK)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    seen: list[InstallRecord] = []
    assert runtime.installer is not None
    runtime.installer.listeners.append(seen.append)
    filler = fill_disk(small_disk, 1024 * 1024)
    record = runtime.install(write_bundle(repo, tmp_path, digits_spec(2)))
    assert (record.state, record.reason, record.retry) == (S.FAILED, "disk_full", True)
    assert [r.state for r in seen].count(S.FAILED) == 1
    assert not list((state_dir / "incoming").iterdir())
    assert _served_version(runtime) == 1
    # Restartable with the disk still full; installs once there is room again.
    restarted = Runtime(state_dir, x86, policy=QUICK)
    restarted.resume_installs()
    assert _served_version(restarted) == 1
    filler.unlink()
    assert restarted.install(write_bundle(repo, tmp_path, digits_spec(2))).state is S.PROBATION


def test_the_startup_sweep_deletes_what_no_install_references(
        state_dir: Path, repo: Repo, tmp_path: Path, x86: Profile) -> None:
    # issue 10 item 5: each kill after a completed fetch left its 25 MB bundle behind.
    runtime = Runtime(state_dir, x86, policy=QUICK)
    runtime.install(write_bundle(repo, tmp_path, digits_spec(1)))
    runtime.check_probation()
    runtime.install(write_bundle(repo, tmp_path, digits_spec(2)))
    runtime.check_probation()
    models = state_dir / "models" / "digits"
    left = [state_dir / "incoming" / "0123456789ab.efb", state_dir / "incoming" / "feed.part",
            models / "7" / "model.onnx", models / ".staging-1234" / "model.onnx"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(1000))
    restarted = Runtime(state_dir, x86, policy=QUICK)
    assert _served_version(restarted) == 2
    assert not list((state_dir / "incoming").iterdir())
    assert sorted(p.name for p in models.iterdir()) == ["1", "2", "active.json"]

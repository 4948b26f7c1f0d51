"""The device side of experiments on a real runtime: arms, response ids, feedback, state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.experiments import DeviceExperiments
from agent.runtime import Runtime
from experiments.errors import InvalidExperimentData, OutOfOrderDelta, UnknownResponse
from experiments.posterior import FleetPosterior, apply_delta, decode_delta, push_for
from experiments.spec import ExperimentSpec

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
X = np.load(ROOT / "models" / "digits_data.npz")["eval_x"]

AB = ExperimentSpec("ab1", "digits", (("a", "digits-a"), ("b", "digits-b")),
                    (("a", 50.0), ("b", 50.0)), unit="request")
BANDIT = ExperimentSpec("bandit1", "digits", (("a", "digits-a"), ("b", "digits-b")),
                        (("a", 1.0), ("b", 1.0)), unit="request", strategy="thompson")


def _serve_and_reward(exp: DeviceExperiments, runtime: Runtime, requests: int) -> None:
    for i in range(requests):
        _, rid = exp.infer(runtime, "digits", {"input": X[i:i + 1]})
        exp.feedback("digits", json.dumps({"id": rid, "reward": 1.0}).encode())


@pytest.fixture
def runtime() -> Runtime:
    rt = Runtime()
    rt.load_file(DIGITS, "digits-a")
    rt.load_file(DIGITS, "digits-b")
    return rt


def test_requests_split_between_arms_and_feedback_learns(runtime: Runtime,
                                                         tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path, rng=np.random.default_rng(0))
    exp.start(AB)
    _serve_and_reward(exp, runtime, 40)
    served = [runtime.served(m).figures["requests"] for m in ("digits-a", "digits-b")]
    assert sum(served) == 40
    assert min(served) > 5
    counts = exp.posterior("ab1").current
    assert counts["a"].n + counts["b"].n == 40
    # Sticky per client key: one arm for one key.
    for _ in range(5):
        exp.infer(runtime, "digits", {"input": X[:1]}, client_key="user-1")
    after = [runtime.served(m).figures["requests"] for m in ("digits-a", "digits-b")]
    assert sorted(b - a for a, b in zip(served, after, strict=True)) == [0, 5]


def test_label_feedback_and_its_errors(runtime: Runtime) -> None:
    exp = DeviceExperiments("dev1")
    exp.start(AB)
    outputs, rid = exp.infer(runtime, "digits", {"input": X[:1]})
    label = int(outputs["logits"][0].argmax())
    assert exp.feedback("digits", json.dumps({"id": rid, "label": label}).encode()) == 1.0
    with pytest.raises(UnknownResponse):
        exp.feedback("digits", json.dumps({"id": rid, "label": label}).encode())
    with pytest.raises(InvalidExperimentData):
        exp.feedback("digits", b'{"id": 3}')
    # A label that is no class of the model is refused, and the id can still be reported.
    _, rid = exp.infer(runtime, "digits", {"input": X[:1]})
    for bad in (10, -1):
        with pytest.raises(InvalidExperimentData, match="class index 0 to 9"):
            exp.feedback("digits", json.dumps({"id": rid, "label": bad}).encode())
    assert exp.feedback("digits", json.dumps({"id": rid, "reward": 0.25}).encode()) == 0.25
    # A model outside any experiment still answers with an id and takes feedback.
    _, plain = exp.infer(runtime, "digits-a", {"input": X[:1]})
    assert exp.feedback("digits-a", json.dumps({"id": plain, "reward": 0.5}).encode()) == 0.5


def test_bandit_learns_offline_survives_restart_and_merges_once(runtime: Runtime,
                                                                tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path, rng=np.random.default_rng(1))
    exp.start(BANDIT)
    _serve_and_reward(exp, runtime, 30)
    deltas = exp.report()
    assert len(deltas) == 1
    # Restart: the counts come back from disk, the delta is still pending.
    again = DeviceExperiments("dev1", tmp_path)
    again.start(BANDIT)
    learner = again.posterior("bandit1")
    assert sum(d.arms[a].n for d in learner.pending for a in d.arms) == 30
    server = FleetPosterior.start("bandit1", BANDIT.arm_names)
    for raw in (deltas[0], deltas[0]):  # delivered twice
        server, _ = apply_delta(server, decode_delta(raw, "dev1"))
    again.receive(push_for(server, "dev1"))
    learner = again.posterior("bandit1")
    assert learner.pending == ()
    assert sum(s.n for s in learner.base.values()) == 30


def test_damaged_state_starts_afresh(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "bandit1.json").write_text("{not json")
    exp = DeviceExperiments("dev1", tmp_path)
    exp.start(BANDIT)
    assert exp.posterior("bandit1").next_seq == 1
    outputs, _ = exp.infer(runtime, "digits", {"input": X[:1]})
    assert outputs["logits"].shape == (1, 10)


def test_a_report_lost_on_the_way_is_sent_again_after_the_next_push(runtime: Runtime) -> None:
    exp = DeviceExperiments("dev1", rng=np.random.default_rng(2))
    exp.start(BANDIT)
    server = FleetPosterior.start("bandit1", BANDIT.arm_names)
    _serve_and_reward(exp, runtime, 5)
    lost = exp.report()  # the sample carrying delta 1 is dropped
    _serve_and_reward(exp, runtime, 5)
    second = exp.report()
    assert [d["seq"] for d in (*lost, *second)] == [1, 2]
    with pytest.raises(OutOfOrderDelta):
        apply_delta(server, decode_delta(second[0], "dev1"))
    exp.receive(push_for(server, "dev1"))  # the server's periodic push: nothing applied
    _serve_and_reward(exp, runtime, 5)
    third = exp.report()
    assert [d["seq"] for d in third] == [1, 2, 3]  # the lacking ones first, then the new one
    for raw in third:
        server, verdict = apply_delta(server, decode_delta(raw, "dev1"))
        assert verdict == "applied"
    assert sum(s.n for s in server.arms.values()) == 15
    assert exp.report() == []  # nothing new, nothing asked for again

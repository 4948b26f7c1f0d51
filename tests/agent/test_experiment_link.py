"""The agent's experiment link without a broker: declarations start and stop experiments,
pushes reach the learner, bad input is reported and never stops the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.experiment_link import ExperimentLink
from agent.experiments import DeviceExperiments
from agent.runtime import Runtime
from experiments.spec import ExperimentSpec, spec_to_json
from protocol.errors import ProtocolError
from protocol.experiment_messages import PosteriorPush
from protocol.messages import Desired, encode

ROOT = Path(__file__).resolve().parents[2]
X = np.load(ROOT / "models" / "digits_data.npz")["eval_x"]
AB = ExperimentSpec("ab1", "digits", (("a", "digits-a"), ("b", "digits-b")),
                    (("a", 0.5), ("b", 0.5)), unit="request")
PREFIX = "edgefleet/f/devices/dev1/"


def _topic(leaf: str) -> str:
    return PREFIX + leaf


def _desired(*specs: ExperimentSpec, raw: tuple[dict[str, object], ...] = ()) -> Desired:
    return Desired({}, 1.0, (*(spec_to_json(s) for s in specs), *raw))


@pytest.fixture
def runtime() -> Runtime:
    rt = Runtime()
    for name in ("digits-a", "digits-b"):
        rt.load_file(ROOT / "models" / "digits_cnn.onnx", name)
    return rt


def test_without_experiments_the_link_does_nothing() -> None:
    link = ExperimentLink(None, _topic)
    assert link.subscriptions() == []
    link.follow(_desired(AB))
    assert not link.is_push(PREFIX + "inbox/experiments/ab1")


def test_declarations_start_change_and_stop_experiments(runtime: Runtime,
                                                        tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path, rng=np.random.default_rng(0))
    link = ExperimentLink(exp, _topic)
    assert link.subscriptions() == [(PREFIX + "inbox/experiments/+", 1)]
    link.follow(_desired(AB))
    for _ in range(20):
        _, rid = exp.infer(runtime, "digits", {"input": X[:1]})
        exp.feedback("digits", json.dumps({"id": rid, "reward": 1.0}).encode())
    counted = exp.posterior("ab1").current
    assert sum(s.n for s in counted.values()) == 20
    # The same declaration again (every desired state repeats it) changes nothing.
    link.follow(_desired(AB))
    assert exp.posterior("ab1").current == counted
    # Gone from the desired state: the name is served directly again.
    link.follow(_desired())
    with pytest.raises(KeyError):
        exp.posterior("ab1")
    with pytest.raises(Exception, match="digits"):
        exp.infer(runtime, "digits", {"input": X[:1]})
    # Declared again: the saved counts come back.
    link.follow(_desired(AB))
    assert exp.posterior("ab1").current == counted


def test_a_bad_declaration_is_reported_and_the_good_ones_apply(tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path)
    link = ExperimentLink(exp, _topic)
    bad: dict[str, object] = {"name": "odd", "model": "other", "arms": [{"arm": "a", "model": "m"}]}
    with pytest.raises(ProtocolError, match=r"'odd'.*2 to 16 arms"):
        link.follow(_desired(AB, raw=(bad,)))
    assert exp.posterior("ab1").next_seq == 1


def test_pushes_reach_the_learner_and_older_ones_are_ignored(tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path)
    link = ExperimentLink(exp, _topic)
    link.follow(_desired(AB))
    topic = PREFIX + "inbox/experiments/ab1"
    assert link.is_push(topic)
    assert not link.is_push(PREFIX + "inbox/chunks")
    link.on_push(topic, encode(PosteriorPush("ab1", 5, 0, {"a": (10, 7.0, 7.0),
                                                            "b": (4, 1.0, 1.0)})))
    learner = exp.posterior("ab1")
    assert (learner.base_version, learner.base["a"].n) == (5, 10)
    link.on_push(topic, encode(PosteriorPush("ab1", 4, 0, {"a": (1, 1.0, 1.0)})))
    assert exp.posterior("ab1").base_version == 5
    link.on_push(topic, b"")  # the experiment ended: its retained push was cleared
    with pytest.raises(ProtocolError, match="arrived on"):
        link.on_push(topic, encode(PosteriorPush("other", 9, 0, {"a": (1, 1.0, 1.0)})))
    with pytest.raises(ProtocolError):
        link.on_push(topic, b"{not json")
    assert exp.posterior("ab1").base_version == 5


def test_a_push_before_its_declaration_is_taken_when_the_experiment_starts(
        tmp_path: Path) -> None:
    exp = DeviceExperiments("dev1", tmp_path)
    link = ExperimentLink(exp, _topic)
    topic = PREFIX + "inbox/experiments/ab1"
    link.on_push(topic, encode(PosteriorPush("ab1", 7, 0, {"a": (3, 2.0, 2.0)})))
    link.on_push(topic, encode(PosteriorPush("ab1", 6, 0, {"a": (2, 2.0, 2.0)})))
    link.follow(_desired(AB))
    assert (exp.posterior("ab1").base_version, exp.posterior("ab1").base["a"].n) == (7, 3)
    # Cleared (the experiment ended): a later declaration of that name starts afresh.
    link.follow(_desired())
    link.on_push(topic, b"")
    (tmp_path / "experiments" / "ab1.json").unlink()
    link.follow(_desired(AB))
    assert exp.posterior("ab1").base_version == 0

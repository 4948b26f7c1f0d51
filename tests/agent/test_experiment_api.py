"""Experiments through a real agent's HTTP API: arms per request, answer ids, outcome
feedback (200, 400, 404), and feedback received offline kept in the outbox for the fleet."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import AgentProcess
from agent.experiments import DeviceExperiments
from agent.http_api import ApiSettings
from agent.outbox import Outbox
from agent.runtime import Runtime
from agent.telemetry import TelemetryCollector, TelemetrySampler
from experiments.posterior import decode_delta
from experiments.spec import ExperimentSpec
from protocol.messages import Telemetry
from tests.agent.bundles import DIGITS, samples

TOKEN = "t0ken"
AB = ExperimentSpec("ab1", "digits", (("a", "digits-a"), ("b", "digits-b")),
                    (("a", 50.0), ("b", 50.0)), unit="request")
_ROWS = samples(8)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    runtime = Runtime(tmp_path)
    runtime.load_file(DIGITS, "digits-a")
    runtime.load_file(DIGITS, "digits-b")
    runtime.load_file(DIGITS, "plain")
    process = AgentProcess(runtime, ApiSettings(port=0, token=TOKEN), tmp_path, device="dev1")
    process.experiments.start(AB)
    process.start(None)
    try:
        yield process
    finally:
        process.stop()
        process.server.stop()
        runtime.close()


def _post(agent: AgentProcess, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    assert agent.server.port is not None
    connection = http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=30)
    try:
        connection.request("POST", path, body=body if isinstance(body, bytes)
                           else json.dumps(body).encode(),
                           headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _infer(agent: AgentProcess, model: str, row: int = 0, **extra: Any,
           ) -> dict[str, Any]:
    status, answer = _post(agent, f"/v2/models/{model}/infer", {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                    "data": _ROWS[row].ravel().tolist()}], **extra})
    assert status == 200, answer
    return answer


def _feedback(agent: AgentProcess, model: str, body: Any) -> tuple[int, dict[str, Any]]:
    return _post(agent, f"/v2/models/{model}/feedback", body)


def test_requests_are_split_between_arms_and_rewards_counted_per_arm(
        agent: AgentProcess) -> None:
    answers = [_infer(agent, "digits", i % 8) for i in range(40)]
    arms = [a["model_name"] for a in answers]
    assert set(arms) == {"digits-a", "digits-b"}
    for answer in answers:
        reward = 1.0 if answer["model_name"] == "digits-a" else 0.0
        assert _feedback(agent, "digits", {"id": answer["id"], "reward": reward}) == (
            200, {"reward": reward})
    counts = agent.experiments.posterior("ab1").current
    assert counts["a"].n == arms.count("digits-a")
    assert counts["a"].total == counts["a"].n
    assert counts["b"].n == arms.count("digits-b")
    assert counts["b"].total == 0.0


def test_answer_ids_are_unique_or_the_requests_own(agent: AgentProcess) -> None:
    ids = [_infer(agent, model)["id"] for model in ("digits", "plain") for _ in range(25)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 24 for i in ids)
    mine = _infer(agent, "digits", id="req-17")
    assert mine["id"] == "req-17"
    predicted = max(range(10), key=lambda k: mine["outputs"][0]["data"][k])
    assert _feedback(agent, "digits", {"id": "req-17", "label": predicted}) == (
        200, {"reward": 1.0})


def test_client_key_keeps_one_arm(agent: AgentProcess) -> None:
    for key in ("user-1", "user-2", "user-3"):
        arms = {_infer(agent, "digits", parameters={"client_key": key})["model_name"]
                for _ in range(6)}
        assert len(arms) == 1


def test_bad_feedback_is_400_and_unknown_ids_are_404(agent: AgentProcess) -> None:
    answer = _infer(agent, "digits")
    for bad in (b"not json", {"id": answer["id"]}, {"id": answer["id"], "reward": 1,
                                                    "label": 2},
                {"id": answer["id"], "reward": "high"}, {"id": 5, "reward": 1},
                {"id": answer["id"], "label": True}):
        status, body = _feedback(agent, "digits", bad)
        assert status == 400, bad
        assert "feedback" in body["error"]
    # The malformed reports did not use the id up.
    assert _feedback(agent, "digits", {"id": answer["id"], "reward": 2.5})[0] == 200
    for model, response_id, says in (
            ("digits", answer["id"], "awaits feedback"),         # already reported
            ("digits", "0" * 24, "awaits feedback"),              # never issued
            ("plain", _infer(agent, "digits")["id"],              # another model's: where to
             "post its feedback to /v2/models/digits/feedback")):  # post it instead
        status, body = _feedback(agent, model, {"id": response_id, "reward": 1})
        assert status == 404
        assert says in body["error"]
    status, body = _post(agent, "/v2/models/digits/infer", {
        "parameters": {"client_key": 7}, "inputs": []})
    assert status == 400
    assert "client_key" in body["error"]
    assert _feedback(agent, "nosuch", {"id": "x", "reward": 1})[0] == 404
    # A reward above the experiment's range is clipped where it is learnt.
    assert agent.experiments.posterior("ab1").current[
        "a" if answer["model_name"] == "digits-a" else "b"].total == 1.0


def test_feedback_received_offline_waits_in_the_outbox_and_survives_restart(
        agent: AgentProcess, tmp_path: Path) -> None:
    answers = [_infer(agent, "digits", i % 8) for i in range(10)]
    for answer in answers:
        assert _feedback(agent, "digits", {"id": answer["id"], "reward": 1})[0] == 200
    with Outbox.open_in(tmp_path) as outbox:  # no broker: nothing leaves the device
        sampler = TelemetrySampler(TelemetryCollector(
            agent.runtime, experiments=agent.experiments), outbox, 60.0)
        assert sampler.sample() is not None
        assert sampler.sample() is not None  # nothing new learnt: no delta in this one
    with Outbox.open_in(tmp_path) as outbox:  # the agent restarted, still offline
        waiting = [m for m in outbox.pending() if isinstance(m, Telemetry)]
    assert len(waiting) == 2
    deltas = [d for m in waiting for d in m.metrics.get("experiments", [])]
    assert len(deltas) == 1
    delta = decode_delta(deltas[0], "dev1")
    assert (delta.experiment, delta.seq) == ("ab1", 1)
    assert sum(s.n for s in delta.arms.values()) == 10
    assert sum(s.total for s in delta.arms.values()) == 10.0
    # The device still counts the delta as its own until a push from the server includes it.
    again = DeviceExperiments("dev1", tmp_path)
    again.start(AB)
    assert [d.seq for d in again.posterior("ab1").pending] == [1]

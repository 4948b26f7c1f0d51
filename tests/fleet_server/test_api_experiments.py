"""The operator API's experiment routes on a running service: start, status, refusals,
stop, and promotion through the rollout controller."""

from __future__ import annotations

import pytest

from tests.fleet_server.test_api import Caller, _enroll, api, call, token

pytestmark = pytest.mark.integration
__all__ = ["api", "call", "token"]  # fixtures


def _store(call: Caller, data: bytes) -> str:
    status, stored = call("POST", "/api/bundles", data=data)
    assert status == 201, stored
    return str(stored["sha256"])


def test_experiments_over_the_api(call: Caller, bundles: dict[str, bytes]) -> None:
    for device in ("gw-1", "gw-2"):
        _enroll(call, device)
    v1, v2 = _store(call, bundles["v1"]), _store(call, bundles["v2"])
    variants = [{"arm": "a", "bundle_sha256": v1}, {"arm": "b", "bundle_sha256": v2}]
    for body, code, message in (
            ({"name": "ab1", "variants": variants[:1], "group": "lab"}, 400, "2 to 16"),
            ({"name": "ab1", "variants": [{"arm": "a", "bundle_sha256": "0" * 64},
                                          variants[1]], "group": "lab"}, 404, "upload it"),
            ({"name": "ab1", "variants": variants, "group": "lab", "unit": "x"}, 400,
             "unit must be"),
            ({"name": "ab1", "variants": variants, "group": "lab", "unit": "request"}, 400,
             "distinct model names"),
            ({"name": "ab1", "variants": variants, "group": "lab", "split": ["x"]}, 400,
             '"split"'),
            ({"name": "ab1", "variants": variants}, 400, "exactly one of")):
        status, answer = call("POST", "/api/experiments", body)
        assert (status, message in answer["error"]) == (code, True), answer
    status, view = call("POST", "/api/experiments", {"name": "ab1", "variants": variants,
                                                     "group": "lab", "split": [25, 75]})
    assert status == 201, view
    assert (view["status"], view["unit"], view["devices"]) == ("running", "device", 2)
    assert [(a["arm"], a["n"], a["bundle_sha256"]) for a in view["arms"]] == [
        ("a", 0, v1), ("b", 0, v2)]
    assert view["spec"]["arms"][1] == {"arm": "b", "model": "digits", "share": 0.75}
    assert call("GET", "/api/experiments/ab1")[1] == view
    assert [e["experiment"] for e in call("GET", "/api/experiments")[1]["experiments"]] == [
        "ab1"]
    assert call("GET", "/api/experiments?status=stopped")[1]["experiments"] == []
    assert call("GET", "/api/experiments/nope")[0] == 404
    assert call("POST", "/api/experiments/nope/stop", {})[0] == 404

    status, answer = call("POST", "/api/experiments/ab1/promote", {"winner": "c"})
    assert (status, "not an arm" in answer["error"]) == (400, True)
    # A rollout of a model under a running experiment would change an arm under it.
    status, answer = call("POST", "/api/rollouts", {"bundle_sha256": v2, "group": "lab"})
    assert (status, "in running experiment ab1" in answer["error"]) == (400, True), answer
    # A promotion whose rollout would be refused changes nothing: all or nothing.
    status, answer = call("POST", "/api/experiments/ab1/promote",
                          {"winner": "b", "steps": [0]})
    assert (status, "ab1 is still running" in answer["error"]) == (409, True), answer
    status, answer = call("POST", "/api/experiments/ab1/promote",
                          {"winner": "b", "gates": ["speed>=2"]})
    assert status in (400, 409), answer
    assert call("GET", "/api/experiments/ab1")[1]["status"] == "running"
    status, answer = call("POST", "/api/experiments/ab1/promote",
                          {"winner": "b", "reason": "b converts better",
                           "gates": ["agreement=off"]})
    assert status == 200, answer
    assert (answer["experiment"]["status"], answer["experiment"]["promoted"]) == (
        "promoted", "b")
    rollout = answer["rollout"]
    assert (rollout["model"], rollout["version"], rollout["targets"]) == ("digits", 2, 2)
    assert [r["id"] for r in call("GET", "/api/rollouts")[1]["rollouts"]] == [rollout["id"]]
    status, answer = call("POST", "/api/experiments/ab1/stop", {})
    assert (status, "promoted already" in answer["error"]) == (400, True)
    actions = [(e["action"], e["target"], e["reason"])
               for e in call("GET", "/api/audit")[1]["entries"]]
    assert ("experiment.start", "ab1", "") in actions
    assert ("experiment.promote", "ab1", "b converts better") in actions

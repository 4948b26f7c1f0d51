"""Convergence, the one rule: pure, table-driven."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from fleet_server.registry import desired_json, is_converged
from protocol.install_states import InstallState
from protocol.messages import Desired, DesiredModel, ModelReport, encode

WANT = {"digits": DesiredModel(2, "a" * 64, 100)}


@pytest.mark.parametrize(("running", "converged"), [
    ({}, False),
    ({"digits": ModelReport(2, "a" * 64, "committed")}, True),
    ({"digits": ModelReport(2, None, "committed")}, True),  # installed outside the fleet
    ({"digits": ModelReport(1, "a" * 64, "committed")}, False),
    ({"digits": ModelReport(3, "a" * 64, "committed")}, False),
    ({"digits": ModelReport(2, "b" * 64, "committed")}, False),
    ({"digits": ModelReport(2, "a" * 64, "probation")}, False),  # may yet roll back
    ({"vit": ModelReport(2, "a" * 64, "committed")}, False),
    ({"digits": ModelReport(2, "a" * 64, "committed"),
      "extra": ModelReport(9, None, "probation")}, True),  # undesired models do not count
])
def test_is_converged(running: dict[str, ModelReport], converged: bool) -> None:
    assert is_converged(WANT, running) is converged
    assert is_converged({}, running)


@pytest.mark.parametrize("state", [s for s in InstallState if s is not InstallState.COMMITTED])
def test_only_the_committed_state_converges(state: InstallState) -> None:
    assert not is_converged(WANT, {"digits": ModelReport(2, "a" * 64, state.value)})
    assert is_converged(WANT, {"digits": ModelReport(2, "a" * 64,
                                                     InstallState.COMMITTED.value)})


def test_desired_json_is_the_desired_message_form() -> None:
    model = DesiredModel(2, "a" * 64, 100)
    assert desired_json(model) == asdict(model)
    sent = json.loads(encode(Desired({"digits": model}, issued_at=1.0)))
    assert sent["models"]["digits"] == desired_json(model)

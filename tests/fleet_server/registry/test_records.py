"""Convergence, the one rule: pure, table-driven."""

from __future__ import annotations

import json

import pytest

from fleet_server.registry import Device, desired_json, is_converged
from protocol.install_states import InstallState
from protocol.messages import (
    DeltaOffer,
    Desired,
    DesiredModel,
    DesiredShadow,
    ModelReport,
    decode_desired,
    encode,
)

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


@pytest.mark.parametrize("model", [
    DesiredModel(2, "a" * 64, 100),
    DesiredModel(2, "a" * 64, 100, DesiredShadow(3, "b" * 64, 120, 0.1), compare_previous=0.5),
    DesiredModel(2, "a" * 64, 100, delta=DeltaOffer("c" * 64, 20, 1)),
])
def test_desired_json_is_the_desired_message_form(model: DesiredModel) -> None:
    sent = json.loads(encode(Desired({"digits": model}, issued_at=1.0)))
    shown = desired_json(model)
    assert sent["models"]["digits"] == shown
    as_sent = Desired({"digits": model}, issued_at=1.0)
    assert decode_desired(json.dumps({"protocol": 1, "issued_at": 1.0,
                                      "models": {"digits": shown}}).encode()) == as_sent


def _device(**fields: object) -> Device:
    base: dict[str, object] = {
        "id": "gw-1", "group": "lab", "tags": (), "profile": "p", "cert_fingerprint": "f" * 64,
        "enrolled_at": 0.0, "last_seen": None, "online": False, "desired": {}, "running": {},
        "reported": {}, "reported_at": None}
    return Device(**{**base, **fields})  # type: ignore[arg-type]


def test_a_device_that_never_reported_has_not_converged() -> None:
    assert not _device().converged
    assert _device(reported_at=5.0).converged  # reported, and asked for nothing
    assert not _device(reported_at=5.0, desired=WANT).converged


@pytest.mark.parametrize(("online", "last_seen", "now", "expected"), [
    (True, 100.0, 150.0, True),
    (True, 100.0, 280.0, True),    # 180 s: the edge still counts
    (True, 100.0, 281.0, False),   # not heard from for longer: offline, whatever it said
    (False, 100.0, 101.0, False),  # said offline (its will, or a clean stop)
    (True, None, 0.0, False),      # never seen
])
def test_online_needs_a_recent_word(online: bool, last_seen: float | None, now: float,
                                    expected: bool) -> None:
    device = _device(online=online, last_seen=last_seen)
    assert device.online_at(now, offline_after_s=180.0) is expected

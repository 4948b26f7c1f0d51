"""Delta updates across the whole fleet (issue 18): `fleet bundle build --delta-from`,
`fleet publish` uploading the delta bundle and showing the bytes saved, real agents over
Mosquitto fetching the delta (or the full bundle when their base is damaged), and a
signed delta that rebuilds another artifact rejected while the old version serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundle.delta import make_delta
from fleet_server.keys import KeyStore
from tests.agent.bundles import outputs, samples
from tests.agent.test_delta_install import last_layer_tuned
from tests.bundle.repo import forge_delta
from tests.fleet_server.live_fleet import DIGITS, GROUP, LiveFleet, converged, live_fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as running:
        yield running


def _join(fleet: LiveFleet, device: str) -> Path:
    state = fleet.state(device)
    fleet.enroll(device, fleet.token("--group", GROUP))
    fleet.run_agent(device, state)
    return state


def _installs(fleet: LiveFleet, device: str, version: int) -> list[dict[str, Any]]:
    """The device's install events for ``version``, oldest first, once the one committing
    it has arrived (events travel through the agent's outbox, after its reported state)."""
    def events() -> list[dict[str, Any]]:
        return [{**e["detail"], "kind": e["kind"]} for e in fleet.api.get(
            "/api/events", {"device": device, "limit": 1000})["events"]
            if e["kind"].startswith("agent.install.")
            and e["detail"].get("version") == version]

    fleet.wait(lambda: any(e["kind"] == "agent.install.committed" for e in events()),
               f"the events of {device}'s install of v{version}")
    return events()


def _fetched(fleet: LiveFleet, device: str, version: int) -> list[tuple[str, int]]:
    """(bundle sha256, bytes fetched) of each install of ``version`` the device made."""
    return list({e["install_id"]: (e["bundle_sha256"], e["bundle_size"])
                 for e in _installs(fleet, device, version)}.values())


def _tuned(fleet: LiveFleet) -> Path:
    """v2's model file: the last layer fine-tuned, under v1's file name (deltas pair
    artifacts by file name)."""
    path = fleet.home / "v2" / DIGITS.name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(last_layer_tuned())
    return path


def test_a_device_gets_v2_as_a_delta_and_one_with_a_damaged_base_the_full_bundle(
        fleet: LiveFleet) -> None:
    tuned = _tuned(fleet)
    v1 = fleet.build(1, DIGITS)
    v2 = fleet.build(2, tuned, "--delta-from", v1)
    delta_file = fleet.home / "digits-2.from-v1.efb"
    assert delta_file.stat().st_size < v2.stat().st_size / 3
    states = {d: _join(fleet, d) for d in ("gw-1", "gw-2")}

    fleet.fleet("publish", v1, "--group", GROUP, "--data", fleet.data)
    fleet.wait(converged(fleet, list(states), 1), "v1 everywhere")
    # gw-2's stored v1 is damaged on disk (it keeps serving from memory).
    slot = next((states["gw-2"] / "models" / "digits" / "1").glob("*.onnx"))
    damaged = bytearray(slot.read_bytes())
    damaged[100] ^= 0xFF
    slot.write_bytes(bytes(damaged))

    out = fleet.fleet("publish", v2, "--group", GROUP, "--data", fleet.data).stdout
    assert "uploaded the delta bundle from v1" in out
    assert "2 device(s) running v1 fetch the delta bundle" in out
    full, delta = v2.stat().st_size, delta_file.stat().st_size
    assert f"to send: {2 * delta} bytes instead of {2 * full}" in out
    fleet.wait(converged(fleet, list(states), 2), "v2 everywhere")

    x = samples(4)
    for state in states.values():
        np.testing.assert_allclose(fleet.infer(state, x), outputs(tuned.read_bytes(), x),
                                   atol=1e-4)
    bundles = {b["version"]: b for b in fleet.api.get("/api/bundles")["bundles"]}
    assert _fetched(fleet, "gw-1", 2) == [(_sha(delta_file), delta)]  # the delta only
    # gw-2's base was damaged: it fetched the full bundle, never the delta.
    assert _fetched(fleet, "gw-2", 2) == [(bundles[2]["sha256"], full)]


def test_a_signed_delta_that_rebuilds_another_model_is_rejected_then_the_full_installs(
        fleet: LiveFleet) -> None:
    tuned = _tuned(fleet)
    v1 = fleet.build(1, DIGITS)
    state = _join(fleet, "gw-1")
    fleet.fleet("publish", v1, "--group", GROUP, "--data", fleet.data)
    fleet.wait(converged(fleet, ["gw-1"], 1), "v1")

    v2 = fleet.build(2, tuned, "--delta-from", v1)
    # A builder holding the targets key signs a delta that rebuilds another model.
    signers = KeyStore.at(fleet.keys).signers("targets")
    wrong = make_delta(DIGITS.read_bytes(), last_layer_tuned(seed=7), "onnx")
    path = f"artifacts/{DIGITS.name}.from-v1.delta"
    delta_file = fleet.home / "digits-2.from-v1.efb"
    delta_file.write_bytes(forge_delta(delta_file.read_bytes(), path, wrong, signers))
    v2.write_bytes(forge_delta(v2.read_bytes(), path, wrong, signers, carry=False))
    x = samples(4)
    before = fleet.infer(state, x)

    fleet.fleet("publish", v2, "--group", GROUP, "--data", fleet.data)
    fleet.wait(converged(fleet, ["gw-1"], 2), "v2 from the full bundle")
    attempts = _installs(fleet, "gw-1", 2)
    rejected = [e for e in attempts if e["reason"] == "rejected:RebuildMismatchError"]
    assert len(rejected) == 1, json.dumps(attempts, indent=1)
    assert rejected[0]["bundle_sha256"] == _sha(delta_file)
    # The rejected install never reached activation: v1 served until the full bundle did.
    assert len([e for e in attempts if e["install_id"] == rejected[0]["install_id"]]) == 3
    assert _fetched(fleet, "gw-1", 2)[1] == (fleet.api.get("/api/bundles")["bundles"][-1][
        "sha256"], v2.stat().st_size)
    np.testing.assert_allclose(before, outputs(DIGITS.read_bytes(), x), atol=1e-4)
    np.testing.assert_allclose(fleet.infer(state, x), outputs(tuned.read_bytes(), x),
                               atol=1e-4)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()

"""The fleet end to end, every part a process (``fleet serve`` with its embedded Mosquitto,
``edge-agent run`` per device, the ``fleet`` and ``edge-agent`` commands): rollback,
encryption to recipients and take-over of a device id (issue 9.2, 9.12, 9.13)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bundle.archive import read_archive
from fleet_server.broker import Broker
from tests.agent.bundles import outputs, perturbed_digits, samples
from tests.fleet_server.live_fleet import (
    DIGITS,
    GROUP,
    LiveFleet,
    converged,
    live_fleet,
)
from tests.mqtt_broker import connection_outcome
from transport.mqtt import BrokerAddress, TLSIdentity

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path) as started:
        yield started


def _join(fleet: LiveFleet, device: str, *token_args: str) -> Path:
    state = fleet.state(device)
    fleet.enroll(device, fleet.token(*token_args))
    fleet.run_agent(device, state)
    return state


def _publish(fleet: LiveFleet, bundle: Path, *selection: str) -> str:
    return fleet.fleet("publish", bundle, *selection, "--data", fleet.data).stdout


def test_rollback_makes_devices_serve_v1_again(fleet: LiveFleet) -> None:
    """Issue 9.13: after v1 then v2, `fleet rollback` said "v2 -> v1" and every device
    refused v1 (freeze) forever. Now v1 comes back as v3 and devices serve v1's outputs."""
    perturbed = fleet.home / "perturbed.onnx"
    perturbed.write_bytes(perturbed_digits())
    v1, v2 = fleet.build(1, DIGITS), fleet.build(2, perturbed)
    x = samples(4)
    want_v1, want_v2 = outputs(DIGITS.read_bytes(), x), outputs(perturbed.read_bytes(), x)
    assert not np.allclose(want_v1, want_v2, atol=1e-3)
    states = [_join(fleet, d, "--group", GROUP) for d in ("gw-1", "gw-2")]
    devices = ["gw-1", "gw-2"]

    _publish(fleet, v1, "--group", GROUP)
    fleet.wait(converged(fleet, devices, 1), "v1 everywhere")
    _publish(fleet, v2, "--group", GROUP)
    fleet.wait(converged(fleet, devices, 2), "v2 everywhere")
    for state in states:
        np.testing.assert_allclose(fleet.infer(state, x), want_v2, atol=1e-4)

    done = fleet.fleet("rollback", "--group", GROUP, "--data", fleet.data)
    assert "re-released digits v1 as v3 (devices refuse lower versions" in done.stdout
    assert "gw-1: digits v2 -> v3 (v1 re-released)" in done.stdout
    fleet.wait(converged(fleet, devices, 3), "the re-release of v1 everywhere")
    for state in states:
        np.testing.assert_allclose(fleet.infer(state, x), want_v1, atol=1e-4)
    listed = fleet.fleet("bundles", "--data", fleet.data).stdout
    assert "re-release of v1" in listed.splitlines()[3]

    # Publishing v1 itself is refused before anything changes, and says what to do.
    before = fleet.api.get("/api/events")["events"][-1]["id"]
    refused = fleet.fleet("publish", v1, "--group", GROUP, "--data", fleet.data, check=False)
    assert refused.returncode == 1, refused.stdout
    assert "digits v1 is older than v3, which gw-1 has" in refused.stderr
    assert "fleet rollback" in refused.stderr
    assert [e["kind"] for e in fleet.api.get("/api/events", {"since": before})["events"]
            if e["kind"].startswith("desired.")] == []
    # The next build continues above the server's re-release (one count of versions).
    refused = fleet.fleet("bundle", "build", "--name", "digits", "--version", "3", "--model",
                          DIGITS, "--profile", "x86-64-avx2", "--keys", fleet.keys, "--out",
                          fleet.home / "again.efb", check=False)
    assert refused.returncode == 1
    assert "digits v3 was already built or released; versions only go up, use --version 4" \
        in refused.stderr
    v4 = fleet.build(4, perturbed)
    _publish(fleet, v4, "--group", GROUP)
    fleet.wait(converged(fleet, devices, 4), "v4 after the rollback")


def test_bundles_encrypted_for_a_group_open_only_there(fleet: LiveFleet) -> None:
    """Issue 9.12: enrollment registers each device's X25519 key; a bundle built for
    group:lab opens on the lab's devices and is refused, with the reason, elsewhere; and a
    plain bundle can be encrypted at publish time for a device."""
    lab = [_join(fleet, d, "--group", GROUP) for d in ("gw-1", "gw-2")]
    _join(fleet, "gw-3", "--group", "field")
    keys = {d: fleet.devices()[d]["encryption_key"] for d in ("gw-1", "gw-2", "gw-3")}
    assert all(len(base64.b64decode(k)) == 32 for k in keys.values())

    sealed = fleet.build(1, DIGITS, "--encrypt-for", f"group:{GROUP}", "--data", fleet.data)
    archive = read_archive(sealed)
    stored = archive.read("targets/artifacts/digits_cnn.onnx")
    assert DIGITS.read_bytes()[:64] not in stored  # not readable at rest or on the wire
    _publish(fleet, sealed, "--device", "gw-1", "--device", "gw-2", "--device", "gw-3")
    fleet.wait(converged(fleet, ["gw-1", "gw-2"], 1), "the lab to install v1")
    x = samples(2)
    for state in lab:
        np.testing.assert_allclose(fleet.infer(state, x), outputs(DIGITS.read_bytes(), x),
                                   atol=1e-4)

    def refused() -> dict[str, object] | None:
        install = (fleet.devices()["gw-3"]["reported"].get("installs") or {}).get("digits")
        return install if install and install.get("state") == "failed" else None

    fleet.wait(refused, "gw-3 to refuse the bundle")
    install = refused()
    assert install is not None
    assert install["reason"] == "rejected:DecryptionError"
    assert not fleet.devices()["gw-3"]["converged"]

    # Encrypted at publish time, for gw-3 only: the server re-releases it as v2.
    plain = fleet.build(2, DIGITS)
    done = fleet.fleet("publish", plain, "--device", "gw-3", "--encrypt-for", "device:gw-3",
                       "--data", fleet.data)
    assert "re-released digits v2 as v3" in done.stdout
    fleet.wait(converged(fleet, ["gw-3"], 3), "gw-3 to install its own encrypted v3")
    refused_selector = fleet.fleet("publish", plain, "--group", GROUP, "--encrypt-for",
                                   "group:nowhere", "--data", fleet.data, check=False)
    assert refused_selector.returncode == 1
    assert "group:nowhere matches no enrolled device" in refused_selector.stderr


def test_an_enrolled_device_is_not_taken_over(fleet: LiveFleet) -> None:
    """Issue 9.2: a token for any group re-enrolled gw-b and its old certificate kept
    working. Now a group token cannot take an enrolled id; a token for the device (or a
    reset) can, and the certificate it replaces is refused by the broker."""
    v1 = fleet.build(1, DIGITS)
    first = _join(fleet, "gw-1", "--group", GROUP)
    _join(fleet, "gw-2", "--group", GROUP)
    _publish(fleet, v1, "--group", GROUP)
    fleet.wait(converged(fleet, ["gw-1", "gw-2"], 1), "v1 everywhere")
    broker = BrokerAddress.from_url(fleet.api.get("/api/status")["broker_url"])

    def outcome(state: Path) -> str:
        identity = TLSIdentity(state / "keys" / "ca.crt", state / "keys" / "device.crt",
                               state / "keys" / "device.key")
        return connection_outcome(Broker.external(broker.url).client(identity), broker.host,
                                  broker.port)

    thief = fleet.home / "thief"
    done = fleet.enroll("gw-1", fleet.token("--group", "guest"), state=thief, check=False)
    assert done.returncode == 1
    assert "device 'gw-1' is enrolled already" in done.stderr
    assert "fleet enroll-token --device gw-1" in done.stderr
    assert fleet.devices()["gw-1"]["group"] == GROUP

    # The operator's consent: a token for gw-1 (it stays in its group). The new install
    # takes over; the old certificate is refused from then on.
    old_fingerprint = fleet.devices()["gw-1"]["cert_fingerprint"]
    reimaged = fleet.home / "gw-1-reimaged"
    fleet.enroll("gw-1", fleet.token("--device", "gw-1"), state=reimaged)
    assert fleet.devices()["gw-1"]["cert_fingerprint"] != old_fingerprint
    assert outcome(first).startswith(("handshake failed", "disconnected"))
    # ...and the connection the old certificate held is cut at once, not left open until
    # the new install connects.
    fleet.wait(lambda: "lost the broker" in fleet.log("gw-1"),
               "the old gw-1's agent to lose its connection")
    fleet.stop("gw-1")
    fleet.run_agent("gw-1-reimaged", reimaged)
    fleet.wait(converged(fleet, ["gw-1"], 1), "the re-imaged gw-1 to get v1 back")
    assert outcome(reimaged) == "connected"

    # A reset: gw-2 is cut off at once, and any token may then enroll the id.
    second = fleet.state("gw-2")
    fleet.fleet("device", "reset", "gw-2", "--data", fleet.data)
    assert outcome(second).startswith(("handshake failed", "disconnected"))
    fleet.wait(lambda: "lost the broker" in fleet.log("gw-2"),
               "gw-2's agent to lose its connection")
    fleet.stop("gw-2")
    replacement = fleet.home / "gw-2-new"
    fleet.enroll("gw-2", fleet.token("--group", GROUP), state=replacement)
    fleet.run_agent("gw-2-new", replacement)
    fleet.wait(converged(fleet, ["gw-2"], 1), "the replacement gw-2 to get v1")
    kinds = [e["kind"] for e in fleet.api.get("/api/events", {"device": "gw-2"})["events"]]
    assert "device.reset" in kinds
    assert kinds.count("certificate.revoked") == 1

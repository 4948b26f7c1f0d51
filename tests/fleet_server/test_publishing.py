"""Publish and rollback through FleetService (fleet_server.publishing) over a real
Mosquitto, on SQLite and on PostgreSQL: who gets which desired state, re-releases, refused
bundles, and a publish while the broker is away (conventions: test_service.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from bundle.errors import ChecksumError, UntrustedSignatureError
from bundle.trust import TrustedState, verify_bundle
from fleet_server.errors import (
    RegistryError,
    ReleaseError,
)
from fleet_server.service import FleetService
from protocol import messages
from tests.bundle.repo import NOW, Repo
from tests.fleet_server.server_env import (
    connect_device,
    desired_messages,
    enroll,
    fetch_bundle,
    service_config,
    wait_desired,
    wait_until,
    write_keys,
)
from tests.mqtt_broker import Recorder

pytestmark = pytest.mark.integration


def test_publish_to_group_reaches_exactly_that_group(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    a1, a2 = (enroll(service, tmp_path, d, group="lab") for d in ("a1", "a2"))
    b1 = enroll(service, tmp_path, "b1", group="field")
    r_a1, r_b1 = connect_device(a1, clients, "desired"), connect_device(b1, clients, "desired")
    # Enrollment published an empty desired state, retained: a fresh device gets it at once.
    for recorder, device in ((r_a1, a1), (r_b1, b1)):
        wait_desired(recorder, device, 1)
        assert desired_messages(recorder, device)[0].models == {}

    record = service.add_bundle(bundles["v1"])
    result = service.publish(record.sha256, group="lab")
    assert result.devices == ("a1", "a2")
    assert [c.device for c in result.changes] == ["a1", "a2"]
    want = {"digits": messages.DesiredModel(1, record.sha256, len(bundles["v1"]))}
    desired = wait_desired(r_a1, a1, 2)
    assert desired.models == want
    # The server stores batched events: devices may send them (docs/transport.md).
    assert desired.features == (messages.FEATURE_EVENT_BATCH,)
    # a2 connects afterwards: the retained message is there for it.
    r_a2 = connect_device(a2, clients, "desired")
    assert wait_desired(r_a2, a2, 1).models == want

    # Sentinel: b1's own publish comes after the group's; b1 gets only that one.
    service.publish(record.sha256, devices=["b1"])
    wait_desired(r_b1, b1, 2)
    assert [m.models for m in desired_messages(r_b1, b1)] == [{}, want]
    assert r_b1.topics() == {b1.topic("desired")}


def test_rollback_publishes_a_re_release_of_the_previous_state(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes], repo: Repo,
        clients: list[Recorder]) -> None:
    """Issue 9.13: devices refuse v1 once they trust v2, so a rollback re-releases v1's
    contents as v3 under fresh metadata, signed by the server, and desires that."""
    device = enroll(service, tmp_path, "gw-1")
    v1, v2 = service.add_bundle(bundles["v1"]), service.add_bundle(bundles["v2"])
    service.publish(v1.sha256, group="lab")
    service.publish(v2.sha256, devices=["gw-1"])
    result = service.rollback(group="lab", model="digits")
    [v3] = result.released
    assert (v3.name, v3.version, v3.rollback_of) == ("digits", 3, 1)
    assert [(c.before and c.before.version, c.after and c.after.version)
            for c in result.changes] == [(2, 3)]
    recorder = connect_device(device, clients, "desired")
    want = wait_desired(recorder, device, 1).models["digits"]
    assert (want.version, want.bundle_sha256) == (3, v3.sha256)

    # What the device fetches verifies on a device that trusts v2, and carries v1.
    data = fetch_bundle(recorder, device, v3.sha256, v3.size)
    trusted = TrustedState(root=repo.root)
    for earlier in (bundles["v1"], bundles["v2"]):
        verified = verify_bundle(earlier, trusted, now=NOW)
        trusted = verified.trusted.with_installed("digits", verified.manifest.version,
                                                  verified.manifest_sha256)
    verified = verify_bundle(data, trusted, now=NOW)
    assert (verified.manifest.version, verified.manifest.rollback_of) == (3, 1)
    assert verified.artifacts == verify_bundle(bundles["v1"], TrustedState(root=repo.root),
                                               now=NOW).artifacts

    service.rollback(devices=["gw-1"])  # back to nothing: an empty desired is published
    recorder.wait(lambda: desired_messages(recorder, device)[-1].models == {},
                  "the empty desired state")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        service.rollback(devices=["gw-1"])


def test_without_online_keys_a_rollback_says_so_and_changes_nothing(
        tmp_path: Path, db_url: str, repo: Repo, bundles: dict[str, bytes]) -> None:
    keys = write_keys(tmp_path / "keys", repo, online=False)
    with FleetService(service_config(tmp_path / "server", keys, db_url)) as service:
        enroll(service, tmp_path, "gw-1")
        v1, v2 = service.add_bundle(bundles["v1"]), service.add_bundle(bundles["v2"])
        service.publish(v1.sha256, group="lab")
        service.publish(v2.sha256, group="lab")
        with pytest.raises(ReleaseError, match=r"cannot sign a re-release of digits v1 .*"
                           r"fleet serve --keys"):
            service.rollback(group="lab")
        device = service.registry.get_device("gw-1")
        assert device is not None
        assert device.desired["digits"].version == 2
        assert [b.version for b in service.registry.list_bundles()] == [1, 2]


def test_bad_bundles_are_refused_with_the_reason(service: FleetService,
                                                 bundles: dict[str, bytes]) -> None:
    tampered = bytearray(bundles["v1"])
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(ChecksumError):
        service.add_bundle(bytes(tampered))
    with pytest.raises(UntrustedSignatureError):
        service.add_bundle(Repo().build())  # signed by keys this fleet does not trust
    assert service.registry.list_bundles() == []


def test_publishing_without_a_broker_says_it_was_not_delivered(
        service: FleetService, tmp_path: Path, bundles: dict[str, bytes],
        clients: list[Recorder]) -> None:
    """kill -9 of the embedded broker: the service says it is cut off, publishes are stored
    but reported undelivered, and all is sent once the supervisor has restarted it."""
    device = enroll(service, tmp_path, "gw-1")
    record = service.add_bundle(bundles["v1"])
    pid = service.broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not service.connected, "the service to see the broker gone")
    assert service.disconnected_since is not None
    result = service.publish(record.sha256, devices=["gw-1"])
    assert result.delivered is False
    wait_until(lambda: service.connected, "the broker's restart and the reconnection",
               timeout=30)
    assert service.broker.restarts == 1
    recorder = connect_device(device, clients, "desired")
    assert wait_desired(recorder, device, 1).models["digits"].version == 1

"""Devices: enrollment, updates, online state, reports and convergence, on both databases."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry
from fleet_server.registry.device_messages import REORDER_WINDOW_S
from protocol.install_states import InstallState
from protocol.messages import DesiredModel, InstallReport, ModelReport, Reported, encode
from tests.fleet_server.registry.helpers import (
    FINGERPRINT,
    Clock,
    bundle,
    enroll,
    kinds,
    report,
)


def test_upsert_get_and_list_devices(reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-1", "lab", ("canary", "eu"))
    enroll(reg, "gw-2", "lab", ("eu",))
    enroll(reg, "cam-1", "field")
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.group, device.tags, device.profile) == ("lab", ("canary", "eu"),
                                                           "x86_64-avx2")
    assert (device.cert_fingerprint, device.enrolled_at) == (FINGERPRINT, clock.now)
    assert (device.online, device.last_seen, device.reported_at) == (False, None, None)
    assert (dict(device.desired), dict(device.running), dict(device.reported)) == ({}, {}, {})
    assert reg.get_device("nope") is None
    assert [d.id for d in reg.list_devices()] == ["cam-1", "gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(group="lab")] == ["gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(tag="eu")] == ["gw-1", "gw-2"]
    assert [d.id for d in reg.list_devices(group="lab", tag="canary")] == ["gw-1"]
    assert reg.list_devices(group="nowhere") == []


def test_enrolling_again_replaces_identity_and_keeps_desired_and_reported(
        reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-1", tags=("old",))
    sha = bundle(reg)
    reg.set_desired(sha, devices=["gw-1"])
    reg.set_reported("gw-1", report(1, sha))
    clock.now += 60
    device = reg.upsert_device("gw-1", group="field", profile="arm64-neon",
                               cert_fingerprint="CD" * 32, tags=["new", "new"])
    assert (device.group, device.profile, device.tags) == ("field", "arm64-neon", ("new",))
    assert (device.cert_fingerprint, device.enrolled_at) == ("cd" * 32, clock.now)
    assert list(device.desired) == ["digits"]
    assert device.converged
    again = reg.events(device="gw-1")[-1]
    assert (again.kind, again.detail["again"]) == ("device.enrolled", True)


def test_update_device(reg: Registry) -> None:
    enroll(reg, "gw-1", tags=("a",))
    device = reg.update_device("gw-1", group="field", tags=["b", "c"])
    assert (device.group, device.tags, device.profile) == ("field", ("b", "c"), "x86_64-avx2")
    assert reg.list_devices(tag="a") == []
    with pytest.raises(RegistryError, match="unknown device 'gw-9'; it must enroll first"):
        reg.update_device("gw-9", group="x")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device_id": "gw/1"}, "invalid device id 'gw/1'"),
    ({"device_id": "+"}, "invalid device id"),
    ({"device_id": "gw:1"}, "invalid device id"),
    ({"device_id": "a" * 65}, "use 1 to 64 letters"),
    ({"device_id": ""}, "invalid device id"),
    ({"group": " lab"}, "invalid group ' lab'"),
    ({"cert_fingerprint": "abc"}, "not a SHA-256 hex digest"),
    ({"tags": "canary"}, "tags must be a list of strings"),
    ({"tags": ["ok", ""]}, "invalid tag ''"),
])
def test_upsert_refuses_bad_input(reg: Registry, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"device_id": "gw-1", "group": "lab", "profile": "p",
                            "cert_fingerprint": FINGERPRINT, "tags": (), **kwargs}
    with pytest.raises(RegistryError, match=message):
        reg.upsert_device(args.pop("device_id"), **args)
    assert reg.list_devices() == []


def test_online_and_last_seen(reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-1")
    clock.now += 5
    reg.set_online("gw-1", True)
    reg.set_online("gw-1", True)  # no transition: no second event
    seen = clock.now
    clock.now += 5
    reg.set_online("gw-1", False)
    device = reg.get_device("gw-1")
    assert device is not None
    assert (device.online, device.last_seen) == (False, seen)
    assert [d.id for d in reg.list_devices(online=False)] == ["gw-1"]
    assert kinds(reg, "gw-1") == ["device.enrolled", "device.online", "device.offline"]
    with pytest.raises(RegistryError, match="unknown device"):
        reg.set_online("gw-9", True)


def test_reports_are_parsed_once_and_kept_as_sent(reg: Registry, clock: Clock) -> None:
    enroll(reg, "gw-0")
    clock.now += 1
    sent = Reported(profile="x86_64-avx2", agent_version="0.2.0",
                    models={"digits": ModelReport(2, "a" * 64, "probation"),
                            "local": ModelReport(7, None, "committed")},
                    installs={"digits": InstallReport(2, "a" * 64, "probation")}, at=0.5)
    # A newer agent's extra field is kept for display, and ignored.
    payload = json.dumps({**json.loads(encode(sent)), "newer": [1]}).encode()
    reg.set_reported("gw-0", payload)
    device = reg.get_device("gw-0")
    assert device is not None
    assert (device.online, device.last_seen, device.reported_at) == (True, clock.now,
                                                                      clock.now)
    assert device.running == sent.models
    assert device.reported == json.loads(payload)
    assert kinds(reg, "gw-0") == ["device.enrolled", "device.online"]
    # A new report replaces the old one whole: models it no longer names are gone.
    reg.set_reported("gw-0", report(3, "b" * 64))
    device = reg.get_device("gw-0")
    assert device is not None
    assert device.running == {"digits": ModelReport(3, "b" * 64, "committed")}
    assert device.reported["installs"] == {}


@pytest.mark.parametrize(("payload", "message"), [
    (b"not json", "the report of device 'gw-0' is refused: reported is not JSON"),
    (b'{"protocol": 1, "agent_version": "x", "at": 1, "models": {"digits": {}}}',
     "refused: field 'version' must be an integer from 0"),
    (b'{"protocol": 2}', "refused: reported has protocol version 2"),
    (json.dumps({"protocol": 1, "agent_version": "x", "at": 1}).encode("utf-16"),
     "refused: 'utf-8' codec can't decode"),  # JSON, but not the UTF-8 MQTT carries
])
def test_a_report_that_does_not_parse_is_refused_and_changes_nothing(
        reg: Registry, payload: bytes, message: str) -> None:
    enroll(reg, "gw-0")
    reg.set_reported("gw-0", report(1))
    with pytest.raises(RegistryError, match=message):
        reg.set_reported("gw-0", payload)
    device = reg.get_device("gw-0")
    assert device is not None
    assert device.running["digits"].version == 1
    with pytest.raises(RegistryError, match="unknown device 'gw-9'"):
        reg.set_reported("gw-9", report(1))


def test_desired_reported_and_convergence(reg: Registry) -> None:
    for i in range(3):
        enroll(reg, f"gw-{i}")
    sha = bundle(reg, version=2)
    reg.set_desired(sha, devices=["gw-0", "gw-1"])
    # gw-2 is asked for nothing but never reported: nothing says it runs what it should.
    assert [d.id for d in reg.unconverged()] == ["gw-0", "gw-1", "gw-2"]
    reg.set_reported("gw-0", report(2, sha, InstallState.PROBATION))
    assert [d.id for d in reg.unconverged()] == ["gw-0", "gw-1", "gw-2"]
    reg.set_reported("gw-0", report(2, sha))
    reg.set_reported("gw-1", report(2, "f" * 64))  # the right version of another bundle
    reg.set_reported("gw-2", report(1, sha))  # runs a model nobody asked of it: converged
    assert [d.id for d in reg.unconverged()] == ["gw-1"]
    assert [d.id for d in reg.unconverged(group="elsewhere")] == []
    stored = reg.get_device("gw-0")
    assert stored is not None
    assert stored.converged
    assert stored.desired == {"digits": DesiredModel(2, sha, len(b"digits v2"))}
    assert stored.desired_json() == {"digits": {"version": 2, "bundle_sha256": sha,
                                                "size": len(b"digits v2")}}


def _report_at(version: int, at: float) -> bytes:
    return encode(Reported(profile="x86_64-avx2", agent_version="0.2.0",
                           models={"digits": ModelReport(version, "a" * 64, "committed")},
                           at=at))


def test_a_report_overtaken_on_the_way_is_not_stored_over_a_newer_one(
        reg: Registry, clock: Clock) -> None:
    """Two server processes take one device's messages in turn (shared subscriptions): its
    older report can arrive last, late by any server backlog. Sent less than the window
    before the stored one (by the device's clock) it is not stored, however long after it
    arrives; sent further back, it is (a device whose clock was set back is believed)."""
    enroll(reg, "gw-0")
    reg.set_reported("gw-0", _report_at(2, at=100.0))
    clock.now += 1
    reg.set_reported("gw-0", _report_at(1, at=99.0))
    device = reg.get_device("gw-0")
    assert device is not None
    assert device.running["digits"].version == 2
    assert device.last_seen == clock.now  # it was heard, all the same
    clock.now += 600  # a server's backlog: the device clock decides, not the server's
    reg.set_reported("gw-0", _report_at(1, at=100.0 - REORDER_WINDOW_S + 1))
    device = reg.get_device("gw-0")
    assert device is not None
    assert (device.running["digits"].version, device.reported["at"]) == (2, 100.0)
    reg.set_reported("gw-0", _report_at(1, at=100.0 - REORDER_WINDOW_S))  # clock set back
    device = reg.get_device("gw-0")
    assert device is not None
    assert device.running["digits"].version == 1
    assert device.reported_at == clock.now



def test_get_devices_reads_the_listed_devices_only(reg: Registry) -> None:
    """More ids than one IN (...) list, and most of the fleet (read in one pass); unknown
    and repeated ids left out; the same records as listing the fleet gives."""
    with reg._tx(write=True) as tx:  # white-box bulk insert: 2,600 enrollments one by one
        tx.many("INSERT INTO devices (id, group_name, profile, cert_fingerprint, enrolled_at, "
                "online, reported) VALUES (?, 'lab', 'p', ?, 0, ?, '{}')",
                [(f"gw-{i:04}", FINGERPRINT, False) for i in range(2600)])
    reg.update_device("gw-0005", tags=["eu"])
    reg.set_reported("gw-0005", report(1))
    everyone = reg.list_devices()
    for step in (5, 1):  # 520 of 2,600 by id lists; all of them
        wanted = [f"gw-{i:04}" for i in range(0, 2600, step)]
        found = reg.get_devices([*reversed(wanted), "gw-0000", "nobody"])
        assert found == [d for d in everyone if d.id in set(wanted)]
        assert [d.id for d in found] == wanted
    assert reg.get_devices(["gw-0005"])[0].tags == ("eu",)
    assert reg.get_devices([]) == []

"""Schema v3 on both databases: the take-over rule of enrollment, tokens for one device id,
resets, device encryption keys, bundles' metadata versions and rollback substitution
(issue 9.2, 9.12, 9.13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Enrolled, Registry, open_registry
from tests.fleet_server.registry.helpers import DAY, FINGERPRINT, Clock, enroll, kinds
from tests.fleet_server.registry.test_migrations import load_v1

KEY = "A" * 43 + "="  # base64 of 32 bytes


def _enroll_with(reg: Registry, token: str, device_id: str,
                 fingerprint: str = FINGERPRINT) -> Enrolled:
    return reg.enroll_device(token, device_id, profile="x86_64-avx2",
                             cert_fingerprint=fingerprint, encryption_key=KEY)


def test_a_group_token_cannot_take_over_an_enrolled_device(reg: Registry) -> None:
    first = _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    assert (first.device.group, first.device.encryption_key) == ("lab", KEY)
    assert first.replaced_fingerprint is None
    guest = reg.issue_token("guest", DAY)
    with pytest.raises(RegistryError, match=r"device 'gw-b' is enrolled already.*"
                       r"fleet enroll-token --device gw-b.*fleet device reset gw-b"):
        _enroll_with(reg, guest, "gw-b", "cd" * 32)
    device = reg.get_device("gw-b")
    assert device is not None
    assert (device.group, device.cert_fingerprint) == ("lab", FINGERPRINT)
    assert _enroll_with(reg, guest, "gw-c").device.group == "guest"  # the token survived


def test_a_token_for_the_device_re_enrolls_it_and_names_the_old_certificate(
        reg: Registry) -> None:
    _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    reg.set_desired(reg.put_bundle(b"v1", "digits", 1).sha256, devices=["gw-b"])
    bound = reg.issue_token("lab", DAY, device="gw-b")
    with pytest.raises(RegistryError, match="issued for device 'gw-b', not 'gw-c'"):
        _enroll_with(reg, bound, "gw-c")
    again = _enroll_with(reg, bound, "gw-b", "cd" * 32)
    assert again.replaced_fingerprint == FINGERPRINT
    assert again.device.cert_fingerprint == "cd" * 32
    assert again.device.desired["digits"].version == 1  # a re-imaged device gets it back
    assert reg.redeem_token(reg.issue_token("lab", DAY, device="gw-9"), "gw-9") == "lab"


def test_after_a_reset_any_token_may_enroll_the_id(reg: Registry, clock: Clock) -> None:
    _enroll_with(reg, reg.issue_token("lab", DAY), "gw-b")
    reset = reg.reset_device("gw-b")
    assert reset.cert_fingerprint == FINGERPRINT
    assert reset.reset_at == clock.now
    again = _enroll_with(reg, reg.issue_token("field", DAY), "gw-b", "cd" * 32)
    assert again.replaced_fingerprint is None  # revoked by the reset already
    assert (again.device.group, again.device.reset_at) == ("field", None)
    with pytest.raises(RegistryError, match="unknown device"):
        reg.reset_device("gw-9")
    assert "device.reset" in kinds(reg, "gw-b")


def test_encryption_keys_must_be_x25519_public_keys(reg: Registry) -> None:
    token = reg.issue_token("lab", DAY)
    with pytest.raises(RegistryError, match="X25519 public key"):
        reg.enroll_device(token, "gw-1", profile="p", cert_fingerprint=FINGERPRINT,
                          encryption_key="not base64")
    assert reg.enroll_device(token, "gw-1", profile="p", cert_fingerprint=FINGERPRINT
                             ).device.encryption_key is None


def test_bundles_record_metadata_versions_and_rollback_of(reg: Registry) -> None:
    assert reg.release_versions("digits") == (0, 0)
    reg.put_bundle(b"v1", "digits", 1, metadata_version=4)
    reg.put_bundle(b"s1", "speech", 7, metadata_version=9)
    v3 = reg.put_bundle(b"v3", "digits", 3, metadata_version=10, rollback_of=1)
    assert (v3.metadata_version, v3.rollback_of) == (10, 1)
    assert reg.get_bundle(v3.sha256) == v3
    assert reg.release_versions("digits") == (3, 10)
    assert reg.release_versions("speech") == (7, 10)


def test_rollback_dry_run_and_substitute(reg: Registry) -> None:
    enroll(reg, "gw-1")
    v1, v2 = reg.put_bundle(b"v1", "digits", 1), reg.put_bundle(b"v2", "digits", 2)
    reg.set_desired(v1.sha256, group="lab")
    reg.set_desired(v2.sha256, group="lab")
    plan = reg.rollback(group="lab", dry_run=True)
    assert [(c.before, c.after) for c in plan] == [(v2.desired, v1.desired)]
    device = reg.get_device("gw-1")
    assert device is not None
    assert device.desired["digits"].version == 2  # nothing changed
    v3 = reg.put_bundle(b"v3", "digits", 3, rollback_of=1)
    with pytest.raises(RegistryError, match="changed while the rollback was prepared"):
        reg.rollback(group="lab", substitute={})
    changes = reg.rollback(group="lab", substitute={v1.sha256: v3.desired})
    assert [c.after for c in changes] == [v3.desired]
    assert reg.was_desired("gw-1", v3.sha256)
    assert [c.after for c in reg.rollback(group="lab")] == [None]  # twice: two changes


def test_an_upgraded_database_has_the_new_columns_empty(db_url: str, tmp_path: Path) -> None:
    with open_registry(load_v1(db_url), blob_dir=tmp_path / "blobs") as reg:
        assert {(b.metadata_version, b.rollback_of) for b in reg.list_bundles()} == {(0, None)}
        assert {(d.encryption_key, d.reset_at) for d in reg.list_devices()} == {(None, None)}
        device = reg.list_devices()[0].id
        # An enrolled id of the old data is protected like any other.
        with pytest.raises(RegistryError, match="is enrolled already"):
            _enroll_with(reg, reg.issue_token("lab", DAY), device)
        assert _enroll_with(reg, reg.issue_token("lab", DAY, device=device), device
                            ).device.encryption_key == KEY

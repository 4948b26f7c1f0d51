"""Enrollment and reset through FleetService (fleet_server.enroller) over a real Mosquitto,
on SQLite and on PostgreSQL (conventions: test_service.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from fleet_server.errors import (
    CSRError,
    EnrollmentError,
    RegistryError,
)
from fleet_server.service import FleetService
from protocol.enrollment import EnrollmentToken, new_secret, pin_of
from tests.bundle.repo import Repo
from tests.fleet_server.server_env import (
    PROFILE,
    enroll,
)
from transport.mqtt import BrokerAddress
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

pytestmark = pytest.mark.integration


def test_enroll_returns_identity_broker_and_root(service: FleetService, tmp_path: Path,
                                                 repo: Repo) -> None:
    device = enroll(service, tmp_path, "gw-1", group="lab", tags=("canary",))
    e = device.enrollment
    cert = x509.load_pem_x509_certificate(e.certificate_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-1"
    assert (e.fleet, e.group, e.root_json) == ("testfleet", "lab", repo.root)
    assert e.ca_certificate_pem == service.ca.cert_pem
    assert BrokerAddress.from_url(e.broker_url) == BrokerAddress("127.0.0.1",
                                                                 service.broker.address.port)
    record = service.registry.get_device("gw-1")
    assert record is not None
    assert (record.group, record.profile, record.tags) == ("lab", PROFILE, ("canary",))
    assert record.cert_fingerprint == certificate_fingerprint(e.certificate_pem)


def test_enroll_refusals_keep_the_token_unless_it_was_used(service: FleetService) -> None:
    token = service.issue_token("lab", 600).token
    _, csr = make_device_key_and_csr("gw-2")
    with pytest.raises(CSRError, match="does not carry a PEM CSR"):
        service.enroll(token, "gw-2", b"not a csr", PROFILE)
    with pytest.raises(CSRError, match="service identity"):
        service.enroll(token, "fleet-server", csr, PROFILE)
    with pytest.raises(RegistryError, match="invalid profile"):
        service.enroll(token, "gw-2", csr, " padded ")
    service.enroll(token, "gw-2", csr, PROFILE)  # the token survived every refusal
    with pytest.raises(EnrollmentError, match="already used by device 'gw-2'"):
        service.enroll(token, "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)
    with pytest.raises(EnrollmentError, match="not an enrollment token"):
        service.enroll("nope", "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)
    unknown = EnrollmentToken(new_secret(), service.ca_pin, pin_of(service.root_json()))
    with pytest.raises(EnrollmentError, match="unknown enrollment token"):
        service.enroll(unknown.encode(), "gw-3", make_device_key_and_csr("gw-3")[1], PROFILE)

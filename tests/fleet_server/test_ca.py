"""The fleet CA and the device side of enrollment (transport.x509): what gets issued, what
gets refused, and fingerprints."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_server.ca import FleetCA, IssuedIdentity
from fleet_server.errors import CAError, CSRError
from fleet_server.registry import open_registry
from transport.x509 import certificate_common_name, certificate_fingerprint, make_device_key_and_csr


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.create(tmp_path_factory.mktemp("ca") / "ca", "f1")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
         common_name: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


def test_create_writes_a_private_key_and_a_ca_certificate(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca", "f1")
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert isinstance(ca.certificate.public_key(), ec.EllipticCurvePublicKey)
    ca.certificate.verify_directly_issued_by(ca.certificate)  # self-signed

    loaded = FleetCA.load(tmp_path / "ca")
    assert (loaded.fleet, loaded.cert_pem) == ("f1", ca.cert_pem)


def test_create_refuses_an_existing_ca(ca: FleetCA) -> None:
    with pytest.raises(CAError, match="already holds a fleet CA"):
        FleetCA.create(ca.directory, "f1")


@pytest.mark.parametrize("fleet", ["", "a/b", "fleet#", "with space"])
def test_create_refuses_a_fleet_name_unfit_for_topics(tmp_path: Path, fleet: str) -> None:
    with pytest.raises(CAError, match="invalid fleet name"):
        FleetCA.create(tmp_path / "ca", fleet)


def test_load_reports_a_missing_or_inconsistent_ca(tmp_path: Path) -> None:
    with pytest.raises(CAError, match=r"not a complete fleet CA \(.*ca.key is missing\)"):
        FleetCA.load(tmp_path / "nothing")
    first = FleetCA.create(tmp_path / "first", "f1")
    second = FleetCA.create(tmp_path / "second", "f1")
    (first.directory / "ca.key").write_bytes((second.directory / "ca.key").read_bytes())
    with pytest.raises(CAError, match="is not the key of"):
        FleetCA.load(first.directory)


def test_signed_device_certificate(ca: FleetCA) -> None:
    key_pem, csr_pem = make_device_key_and_csr("dev-1")
    cert = _cert(ca.sign_device_csr(csr_pem, "dev-1", validity_days=30))

    cert.verify_directly_issued_by(ca.certificate)
    assert certificate_common_name(cert.public_bytes(serialization.Encoding.PEM)) == "dev-1"
    assert _usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The certificate is for the device's own key, which never left the device.
    device_key = serialization.load_pem_private_key(key_pem, None)
    assert cert.public_key() == device_key.public_key()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_signing_forces_the_enrolled_device_id_as_cn(
        ca: FleetCA, caplog: pytest.LogCaptureFixture) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    # The device asks to be someone else, with extra attributes: only its key is used.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-admin"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops")])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(name)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    with caplog.at_level(logging.WARNING, "fleet_server.ca"):
        cert = _cert(ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM), "dev-2"))

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-2"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME) == []
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "asked for subject" in caplog.text


def test_csr_with_a_bad_signature_is_refused(ca: FleetCA) -> None:
    _, csr_pem = make_device_key_and_csr("dev1")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    # Change the requested CN after signing: the signature no longer covers the content.
    tampered = x509.load_der_x509_csr(der.replace(b"dev1", b"dev2"))
    assert not tampered.is_signature_valid
    with pytest.raises(CSRError, match="signature does not verify"):
        ca.sign_device_csr(tampered.public_bytes(serialization.Encoding.PEM), "dev1")


@pytest.mark.parametrize("data", [b"", b"not a csr",
                                  b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                  b"-----END CERTIFICATE REQUEST-----\n"])
def test_garbage_instead_of_a_csr_is_refused(ca: FleetCA, data: bytes) -> None:
    with pytest.raises(CSRError, match="does not carry a PEM CSR"):
        ca.sign_device_csr(data, "dev1")


@pytest.mark.parametrize("key", [
    ec.generate_private_key(ec.SECP521R1()),
    rsa.generate_private_key(public_exponent=65537, key_size=1024),
    ed25519.Ed25519PrivateKey.generate(),
], ids=["P-521", "RSA-1024", "Ed25519"])
def test_unsupported_device_keys_are_refused(
        ca: FleetCA, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(CSRError, match="use EC P-256"):
        ca.sign_device_csr(_csr(key, "dev1"), "dev1")


def test_rsa_2048_and_p384_device_keys_are_accepted(ca: FleetCA) -> None:
    for key in (rsa.generate_private_key(public_exponent=65537, key_size=2048),
                ec.generate_private_key(ec.SECP384R1())):
        _cert(ca.sign_device_csr(_csr(key, "dev1"), "dev1")).verify_directly_issued_by(
            ca.certificate)


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "dev#", "-dev", "dev 1", "é",
                                       "x" * 65])
def test_device_ids_unfit_for_topics_are_refused(ca: FleetCA, device_id: str) -> None:
    _, csr_pem = make_device_key_and_csr("dev1")
    with pytest.raises(CSRError, match="invalid device id"):
        ca.sign_device_csr(csr_pem, device_id)


def test_service_identity_names_are_never_given_to_devices(tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca", "f1")
    server = ca.issue_client_cert("fleet-server")
    assert _usages(_cert(server.cert_pem)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    _, csr_pem = make_device_key_and_csr("fleet-server")
    # Recorded on disk: a CA loaded later refuses the name as well.
    for loaded in (ca, FleetCA.load(tmp_path / "ca")):
        assert loaded.service_identities == {"fleet-server"}
        with pytest.raises(CSRError, match="named like, a service identity"):
            loaded.sign_device_csr(csr_pem, "fleet-server")
        # Nor the names of further server processes, which another copy of the CA may
        # issue (fleet serve --instance b: fleet-server-b).
        with pytest.raises(CSRError, match="named like, a service identity"):
            loaded.sign_device_csr(csr_pem, "fleet-server-b")
    assert ca.sign_device_csr(csr_pem, "fleet-serverless")  # a different name


def test_server_certificate_names_and_usage(ca: FleetCA) -> None:
    issued = ca.issue_server_cert(["broker.example.com", "10.0.0.7", "localhost"])
    cert = _cert(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7")]
    assert _usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_validity_beyond_the_ca_is_refused(ca: FleetCA) -> None:
    _, csr_pem = make_device_key_and_csr("dev1")
    for days in (0, 100 * 365):
        with pytest.raises(CAError, match="outside the CA's lifetime"):
            ca.sign_device_csr(csr_pem, "dev1", validity_days=days)


def test_write_identity_keeps_the_key_private(ca: FleetCA, tmp_path: Path) -> None:
    files = ca.write_identity(ca.issue_client_cert("monitor"), tmp_path / "ids")
    assert stat.S_IMODE(files.key_file.stat().st_mode) == 0o600
    assert files.common_name() == "monitor"
    assert files.ca_file.read_bytes() == ca.cert_pem
    key = serialization.load_pem_private_key(files.key_file.read_bytes(), None)
    assert _cert(files.cert_file.read_bytes()).public_key() == key.public_key()


def test_fingerprint_is_sha256_of_der_and_stable(ca: FleetCA) -> None:
    _, csr_pem = make_device_key_and_csr("dev1")
    pem = ca.sign_device_csr(csr_pem, "dev1")
    der = _cert(pem).public_bytes(serialization.Encoding.DER)
    fingerprint = certificate_fingerprint(pem)

    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert len(fingerprint) == 64
    # The same certificate however its PEM is wrapped or surrounded.
    reflowed = pem.replace(b"\n", b"\r\n")
    assert certificate_fingerprint(b"subject=CN=dev1\n" + reflowed) == fingerprint
    assert certificate_fingerprint(pem) == fingerprint
    # Another certificate for the same device and key is another certificate.
    assert certificate_fingerprint(ca.sign_device_csr(csr_pem, "dev1")) != fingerprint
    issued = IssuedIdentity("x", pem, b"")
    assert issued.fingerprint == fingerprint


def test_fingerprint_of_garbage_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match="not a PEM certificate"):
        certificate_fingerprint(b"junk")


def test_device_key_and_csr() -> None:
    key_pem, csr_pem = make_device_key_and_csr("gw-0042")
    key = serialization.load_pem_private_key(key_pem, None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw-0042"
    with pytest.raises(ValueError, match="invalid device id"):
        make_device_key_and_csr("gw/0042")


def _crl_serials(ca: FleetCA) -> set[int]:
    return {r.serial_number for r in x509.load_pem_x509_crl(ca.crl_path.read_bytes())}


def test_copies_sharing_the_registry_revoke_what_the_other_issued(
        tmp_path: Path, db_url: str) -> None:
    """Two server processes hold copies of one CA directory: a certificate issued by one
    is revoked by the other, and both CRLs list it (docs/scale.md)."""
    FleetCA.create(tmp_path / "a", "testfleet")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with open_registry(db_url) as registry_a, open_registry(db_url) as registry_b:
        ca_a, ca_b = FleetCA.load(tmp_path / "a"), FleetCA.load(tmp_path / "b")
        ca_a.share_records(registry_a)
        ca_b.share_records(registry_b)
        pem = ca_a.sign_device_csr(make_device_key_and_csr("gw-1")[1], "gw-1")
        serial = _cert(pem).serial_number
        assert ca_b.revoke(certificate_fingerprint(pem), "device reset by the operator")
        assert serial in _crl_serials(ca_b)
        assert serial not in _crl_serials(ca_a)  # until it looks at the registry again
        assert ca_a.refresh_crl()
        assert serial in _crl_serials(ca_a)
        assert not ca_a.refresh_crl()  # nothing new: the file is left alone
        assert [e.serial for e in ca_a.revoked()] == [serial]
        # A revocation by a, later, is no un-revocation of b's: both stay listed.
        other = ca_b.sign_device_csr(make_device_key_and_csr("gw-2")[1], "gw-2")
        assert ca_a.revoke(certificate_fingerprint(other), "replaced")
        assert _crl_serials(ca_a) == {serial, _cert(other).serial_number}

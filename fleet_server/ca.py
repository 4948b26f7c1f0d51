"""The fleet certificate authority: the X.509 identities of the broker, the server and devices.

Layout of a CA directory (mode 0700)::

    CA/
      ca.key     EC P-256 private key, PKCS#8 PEM, mode 0600: whoever holds it can mint
                 device identities, so back it up like the online signing keys
      ca.crt     the self-signed fleet CA certificate: every device and the broker trust it
      ca.json    fleet name and the names of service identities (see below)
      issued/    every device certificate issued, <fingerprint>.crt: revocation needs a
                 certificate's serial number, and the registry knows devices by fingerprint
      revoked.json  the revoked device certificates (serial, fingerprint, device, when)
      crl.pem    the certificate revocation list made from revoked.json (and the shared
                 records, below), signed by the CA; the broker refuses the certificates it
                 lists (docs/transport.md)

**Shared records.** Several server processes hold copies of one CA directory
(docs/scale.md); each copy's ``issued/`` and ``revoked.json`` would know only what that
process did, so a process could not revoke what another issued, and their CRLs would
differ. A service therefore gives its CA the registry as :class:`CARecords`
(:meth:`FleetCA.share_records`): every certificate issued is recorded there too, a
revocation is recorded only there, and the CRL is rendered from the union of the
directory's and the registry's revocations, by every process alike
(:meth:`FleetCA.refresh_crl` picks up what the others revoked).

What the CA issues (docs/transport.md, "TLS identity"):

- a **server certificate** for the broker (serverAuth, SAN with the given host names and
  addresses plus localhost, 127.0.0.1 and ::1);
- **client certificates** for service identities such as the fleet server's own MQTT
  connection (clientAuth, CN = the identity name); their names are recorded in ca.json and
  never given to a device, because the broker's ACL grants by CN;
- **device certificates** from a CSR made on the device (:func:`transport.x509.
  make_device_key_and_csr`), so the device's key never leaves it. The certificate's subject
  is set by the CA from ``device_id`` alone: the CSR's own subject and extensions are
  ignored (a differing CN is logged), because the device id comes from the enrollment
  record, not from the device, and copying requested fields would let a device ask for
  another identity or extra key usages. The CSR only proves possession of the key.

A device certificate that is replaced (the device enrolled again) or whose device was reset
is **revoked** (:meth:`FleetCA.revoke`): its serial goes into ``crl.pem``, which the broker
checks at every TLS handshake. The CRL's next-update time is the CA's own expiry: the CRL is
handed to the broker whenever it changes rather than fetched by relying parties, so its
next-update is no freshness signal, and an expired CRL would make OpenSSL refuse every
client.

Keys are EC P-256: every TLS stack in the fleet (OpenSSL in Mosquitto, Python's ssl on the
devices) accepts it for TLS 1.2 and 1.3, which is not true of Ed25519.

Why one class of some 400 lines: issuing, revoking and signing the CRL all need the CA's
private key, which stays inside :class:`FleetCA`; the record types are plain dataclasses
beside it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.atomic import write_atomic
from protocol.names import check_name
from transport.mqtt import TLSIdentity
from transport.x509 import certificate_fingerprint

from .errors import CAError, CSRError

__all__ = [
    "CA_VALIDITY_DAYS",
    "CRL_NAME",
    "DEVICE_VALIDITY_DAYS",
    "SERVICE_VALIDITY_DAYS",
    "CARecords",
    "FleetCA",
    "IssuedCertificate",
    "IssuedIdentity",
    "RevokedCertificate",
    "certificate_fingerprint",
]

log = logging.getLogger(__name__)

CA_VALIDITY_DAYS = 20 * 365
#: Devices may stay offline for years and have no renewal path yet besides re-enrollment.
DEVICE_VALIDITY_DAYS = 10 * 365
#: Broker and server certificates live on the server, where re-issuing them is cheap.
SERVICE_VALIDITY_DAYS = 825
#: Certificates start this long before "now", so a device or broker whose clock is a little
#: behind does not reject a certificate that was just issued.
_BACKDATE = timedelta(hours=1)
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
#: The CRL's file name in the CA directory.
CRL_NAME = "crl.pem"
_REVOKED_NAME = "revoked.json"
_ISSUED_DIR = "issued"
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class IssuedIdentity:
    """A certificate and the private key made for it by the CA, both PEM."""

    common_name: str
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex of the certificate's DER (see :func:`certificate_fingerprint`)."""
        return certificate_fingerprint(self.cert_pem)


@dataclass(frozen=True)
class RevokedCertificate:
    """One revocation (in ``revoked.json``, or the shared :class:`CARecords`)."""

    serial: int
    fingerprint: str
    #: The CN it was issued to.
    device: str
    revoked_at: float
    reason: str


@dataclass(frozen=True)
class IssuedCertificate:
    """A device certificate the CA issued, kept so it can be revoked by fingerprint."""

    fingerprint: str
    #: The CN it was issued to.
    device: str
    serial: int
    cert_pem: bytes = field(repr=False)
    issued_at: float


class CARecords(Protocol):
    """The CA's records shared by every server process: the registry
    (:class:`fleet_server.registry.Registry`; module docstring)."""

    def record_issued_certificate(self, record: IssuedCertificate) -> None:
        """Keep ``record``."""
        ...

    def issued_certificate(self, fingerprint: str) -> IssuedCertificate | None:
        """The certificate issued with ``fingerprint``; None if not recorded."""
        ...

    def record_revocation(self, record: RevokedCertificate) -> bool:
        """Keep ``record``; False if that certificate was revoked already."""
        ...

    def revocations(self) -> list[RevokedCertificate]:
        """Every revocation recorded, oldest first."""
        ...


class FleetCA:
    """One fleet's certificate authority, backed by a CA directory (and, shared by several
    server processes, by :class:`CARecords`)."""

    def __init__(self, directory: Path, fleet: str, key: ec.EllipticCurvePrivateKey,
                 certificate: x509.Certificate, service_identities: Iterable[str]) -> None:
        """Use :meth:`create` or :meth:`load`; this only assembles loaded parts."""
        self.directory = directory
        self.fleet = fleet
        self.certificate = certificate
        self._key = key
        self._services = set(service_identities)
        # Enrollments run on the API's threads: revocations must not lose one another.
        self._lock = threading.Lock()
        self._records: CARecords | None = None
        # The serials of the CRL last written, so refresh_crl() rewrites it only on change.
        self._crl_serials: frozenset[int] | None = None

    @classmethod
    def create(cls, directory: Path, fleet_name: str, *,
               validity_days: int = CA_VALIDITY_DAYS) -> FleetCA:
        """Make a new CA key and self-signed certificate for ``fleet_name`` in ``directory``.

        Refuses a directory that already holds a CA: replacing it would lock out every
        enrolled device.
        """
        try:
            check_name(fleet_name, "fleet name")
        except ValueError as exc:
            raise CAError(str(exc)) from exc
        if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
            raise CAError(f"{directory} already holds a fleet CA; load it with FleetCA.load, "
                          "or choose an empty directory (a new CA invalidates every device "
                          "certificate of the old one)")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                          x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"edgefleet fleet {fleet_name} CA")])
        now = datetime.now(timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, fleet_name, key, certificate, ())
        try:
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
            write_atomic(directory / "ca.key", _key_pem(key), 0o600)
            write_atomic(directory / "ca.crt", ca.cert_pem)
            ca._save_metadata()
            ca._write_crl([])
        except OSError as exc:
            raise CAError(f"cannot write the fleet CA to {directory} ({exc}); fix the "
                          "directory, delete what was written and run again") from exc
        log.info("created the fleet CA for %s in %s", fleet_name, directory)
        return ca

    @classmethod
    def load(cls, directory: Path) -> FleetCA:
        """The CA in ``directory``, checked for consistency (the key matches the certificate)."""
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            certificate = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
            meta = json.loads((directory / "ca.json").read_text(encoding="utf-8"))
            fleet = str(meta["fleet"])
            services = [str(s) for s in meta["service_identities"]]
        except FileNotFoundError as exc:
            raise CAError(f"{directory} is not a complete fleet CA ({exc.filename} is "
                          "missing); restore it from backup, or create one with "
                          "FleetCA.create in an empty directory") from exc
        except (OSError, ValueError, KeyError, TypeError, UnsupportedAlgorithm) as exc:
            raise CAError(f"the fleet CA in {directory} is unreadable ({exc}); restore it "
                          "from backup") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
                key.public_key() != certificate.public_key()):
            raise CAError(f"{directory / 'ca.key'} is not the key of {directory / 'ca.crt'}; "
                          "restore the pair from the same backup")
        ca = cls(directory, fleet, key, certificate, services)
        if not ca.crl_path.exists():  # a CA made before revocation existed
            try:
                ca._write_crl(ca._revoked())
            except OSError as exc:
                raise CAError(f"cannot write {ca.crl_path} ({exc}); make the CA directory "
                              "writable") from exc
        return ca

    @property
    def cert_path(self) -> Path:
        """The CA certificate file: what the broker and every client trust."""
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list (PEM) the broker checks client certificates
        against (``crlfile``); always present, empty until something is revoked."""
        return self.directory / CRL_NAME

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def service_identities(self) -> frozenset[str]:
        """Names issued with :meth:`issue_client_cert`; no device may take them."""
        return frozenset(self._services)

    def issue_server_cert(self, hosts: Iterable[str] = (), *,
                          common_name: str = "edgefleet-broker",
                          validity_days: int = SERVICE_VALIDITY_DAYS) -> IssuedIdentity:
        """A key and server certificate for the broker, valid for ``hosts`` (names or IP
        addresses clients connect to) and always for localhost, 127.0.0.1 and ::1.

        The certificate has only the serverAuth key usage, so the broker refuses it as a
        client certificate: it cannot be used to log in as a user named ``common_name``.
        """
        names: list[x509.GeneralName] = []
        for host in ["localhost", "127.0.0.1", "::1", *hosts]:
            try:
                entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                entry = x509.DNSName(host)
            if entry not in names:
                names.append(entry)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (self._leaf(common_name, key.public_key(), validity_days,
                              ExtendedKeyUsageOID.SERVER_AUTH)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False))
        return IssuedIdentity(common_name, self._sign(builder), _key_pem(key))

    def issue_client_cert(self, common_name: str, *,
                          validity_days: int = SERVICE_VALIDITY_DAYS) -> IssuedIdentity:
        """A key and client certificate for a service identity (e.g. ``fleet-server``).

        The name is recorded as a service identity first, so :meth:`sign_device_csr` will
        never issue it to a device.
        """
        try:
            check_name(common_name, "identity name")
        except ValueError as exc:
            raise CAError(str(exc)) from exc
        if common_name not in self._services:
            self._services.add(common_name)
            try:
                self._save_metadata()
            except OSError as exc:
                self._services.discard(common_name)
                raise CAError(f"cannot record {common_name!r} in {self.directory / 'ca.json'} "
                              f"({exc}); fix the directory and issue it again") from exc
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._leaf(common_name, key.public_key(), validity_days,
                             ExtendedKeyUsageOID.CLIENT_AUTH)
        return IssuedIdentity(common_name, self._sign(builder), _key_pem(key))

    def sign_device_csr(self, csr_pem: bytes, device_id: str,
                        validity_days: int = DEVICE_VALIDITY_DAYS) -> bytes:
        """Check a device's CSR and return its client certificate (PEM) with CN = ``device_id``.

        Only the CSR's public key is used, after its signature is verified; the subject and
        extensions are the CA's (module docstring). Raises CSRError for a CSR that does not
        parse or verify, an unsupported key (EC P-256/P-384 and RSA >= 2048 are accepted),
        or a ``device_id`` that is invalid, a service identity's name, or such a name
        followed by ``-`` (the names of further server processes, ``fleet-server-NAME``,
        which a copy of this CA may issue: docs/scale.md).
        """
        try:
            check_name(device_id)
        except ValueError as exc:
            raise CSRError(str(exc)) from exc
        if any(device_id == s or device_id.startswith(f"{s}-") for s in self._services):
            raise CSRError(f"device id {device_id!r} is, or is named like, a service "
                           "identity of this fleet and would get its broker permissions; "
                           "enroll the device under another id")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CSRError(f"the enrollment request does not carry a PEM CSR ({exc}); make "
                           "one with transport.x509.make_device_key_and_csr") from exc
        if not csr.is_signature_valid:
            raise CSRError("the CSR's signature does not verify: it was altered or not "
                           "signed by the key it carries; generate a new key and CSR")
        public_key = _device_key(csr.public_key())
        requested = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [a.value for a in requested] != [device_id]:
            log.warning("CSR for device %s asked for subject %r; issuing CN=%s as enrolled",
                        device_id, csr.subject.rfc4514_string(), device_id)
        certificate = self._sign(self._leaf(device_id, public_key, validity_days,
                                            ExtendedKeyUsageOID.CLIENT_AUTH))
        fingerprint = certificate_fingerprint(certificate)
        try:
            write_atomic(self.directory / _ISSUED_DIR / f"{fingerprint}.crt", certificate)
        except OSError as exc:
            raise CAError(f"cannot record the certificate issued to {device_id} in "
                          f"{self.directory / _ISSUED_DIR} ({exc}); without it the "
                          "certificate could never be revoked: make the CA directory "
                          "writable and enroll again") from exc
        if self._records is not None:
            self._records.record_issued_certificate(IssuedCertificate(
                fingerprint, device_id, x509.load_pem_x509_certificate(certificate)
                .serial_number, certificate, time.time()))
        log.info("issued a device certificate for %s (%s)", device_id, fingerprint[:16])
        return certificate

    def share_records(self, records: CARecords) -> None:
        """Keep the CA's records in ``records`` too, shared with the fleet's other server
        processes (module docstring), and write the CRL from both. Raises CAError if the
        CRL cannot be written."""
        self._records = records
        self.refresh_crl()

    def refresh_crl(self) -> bool:
        """Write ``crl.pem`` again if the revocations (the directory's and the shared
        records') changed since it was last written: True if it did, and the broker must
        then re-read it. Raises CAError if it cannot be written."""
        with self._lock:
            revoked = self._revoked()
            if frozenset(e.serial for e in revoked) == self._crl_serials:
                return False
            try:
                self._write_crl(revoked)
            except OSError as exc:
                raise CAError(f"cannot write {self.crl_path} ({exc}); make the CA directory "
                              "writable") from exc
        return True

    def revoke(self, fingerprint: str, reason: str) -> bool:
        """Put the device certificate with this fingerprint on the CRL (``crl.pem``).

        Returns True once it is listed (now or before), False if this CA has no record of
        it (issued by an edgefleet older than revocation, or by another CA): nothing can be
        revoked then, and the caller says so. The broker must then re-read the CRL
        (:meth:`fleet_server.broker.Broker.reload_crl`). Raises CAError if the CRL cannot
        be written."""
        fingerprint = fingerprint.lower()
        with self._lock:
            revoked = self._revoked()
            if any(entry.fingerprint == fingerprint for entry in revoked):
                return True
            certificate = self._issued(fingerprint)
            if certificate is None:
                log.warning("cannot revoke certificate %s: %s has no record of it (issued "
                            "before revocation was kept, or by another CA)", fingerprint[:16],
                            self.directory / _ISSUED_DIR)
                return False
            names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            entry = RevokedCertificate(certificate.serial_number, fingerprint,
                                       str(names[0].value) if names else "", time.time(),
                                       reason)
            revoked.append(entry)
            try:
                if self._records is not None:
                    self._records.record_revocation(entry)
                else:
                    local = [e for e in self._local_revoked() if e.fingerprint != fingerprint]
                    write_atomic(self.directory / _REVOKED_NAME, json.dumps(
                        [asdict(e) for e in [*local, entry]], indent=1,
                        sort_keys=True).encode("utf-8"))
                self._write_crl(revoked)
            except OSError as exc:
                raise CAError(f"cannot write the revocation list in {self.directory} ({exc}); "
                              "the old certificate still works: make the CA directory "
                              "writable and revoke again") from exc
        log.info("revoked certificate %s of %s (%s)", fingerprint[:16], entry.device, reason)
        return True

    def revoked(self) -> list[RevokedCertificate]:
        """Every revoked device certificate, oldest first."""
        with self._lock:
            return self._revoked()

    def _issued(self, fingerprint: str) -> x509.Certificate | None:
        """The certificate issued with ``fingerprint``: from the directory, else the shared
        records; None if neither has it."""
        try:
            pem = (self.directory / _ISSUED_DIR / f"{fingerprint}.crt").read_bytes()
        except OSError:
            record = None if self._records is None else self._records.issued_certificate(
                fingerprint)
            if record is None:
                return None
            pem = record.cert_pem
        try:
            return x509.load_pem_x509_certificate(pem)
        except ValueError:
            return None

    def _revoked(self) -> list[RevokedCertificate]:
        """The directory's revocations and the shared records', each certificate once."""
        revoked = self._local_revoked()
        if self._records is not None:
            seen = {e.fingerprint for e in revoked}
            revoked += [e for e in self._records.revocations() if e.fingerprint not in seen]
        return revoked

    def _local_revoked(self) -> list[RevokedCertificate]:
        path = self.directory / _REVOKED_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return [RevokedCertificate(int(e["serial"]), str(e["fingerprint"]),
                                       str(e["device"]), float(e["revoked_at"]),
                                       str(e["reason"])) for e in raw]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CAError(f"{path} is unreadable ({exc!r}); restore it from backup (the "
                          "certificates it lists would work again without it)") from exc

    def _write_crl(self, revoked: list[RevokedCertificate]) -> None:
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self.certificate.subject)
                   .last_update(datetime.now(timezone.utc) - _BACKDATE)
                   .next_update(self.certificate.not_valid_after_utc))
        for entry in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(entry.serial)
                .revocation_date(datetime.fromtimestamp(entry.revoked_at, timezone.utc))
                .build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        self._crl_serials = frozenset(e.serial for e in revoked)

    def write_identity(self, identity: IssuedIdentity, directory: Path,
                       name: str | None = None) -> TLSIdentity:
        """Write ``identity`` as ``NAME.key`` (mode 0600) and ``NAME.crt``, and the CA
        certificate as ``ca.crt``, into ``directory`` (NAME defaults to the common name).

        The directory is then self-contained: copy it to the host that uses the identity
        (e.g. an external broker). Returns the paths, ready for :mod:`transport.mqtt`.
        """
        stem = name or identity.common_name
        files = TLSIdentity(directory / "ca.crt", directory / f"{stem}.crt",
                            directory / f"{stem}.key")
        try:
            write_atomic(files.key_file, identity.key_pem, 0o600)
            write_atomic(files.cert_file, identity.cert_pem)
            write_atomic(files.ca_file, self.cert_pem)
        except OSError as exc:
            raise CAError(f"cannot write the {stem} identity to {directory} ({exc}); fix "
                          "the directory and issue it again") from exc
        return files

    def _leaf(self, common_name: str, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
              validity_days: int, usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
        now = datetime.now(timezone.utc)
        not_after = now + timedelta(days=validity_days)
        if validity_days <= 0 or not_after > self.certificate.not_valid_after_utc:
            raise CAError(f"validity of {validity_days} days is outside the CA's lifetime "
                          f"(it expires {self.certificate.not_valid_after_utc:%Y-%m-%d}); "
                          "choose a shorter positive validity")
        issuer_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"edgefleet fleet {self.fleet}"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                # RSA key exchange (TLS 1.2 without ECDHE) encrypts with the key.
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False)
        )

    def _sign(self, builder: x509.CertificateBuilder) -> bytes:
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _save_metadata(self) -> None:
        meta = {"fleet": self.fleet, "service_identities": sorted(self._services)}
        write_atomic(self.directory / "ca.json",
                     json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))


def _device_key(public_key: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, _EC_CURVES):
            return public_key
        what = f"EC key on {public_key.curve.name}"
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= _MIN_RSA_BITS:
            return public_key
        what = f"{public_key.key_size}-bit RSA key"
    else:
        what = f"{type(public_key).__name__}"
    raise CSRError(f"the CSR carries a {what}, which the fleet does not accept for TLS client "
                   "certificates; use EC P-256 (make_device_key_and_csr does), EC P-384 or "
                   f"RSA of at least {_MIN_RSA_BITS} bits")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

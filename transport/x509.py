"""X.509 device identity: the device's key and certificate signing request, fingerprints.

Shared because both sides handle the same certificates: the agent makes its key and CSR at
enrollment (the private key never leaves the device), the fleet CA signs the CSR
(:mod:`fleet_server.ca`), and both refer to a certificate by its fingerprint. The broker
takes a client's certificate common name (CN) as its MQTT user name, so a device id is
also a topic level (docs/transport.md): :func:`protocol.names.check_name` keeps it to
characters that are safe there.

Invalid arguments raise ValueError with a message that says what to change.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protocol.names import check_name

__all__ = [
    "certificate_common_name",
    "certificate_fingerprint",
    "make_device_key_and_csr",
]

def make_device_key_and_csr(device_id: str) -> tuple[bytes, bytes]:
    """A new EC P-256 private key and a CSR for ``device_id``, both PEM.

    The key is PKCS#8 and unencrypted: store it with mode 0600 (``write_atomic(path, key,
    0o600)``). The CSR's CN is ``device_id``; the fleet CA sets the CN of the certificate it
    issues from the enrollment record anyway, so the CSR only proves key possession.
    """
    check_name(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex (64 characters).

    Computed over DER, not PEM, so the same certificate has one fingerprint however its PEM
    is wrapped or whatever text surrounds it. Raises ValueError if ``cert_pem`` is not a PEM
    certificate.
    """
    der = _load_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def certificate_common_name(cert_pem: bytes) -> str:
    """The subject CN of a PEM certificate: the MQTT user name the broker derives from it.

    Raises ValueError if ``cert_pem`` is not a PEM certificate or has no single CN.
    """
    cert = _load_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"certificate subject {cert.subject.rfc4514_string()!r} has "
                         f"{len(names)} common names, expected exactly one; use a certificate "
                         "issued by the fleet CA")
    return str(names[0].value)


def _load_certificate(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate ({exc}); pass the contents of a .crt/.pem "
                         "file that starts with '-----BEGIN CERTIFICATE-----'") from exc

"""Enrolling and resetting devices: one-time tokens, device certificates and their
revocation.

:class:`Enroller` issues tokens that pin the fleet CA and the current root.json, checks a
token (:mod:`fleet_server.enrollment`) and the device's CSR before redeeming it, records
the device and returns what it needs (:class:`Enrollment`). A certificate replaced by a new
enrollment, or revoked by the operator's reset, goes on the CA's revocation list, and the
broker is made to refuse it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.enrollment import EnrollmentToken, pin_of
from transport.x509 import certificate_fingerprint

from .broker import Broker
from .ca import FleetCA
from .chunk_server import ChunkServer
from .enrollment import check_token
from .errors import EnrollmentError, RegistryError
from .registry import Device, Registry

__all__ = ["Enroller", "Enrollment", "IssuedToken"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enrollment:
    """What an enrolled device needs: its certificate, whom to trust, where to connect."""

    device_id: str
    fleet: str
    group: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    #: ``mqtts://host:port`` as the device should use it.
    broker_url: str
    #: The fleet's TUF root (``KEYS/root.json``), for the device to pin.
    root_json: bytes = field(repr=False)


@dataclass(frozen=True)
class IssuedToken:
    """An enrollment token as the operator gets it."""

    token: str = field(repr=False)
    group: str
    expires_at: float
    #: The device id it is for, or None for any new device.
    device: str | None = None


class Enroller:
    """Tokens, enrollments and resets of one fleet (module docstring).

    ``root`` returns the fleet's current root.json, ``keys_dir`` holds its history
    (``repository/root_history``); ``send_desired`` publishes an enrolled device's desired
    state; ``broker_url`` is what enrolled devices are told to connect to.
    """

    def __init__(self, registry: Registry, ca: FleetCA, broker: Broker, chunks: ChunkServer,
                 *, root: Callable[[], bytes], keys_dir: Path, broker_url: str,
                 send_desired: Callable[[Device], None]) -> None:
        self._registry = registry
        self._ca = ca
        self._broker = broker
        self._chunks = chunks
        self._root = root
        self._keys_dir = keys_dir
        self._broker_url = broker_url
        self._send_desired = send_desired

    @property
    def ca_pin(self) -> bytes:
        """The pin of the fleet CA certificate: SHA-256 of its DER."""
        return bytes.fromhex(certificate_fingerprint(self._ca.cert_pem))

    def issue_token(self, group: str, ttl: float, device: str | None = None) -> IssuedToken:
        """A one-time enrollment token for ``group``, valid ``ttl`` seconds, carrying the
        pins of the fleet CA and the current root.json (:mod:`protocol.enrollment`); with
        ``device``, for that device id only, which it may take over (re-enrollment)."""
        _check_text("group", group)
        issued_at = time.time()  # the registry's clock is the wall clock too
        secret = self._registry.issue_token(group, ttl, device)
        token = EnrollmentToken(secret, self.ca_pin, pin_of(self._root()))
        return IssuedToken(token.encode(), group, issued_at + ttl, device)

    def enroll(self, token: str, device_id: str, csr_pem: bytes, profile: str,
               tags: Sequence[str] = (), *, encryption_key: str | None = None,
               ) -> Enrollment:
        """Enroll a device: check the token's pins, sign its CSR, use up the token and record
        the device (with the public X25519 ``encryption_key`` it registers, base64), revoke
        the certificate it replaces, publish its desired state (kept from an earlier
        enrollment, else empty).

        An enrolled device id is taken only with a token issued for it or after
        :meth:`reset_device` (:meth:`Registry.enroll_device`). Everything that can be
        checked is checked before the token is used, so a bad CSR, profile, tag, key or a
        token of another root leaves the token valid. Raises CSRError (bad CSR or device
        id), RegistryError (bad profile, tags or key), EnrollmentError (token refused)."""
        _check_text("profile", profile)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise RegistryError(f"tags must be a list of strings, got {tags!r}")
        for tag in tags:
            _check_text("tag", tag)
        parsed = check_token(token, ca_pin=self.ca_pin, root=self._root(),
                             earlier_roots=self._earlier_roots())
        certificate = self._ca.sign_device_csr(csr_pem, device_id)
        try:
            enrolled = self._registry.enroll_device(
                parsed.secret, device_id, profile=profile,
                cert_fingerprint=certificate_fingerprint(certificate), tags=tags,
                encryption_key=encryption_key)
        except RegistryError as exc:
            raise EnrollmentError(str(exc)) from exc
        device = enrolled.device
        if enrolled.replaced_fingerprint is not None:
            self._revoke(device_id, enrolled.replaced_fingerprint,
                         "replaced by a new enrollment")
            self._drop_connection(device)
        self._send_desired(device)
        log.info("enrolled %s into group %s (profile %s)", device_id, device.group, profile)
        return Enrollment(device_id=device_id, fleet=self._ca.fleet, group=device.group,
                          certificate_pem=certificate, ca_certificate_pem=self._ca.cert_pem,
                          broker_url=self._broker_url, root_json=self._root())

    def reset_device(self, device_id: str) -> Device:
        """The operator's reset: revoke the device's certificate (the broker refuses it from
        now on, and an embedded broker drops its connection), and let any token enroll its
        id again. Its group, tags and desired state stay for the device that enrolls next.
        RegistryError if there is no such device."""
        device = self._registry.reset_device(device_id)
        self._revoke(device_id, device.cert_fingerprint, "device reset by the operator")
        self._drop_connection(device)
        log.info("reset %s: certificate %s revoked", device_id, device.cert_fingerprint[:16])
        return device

    def _drop_connection(self, device: Device) -> None:
        """End the connection a just-revoked certificate may still hold: the broker checks
        the CRL only when a client connects."""
        self._chunks.forget_device(device.id)
        # Mosquitto 2.0 cannot drop one client: a restart drops all, who reconnect (the
        # revoked one cannot). Not needed for a device that never connected.
        if device.last_seen is not None:
            self._broker.restart()

    def _earlier_roots(self) -> list[bytes]:
        """Every root version the keys directory keeps (``fleet keys`` keeps them)."""
        history = self._keys_dir / "repository" / "root_history"
        roots = []
        for path in sorted(history.glob("*.root.json")) if history.is_dir() else ():
            with contextlib.suppress(OSError):
                roots.append(path.read_bytes())
        return roots

    def _revoke(self, device_id: str, fingerprint: str, reason: str) -> None:
        """Revoke a certificate of ``device_id`` and make the broker refuse it from now on."""
        if not self._ca.revoke(fingerprint, reason):
            self._registry.add_event("certificate.not_revoked", device=device_id, detail={
                "cert_fingerprint": fingerprint, "reason": "the CA has no record of it "
                "(issued by an older edgefleet); it stays valid until it expires"})
            return
        self._broker.reload_crl()
        self._registry.add_event("certificate.revoked", device=device_id, detail={
            "cert_fingerprint": fingerprint, "reason": reason})


def _check_text(what: str, value: object) -> None:
    """The registry's rule for labels, checked before an enrollment uses its token."""
    if (not isinstance(value, str) or not value or value != value.strip()
            or len(value) > 128 or not value.isprintable()):
        shown = repr(value)[:64] + ("..." if len(repr(value)) > 64 else "")
        raise RegistryError(f"invalid {what} {shown}: use 1-128 printable characters "
                            "without leading or trailing spaces")

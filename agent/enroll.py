"""Enrollment: turn a one-time token into a device identity, a pinned root and a config.

The token (:mod:`protocol.enrollment`) carries a secret and the pins (SHA-256) of the fleet
CA certificate and of the fleet's root.json. Enrolling:

1. ``GET /api/fleet`` over TLS *without* verifying the server (the device has no CA yet):
   the fleet CA. It must hash to the token's CA pin, else the device stops here and the
   secret never leaves it: a server that merely answers (a fake ``/api/enroll``) gets
   nothing and can make the device trust nothing.
2. ``GET /api/fleet`` again, over TLS verified with that CA alone (and the server's name):
   now the server is the fleet's, and its root.json must hash to the token's root pin; if
   it does not, the root was rotated since the token was issued, and the device says so
   (still without sending the secret).
3. ``POST /api/enroll`` on that verified TLS: the secret, a CSR for a key pair made here
   (the private key never leaves the device) and the public half of a new X25519 key, which
   the operator encrypts bundles for. The answer's CA and root must again be the pinned
   ones; then the certificate, CA, keys (0600) and the pinned root land in the state
   directory, and ``agent.toml`` there is what ``edge-agent run`` reads.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bundle.trust import TrustedState
from common.atomic import write_atomic
from protocol.defaults import AGENT_API_PORT
from protocol.enrollment import EnrollmentToken, TokenError, parse_token, pin_of, root_version
from protocol.names import check_name
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

from .config import AgentConfig, ApiConfig, FleetSettings
from .config_write import write_config
from .errors import AgentError
from .installer import StateDirs
from .trust_store import TrustStore

__all__ = ["EnrollRequest", "FleetTrust", "check_ca", "check_fleet", "default_device_id",
           "enroll"]

log = logging.getLogger(__name__)
CONFIG_NAME = "agent.toml"
#: The server's answers are small JSON objects (a certificate, a root.json).
_MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True)
class EnrollRequest:
    """What the operator gives ``edge-agent enroll``."""

    server_url: str
    token: str
    device_id: str
    state_dir: Path
    profile: str | None = None
    tags: tuple[str, ...] = ()
    api_port: int = AGENT_API_PORT
    probation_s: float = 60.0
    telemetry_interval_s: float = 30.0


@dataclass(frozen=True)
class FleetTrust:
    """What the server offers the device to trust: the fleet CA (PEM) and root.json."""

    ca_pem: bytes
    root: bytes


def default_device_id() -> str:
    """This host's name, reduced to the characters a device id may have."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "device"


def check_ca(token: EnrollmentToken, ca_pem: bytes, server_url: str) -> None:
    """Raise AgentError unless ``ca_pem`` is the CA ``token`` pins (pure)."""
    try:
        ca_pin = bytes.fromhex(certificate_fingerprint(ca_pem))
    except ValueError as exc:
        raise AgentError(f"the server at {server_url} offered no usable CA certificate "
                         f"({exc}); it is not a fleet server") from exc
    if ca_pin != token.ca_pin:
        raise AgentError(f"the server at {server_url} is not the fleet's: its CA does not "
                         "match the token's pin, so the token was not sent; check --server "
                         "(or the network: someone may be impersonating the server)")


def check_fleet(token: EnrollmentToken, offered: FleetTrust, server_url: str) -> None:
    """Raise AgentError unless ``offered`` (from a server already verified with the pinned
    CA) is what ``token`` pins (pure)."""
    check_ca(token, offered.ca_pem, server_url)
    if pin_of(offered.root) != token.root_pin:
        raise AgentError(f"the fleet's root.json at {server_url} (v{root_version(offered.root)})"
                         " does not match the token's pin: the fleet's root keys were "
                         "rotated since the token was issued; ask the operator for a new "
                         "token (this one was not sent and stays valid)")


def enroll(request: EnrollRequest, timeout: float = 30.0) -> AgentConfig:
    """Enroll with the server and write keys, pinned root and ``agent.toml``; the config."""
    try:
        check_name(request.device_id)
        token = parse_token(request.token)
    except (ValueError, TokenError) as exc:
        raise AgentError(str(exc)) from exc
    base = request.server_url.rstrip("/")
    if urlsplit(base).scheme != "https":
        raise AgentError(f"--server {request.server_url!r}: the fleet server's API speaks "
                         "HTTPS only; use https://HOST:PORT")
    dirs = StateDirs(request.state_dir)
    trust = TrustStore(dirs.trust)
    if trust.exists():
        raise AgentError(f"{request.state_dir} already trusts a fleet; enroll into a new "
                         "--state-dir, or remove that directory to re-provision the device")
    ca_pem = _trust_of(_call(f"{base}/api/fleet", None, _unverified(), timeout), base).ca_pem
    check_ca(token, ca_pem, base)
    pinned = _pinned(ca_pem)
    offered = _trust_of(_call(f"{base}/api/fleet", None, pinned, timeout), base)
    check_fleet(token, offered, base)

    key_pem, csr_pem = make_device_key_and_csr(request.device_id)
    encryption_key = X25519PrivateKey.generate()
    public = encryption_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)
    answer = _call(f"{base}/api/enroll", {
        "token": request.token.strip(), "device_id": request.device_id,
        "csr": csr_pem.decode(), "profile": request.profile, "tags": list(request.tags),
        "encryption_key": base64.b64encode(public).decode("ascii")},
        pinned, timeout)
    try:
        device_id = str(answer["device_id"])
        fleet = str(answer["fleet"])
        certificate = str(answer["certificate"]).encode()
        broker_url = str(answer["broker_url"])
    except (KeyError, TypeError) as exc:
        raise AgentError(f"the fleet server's enrollment answer is incomplete ({exc!r}); "
                         "check that server and agent versions match") from exc
    # The server may have rotated its root since step 2: pin only what the token vouches for.
    check_fleet(token, _trust_of(answer, base), base)

    keys = request.state_dir / "keys"
    write_atomic(keys / "device.key", key_pem, mode=0o600)
    write_atomic(dirs.device_key, encryption_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    write_atomic(keys / "device.crt", certificate)
    write_atomic(keys / "ca.crt", offered.ca_pem)
    trust.save(TrustedState(root=offered.root))
    config = AgentConfig(
        state_dir=request.state_dir.absolute(), profile=request.profile,
        api=ApiConfig(port=request.api_port, probation_s=request.probation_s),
        fleet=FleetSettings(name=fleet, device_id=device_id, broker_url=broker_url,
                            ca_file=Path("keys/ca.crt"), cert_file=Path("keys/device.crt"),
                            key_file=Path("keys/device.key"), server_url=base,
                            telemetry_interval_s=request.telemetry_interval_s))
    write_config(request.state_dir / CONFIG_NAME, config)
    log.info("enrolled %s in fleet %s", device_id, fleet)
    return config


def _trust_of(answer: dict[str, Any], url: str) -> FleetTrust:
    try:
        return FleetTrust(str(answer["ca_certificate"]).encode("ascii"),
                          base64.b64decode(answer["root"], validate=True))
    except (KeyError, TypeError, UnicodeEncodeError, binascii.Error) as exc:
        raise AgentError(f"the server at {url} did not offer a fleet CA and root.json "
                         f"({exc!r}); is it a fleet server of this edgefleet version?") from exc


def _unverified() -> ssl.SSLContext:
    """TLS without verifying the server: only for fetching what the pins then check."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pinned(ca_pem: bytes) -> ssl.SSLContext:
    """TLS that trusts the pinned fleet CA only, and checks the server's name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return context


def _call(url: str, body: dict[str, Any] | None, context: ssl.SSLContext,
          timeout: float) -> dict[str, Any]:
    """GET (``body`` None) or POST JSON; the JSON object answered, or AgentError."""
    data = None if body is None else json.dumps(body).encode()
    http_request = urllib.request.Request(url, data=data, method="GET" if body is None
                                          else "POST",
                                          headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=timeout,
                                    context=context) as response:
            raw = response.read(_MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                message = json.loads(exc.read(_MAX_ANSWER_BYTES))["error"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
        raise AgentError(f"the fleet server refused the enrollment: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise AgentError(f"the server at {url} does not hold a certificate of the pinned "
                             f"fleet CA for that name ({reason.verify_message}); use the "
                             "name or address the operator gave (--server)") from exc
        raise AgentError(f"cannot reach the fleet server at {url} ({reason}); check --server "
                         "and the network") from exc
    try:
        if len(raw) > _MAX_ANSWER_BYTES:
            raise ValueError("too large")
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except (ValueError, RecursionError) as exc:
        raise AgentError(f"the fleet server at {url} did not answer with a JSON object "
                         f"({exc})") from exc
    return answer

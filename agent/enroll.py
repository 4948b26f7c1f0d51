"""Enrollment: turn a one-time token into a device identity, a pinned root and a config.

The device makes its own key pair (the private key never leaves it), sends a CSR with the
token to the fleet server's ``/api/enroll``, and gets back its certificate (CN = device
id), the fleet CA certificate, the broker's address and the fleet's TUF root to pin.
Everything lands in the state directory; ``agent.toml`` there is what ``edge-agent run``
reads.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.trust import TrustedState
from common.atomic import write_atomic
from protocol.defaults import AGENT_API_PORT
from protocol.names import check_name
from transport.x509 import make_device_key_and_csr

from .config import AgentConfig, ApiConfig, FleetSettings, write_config
from .errors import AgentError
from .installer import StateDirs
from .trust_store import TrustStore

__all__ = ["EnrollRequest", "default_device_id", "enroll"]

log = logging.getLogger(__name__)
CONFIG_NAME = "agent.toml"


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


def default_device_id() -> str:
    """This host's name, reduced to the characters a device id may have."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "device"


def enroll(request: EnrollRequest, timeout: float = 30.0) -> AgentConfig:
    """Enroll with the server and write keys, pinned root and ``agent.toml``; the config."""
    try:
        check_name(request.device_id)
    except ValueError as exc:
        raise AgentError(str(exc)) from exc
    dirs = StateDirs(request.state_dir)
    trust = TrustStore(dirs.trust)
    if trust.exists():
        raise AgentError(f"{request.state_dir} already trusts a fleet; enroll into a new "
                         "--state-dir, or remove that directory to re-provision the device")
    key_pem, csr_pem = make_device_key_and_csr(request.device_id)
    answer = _post(f"{request.server_url.rstrip('/')}/api/enroll", {
        "token": request.token, "device_id": request.device_id, "csr": csr_pem.decode(),
        "profile": request.profile, "tags": list(request.tags)}, timeout)
    try:
        device_id = str(answer["device_id"])
        fleet = str(answer["fleet"])
        certificate = str(answer["certificate"]).encode()
        ca_certificate = str(answer["ca_certificate"]).encode()
        broker_url = str(answer["broker_url"])
        root = base64.b64decode(answer["root"], validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise AgentError(f"the fleet server's enrollment answer is incomplete ({exc!r}); "
                         "check that server and agent versions match") from exc
    keys = request.state_dir / "keys"
    write_atomic(keys / "device.key", key_pem, mode=0o600)
    write_atomic(keys / "device.crt", certificate)
    write_atomic(keys / "ca.crt", ca_certificate)
    trust.save(TrustedState(root=root))
    config = AgentConfig(
        state_dir=request.state_dir.absolute(), profile=request.profile,
        api=ApiConfig(port=request.api_port, probation_s=request.probation_s),
        fleet=FleetSettings(name=fleet, device_id=device_id, broker_url=broker_url,
                            ca_file=Path("keys/ca.crt"), cert_file=Path("keys/device.crt"),
                            key_file=Path("keys/device.key"), server_url=request.server_url,
                            telemetry_interval_s=request.telemetry_interval_s))
    write_config(request.state_dir / CONFIG_NAME, config)
    log.info("enrolled %s in fleet %s", device_id, fleet)
    return config


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode()
    http_request = urllib.request.Request(url, data=data, method="POST",
                                          headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise AgentError(f"the fleet server refused the enrollment: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AgentError(f"cannot reach the fleet server at {url} ({exc}); check --server "
                         "and the network") from exc
    except ValueError as exc:
        raise AgentError(f"the fleet server at {url} did not answer with JSON") from exc

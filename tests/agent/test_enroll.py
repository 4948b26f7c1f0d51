"""``edge-agent enroll`` as a process against a real fleet service and operator API (HTTPS,
real Mosquitto), and against servers that are not the fleet's (issue 9.3, 9.14)."""

from __future__ import annotations

import base64
import json
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent.cli import build_parser
from agent.enroll import FleetTrust, check_fleet
from agent.errors import AgentError
from agent.trust_store import TrustStore
from fleet_server.api import ApiServer
from fleet_server.ca import FleetCA
from fleet_server.errors import EnrollmentError
from fleet_server.keys import KeyStore, init_keys, rotate_keys
from fleet_server.service import FleetService
from protocol.enrollment import EnrollmentToken, new_secret, parse_token, pin_of
from tests.bundle.repo import Repo
from tests.fleet_server.server_env import service_config, write_keys
from transport.mqtt import TLSIdentity
from transport.x509 import certificate_fingerprint, make_device_key_and_csr

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _enroll(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "enroll", "--server", server,
                           "--profile", "x86-64-avx2", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=120)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[FleetService, ApiServer]]:
    """A fleet service and its operator API; the keys directory is a full one (root
    history, online keys), so a root rotation can be done in a test."""
    store = KeyStore.at(tmp_path / "keys")
    init_keys(store)
    config = service_config(tmp_path / "server", store.root_dir,
                            f"sqlite:///{tmp_path / 'fleet.db'}")
    with FleetService(config) as service, ApiServer(service, "admin",
                                                    service.api_identity()) as api:
        yield service, api


class _Impostor(BaseHTTPRequestHandler):
    """A server that answers like a fleet server and writes down what it is sent."""

    offer: dict[str, Any]
    received: list[bytes]

    def do_GET(self) -> None:
        self._answer(self.offer)

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer({"error": "thanks"}, 403)

    def _answer(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _impostor(tmp_path: Path, offer: dict[str, Any]) -> tuple[ThreadingHTTPServer, list[bytes]]:
    """An HTTPS impostor with a certificate from its own CA, offering ``offer``."""
    ca = FleetCA.create(tmp_path / "impostor-ca", "evil")
    identity: TLSIdentity = ca.write_identity(ca.issue_server_cert(), tmp_path / "impostor")
    received: list[bytes] = []
    handler = type("Handler", (_Impostor,), {"offer": offer, "received": received})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert_file, identity.key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, received


def test_enroll_pins_the_fleet_and_makes_both_device_keys(
        fleet: tuple[FleetService, ApiServer], tmp_path: Path) -> None:
    service, api = fleet
    token = service.issue_token("lab", 600).token
    assert token.startswith("eft1.")
    state = tmp_path / "gw-1"
    # --token=VALUE, the form that works for any value (issue 9.14).
    done = _enroll(api.url, f"--token={token}", "--device-id", "gw-1", "--state-dir",
                   str(state))
    assert done.returncode == 0, done.stderr
    assert "enrolled gw-1 in fleet testfleet" in done.stdout
    assert TrustStore(state / "trust").load().root == service.root_json()
    assert (state / "keys" / "ca.crt").read_bytes() == service.ca.cert_pem
    for key in ("device.key", "device-x25519.pem"):
        assert stat.S_IMODE((state / "keys" / key).stat().st_mode) == 0o600
    x25519 = load_pem_private_key((state / "keys" / "device-x25519.pem").read_bytes(), None)
    assert isinstance(x25519, X25519PrivateKey)
    device = service.registry.get_device("gw-1")
    assert device is not None
    assert device.group == "lab"


def test_tokens_never_read_as_options() -> None:
    """Issue 9.14: one token in 64 began with '-' and `--token TOKEN` failed; every token
    now begins with its prefix, and both spellings parse."""
    parser = build_parser()
    token = "eft1." + ".".join(["-" * 43] * 3)  # the worst case for each part
    for argv in (["--token", token], [f"--token={token}"]):
        args = parser.parse_args(["enroll", "--server", "https://h:1", *argv])
        assert args.token == token


def test_a_server_that_is_not_the_fleets_never_gets_the_token(
        fleet: tuple[FleetService, ApiServer], tmp_path: Path) -> None:
    """Issue 9.3: a fake /api/enroll captured the token and made the agent pin the
    attacker's root. Now the token's pins stop the agent before it sends anything."""
    service, _ = fleet
    token = service.issue_token("lab", 600).token
    evil_root = Repo().root
    own_ca = FleetCA.create(tmp_path / "evil-ca", "evil").cert_pem
    # 1. It offers its own CA and root; 2. it offers the real (public) CA and root, but
    # cannot prove it holds a certificate of that CA.
    for name, offer, message in [
            ("own", {"fleet": "evil", "ca_certificate": own_ca.decode(),
                     "root": base64.b64encode(evil_root).decode()},
             "is not the fleet's: its CA does not match the token's pin"),
            ("copied", {"fleet": "testfleet", "ca_certificate": service.ca.cert_pem.decode(),
                        "root": base64.b64encode(service.root_json()).decode()},
             "does not hold a certificate of the pinned fleet CA")]:
        httpd, received = _impostor(tmp_path / name, offer)
        try:
            url = f"https://127.0.0.1:{httpd.server_address[1]}"
            done = _enroll(url, "--token", token, "--device-id", "gw-1", "--state-dir",
                           str(tmp_path / name / "state"))
        finally:
            httpd.shutdown()
            httpd.server_close()
        assert done.returncode == 1
        assert message in done.stderr, done.stderr
        assert received == []  # no POST: the secret never left the device
        assert not (tmp_path / name / "state" / "trust").exists()
    # The token is still good for the real server.
    _, csr = make_device_key_and_csr("gw-1")
    assert service.enroll(token, "gw-1", csr, "generic").group == "lab"


def test_a_token_issued_before_a_root_rotation_is_refused_unused(
        fleet: tuple[FleetService, ApiServer], tmp_path: Path) -> None:
    service, api = fleet
    token = service.issue_token("lab", 600).token
    rotate_keys(KeyStore.at(service.config.keys_dir), "timestamp")
    done = _enroll(api.url, "--token", token, "--device-id", "gw-1", "--state-dir",
                   str(tmp_path / "gw-1"))
    assert done.returncode == 1
    assert "root keys were rotated since the token was issued" in done.stderr, done.stderr
    assert "ask the operator for a new token" in done.stderr
    # The server says the same to a client that skips the check, and keeps the token.
    _, csr = make_device_key_and_csr("gw-1")
    with pytest.raises(EnrollmentError, match=r"issued for root v1, and the fleet's root is "
                       r"now v2 \(its keys were rotated since\)"):
        service.enroll(token, "gw-1", csr, "generic")
    fresh = service.issue_token("lab", 600).token
    done = _enroll(api.url, "--token", fresh, "--device-id", "gw-1", "--state-dir",
                   str(tmp_path / "gw-1"))
    assert done.returncode == 0, done.stderr


def test_check_fleet_compares_both_pins(repo: Repo, tmp_path: Path) -> None:
    ca = FleetCA.create(tmp_path / "ca", "f1")
    other = FleetCA.create(tmp_path / "other", "f1")
    service_token = parse_token(_token_for(ca.cert_pem, repo.root))
    check_fleet(service_token, FleetTrust(ca.cert_pem, repo.root), "https://s")
    with pytest.raises(AgentError, match="its CA does not match"):
        check_fleet(service_token, FleetTrust(other.cert_pem, repo.root), "https://s")
    with pytest.raises(AgentError, match=r"root.json at https://s \(v1\) does not match"):
        check_fleet(service_token, FleetTrust(ca.cert_pem, Repo().root), "https://s")
    with pytest.raises(AgentError, match="no usable CA certificate"):
        check_fleet(service_token, FleetTrust(b"junk", repo.root), "https://s")


def _token_for(ca_pem: bytes, root: bytes) -> str:
    return EnrollmentToken(new_secret(), bytes.fromhex(certificate_fingerprint(ca_pem)),
                           pin_of(root)).encode()


def test_enroll_refuses_plain_http_and_non_tokens(tmp_path: Path) -> None:
    done = _enroll("http://127.0.0.1:9", "--token", _token_for(
        FleetCA.create(tmp_path / "ca", "f1").cert_pem, b"{}"), "--state-dir",
        str(tmp_path / "s"))
    assert done.returncode == 1
    assert "speaks HTTPS only; use https://HOST:PORT" in done.stderr
    done = _enroll("https://127.0.0.1:9", "--token", "abc", "--state-dir",
                   str(tmp_path / "s"))
    assert done.returncode == 1
    assert "not an enrollment token" in done.stderr
    assert not (tmp_path / "s").exists()  # refused: no state directory left behind


def test_a_token_for_another_root_is_refused_by_the_server(tmp_path: Path,
                                                           repo: Repo) -> None:
    """A keys directory holding only root.json (no history): the server cannot name the
    root a token was issued for, and says so."""
    config = service_config(tmp_path / "server", write_keys(tmp_path / "keys", repo),
                            f"sqlite:///{tmp_path / 'fleet.db'}")
    with FleetService(config) as service:
        token = parse_token(service.issue_token("lab", 600).token)
        stale = EnrollmentToken(token.secret, token.ca_pin, pin_of(Repo().root)).encode()
        _, csr = make_device_key_and_csr("gw-1")
        with pytest.raises(EnrollmentError, match=r"issued for a root\.json this server does "
                           r"not have"):
            service.enroll(stale, "gw-1", csr, "generic")
        assert service.enroll(token.encode(), "gw-1", csr, "generic").group == "lab"

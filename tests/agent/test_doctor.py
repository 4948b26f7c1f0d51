"""``edge-agent doctor``: each verdict from made-up facts (pure), and the probes against the
real things: a Mosquitto broker with mutual TLS, certificates made to expire with the
``cryptography`` package, an HTTPS server's clock, the command line's exit code."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig, FleetSettings
from agent.config_write import write_config
from agent.doctor import (
    AcceleratorFact,
    BrokerOutcome,
    ServerTime,
    Verdict,
    check_broker,
    check_certificate,
    check_clock,
    check_disk,
    check_private_file,
    check_runtimes,
    check_state_dir,
    exit_code,
    render,
)
from agent.doctor_probes import probe_broker, probe_server_time
from fleet_server.broker import Broker
from tests.mqtt_broker import TestFleet, require_mosquitto
from transport.mqtt import TLSIdentity

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
_MIB = 1 << 20


def _ca(name: str = "test CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=3650))
            .not_valid_after(NOW + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, start: datetime,
          end: datetime, *, name: str = "gw1",
          key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- pure checks ---------------------------------------------------------------------------

def test_certificate_verdicts() -> None:
    key, ca = _ca()
    other_key, other = _ca("another fleet")
    day = timedelta(days=1)
    cases = [
        (_leaf(key, ca, NOW - day, NOW + 365 * day), Verdict.OK, "valid until 2027-06-01"),
        (_leaf(key, ca, NOW - day, NOW + 10 * day), Verdict.FAIL, "under 30 days"),
        (_leaf(key, ca, NOW - 400 * day, NOW - day), Verdict.FAIL, "expired on 2026-05-31"),
        (_leaf(key, ca, NOW + day, NOW + 400 * day), Verdict.FAIL, "valid only from"),
        (_leaf(other_key, other, NOW - day, NOW + 365 * day), Verdict.FAIL,
         "was not issued by the fleet CA"),
        (b"garbage", Verdict.FAIL, "not a PEM certificate"),
    ]
    for cert, verdict, says in cases:
        check = check_certificate(cert, _pem(ca), NOW)
        assert check.verdict is verdict, check
        assert says in check.detail, check
        assert (check.fix == "") == (verdict is Verdict.OK)
    assert "not a PEM certificate" in check_certificate(
        _leaf(key, ca, NOW - day, NOW + 365 * day), b"x", NOW).detail


def test_private_file_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "api-token"
    assert check_private_file("token", path, 0o100600, created_later=True).verdict is Verdict.OK
    loose = check_private_file("token", path, 0o100644, created_later=True)
    assert loose.verdict is Verdict.FAIL
    assert loose.fix == f"chmod 600 {path}"
    assert check_private_file("token", path, None, created_later=True).verdict is Verdict.OK
    assert check_private_file("key", path, None, created_later=False).verdict is Verdict.FAIL


def test_disk_and_state_dir_verdicts(tmp_path: Path) -> None:
    assert check_disk(tmp_path, 100 * _MIB, 0).verdict is Verdict.OK
    assert check_disk(tmp_path, 63 * _MIB, 0).verdict is Verdict.FAIL
    # room for a bundle and its artifact as large as the largest model, plus the reserve
    assert check_disk(tmp_path, 200 * _MIB, 100 * _MIB).verdict is Verdict.FAIL
    assert "free 9 MiB" in check_disk(tmp_path, 191 * _MIB, 96 * _MIB).fix
    assert check_state_dir(tmp_path / "s", tmp_path, True).verdict is Verdict.OK
    assert check_state_dir(tmp_path, tmp_path, False).verdict is Verdict.FAIL


def test_clock_verdicts() -> None:
    trip = timedelta(milliseconds=20)
    on_time = ServerTime(NOW, NOW - trip / 2, NOW + trip / 2)
    assert check_clock("https://s", on_time).verdict is Verdict.OK
    ahead = check_clock("https://s", ServerTime(NOW - timedelta(seconds=300), NOW, NOW + trip))
    assert ahead.verdict is Verdict.FAIL
    assert "300 s ahead of https://s" in ahead.detail
    behind = check_clock("https://s", ServerTime(NOW + timedelta(seconds=90), NOW, NOW))
    assert behind.verdict is Verdict.FAIL
    assert "behind" in behind.detail
    # Whole seconds in the Date header: a second off is rounding, not skew.
    assert check_clock("https://s", ServerTime(NOW - timedelta(seconds=61), NOW, NOW)
                       ).verdict is Verdict.OK
    assert check_clock("https://s", ServerTime(None, NOW, NOW, "refused")
                       ).verdict is Verdict.WARN
    assert check_clock(None, None).verdict is Verdict.SKIP


def test_broker_and_runtime_verdicts_and_exit_code() -> None:
    assert check_broker("mqtts://b", BrokerOutcome.ACCEPTED, "").verdict is Verdict.OK
    for outcome in BrokerOutcome:
        if outcome is not BrokerOutcome.ACCEPTED:
            check = check_broker("mqtts://b", outcome, "why")
            assert check.verdict is Verdict.FAIL
            assert check.fix
    none = check_runtimes(None, (), None, None, ())
    assert none[0].verdict is Verdict.FAIL
    npu = AcceleratorFact("npu", "onnxruntime", "OpenVINOExecutionProvider", False)
    checks = check_runtimes("1.2", ("CPUExecutionProvider",), "ai-edge-litert", "intel-npu",
                            (npu,))
    assert [c.verdict for c in checks] == [Verdict.OK, Verdict.WARN]
    assert exit_code(checks) == 0
    assert exit_code([*checks, *none]) == 1
    text = render([*checks, *none])
    assert text.splitlines()[-1] == "1 check(s) failed, 1 warning(s)"
    assert "fix: install the OpenVINOExecutionProvider execution provider" in text


# -- probes against the real things -------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> TestFleet:
    require_mosquitto()
    return TestFleet.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(fleet: TestFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker.embedded(fleet.broker_config(tmp_path_factory.mktemp("b") / "broker")) as b:
        yield b


def _expired_identity(fleet: TestFleet, directory: Path) -> TLSIdentity:
    """A device certificate the fleet CA signed, expired yesterday."""
    ca_key = serialization.load_pem_private_key(
        (fleet.directory / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(fleet.ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    directory.mkdir()
    (directory / "device.crt").write_bytes(_leaf(ca_key, ca, now - timedelta(days=30),
                                                 now - timedelta(days=1), name="gw-old", key=key))
    (directory / "device.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (directory / "ca.crt").write_bytes(fleet.ca.cert_pem)
    return TLSIdentity(directory / "ca.crt", directory / "device.crt", directory / "device.key")


@pytest.mark.integration
def test_broker_probe_outcomes(fleet: TestFleet, broker: Broker, tmp_path: Path) -> None:
    url = broker.address.url
    good = fleet.device_identity("gw1")
    assert probe_broker(url, good) == (BrokerOutcome.ACCEPTED, "")
    outcome, reason = probe_broker(url, _expired_identity(fleet, tmp_path / "old"))
    assert outcome is BrokerOutcome.DEVICE_REFUSED, reason
    stranger = TestFleet.create(tmp_path / "other").device_identity("gw1")
    outcome, reason = probe_broker(url, TLSIdentity(good.ca_file, stranger.cert_file,
                                                    stranger.key_file))
    assert outcome is BrokerOutcome.DEVICE_REFUSED, reason
    outcome, reason = probe_broker(url, stranger)  # trusts another CA than the broker's
    assert outcome is BrokerOutcome.BROKER_UNTRUSTED
    assert reason.startswith("the broker's certificate: ")
    outcome, reason = probe_broker("mqtts://127.0.0.1:1", good)
    assert outcome is BrokerOutcome.UNREACHABLE
    assert "Connection refused" in reason
    outcome, _ = probe_broker(url, TLSIdentity(good.ca_file, good.cert_file,
                                               stranger.key_file))
    assert outcome is BrokerOutcome.IDENTITY_UNUSABLE


@pytest.fixture(scope="module")
def https_server(fleet: TestFleet, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[str]:
    """An HTTPS server with a certificate of the fleet CA (its Date header is the clock)."""
    tls = fleet.ca.write_identity(fleet.ca.issue_server_cert(),
                                  tmp_path_factory.mktemp("https"), "api")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_server_time_probe(https_server: str, fleet: TestFleet, tmp_path: Path) -> None:
    answer = probe_server_time(https_server, fleet.device_identity("gw2").ca_file)
    assert answer.time is not None, answer.problem
    assert check_clock(https_server, answer).verdict is Verdict.OK
    stranger = TestFleet.create(tmp_path / "other").device_identity("x")
    refused = probe_server_time(https_server, stranger.ca_file)
    assert refused.time is None
    assert "CERTIFICATE_VERIFY_FAILED" in (refused.problem or "")


def _doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "edge-agent"), "doctor",
                           "--config", str(config), "--profile", "x86-64-avx2", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.integration
def test_the_command_on_a_healthy_and_a_sick_device(fleet: TestFleet, broker: Broker,
                                                    https_server: str, tmp_path: Path) -> None:
    identity = fleet.device_identity("gw3")
    state = tmp_path / "state"
    state.mkdir()
    settings = FleetSettings("testfleet", "gw3", broker.address.url, identity.ca_file,
                             identity.cert_file, identity.key_file, https_server)
    write_config(tmp_path / "good.toml", AgentConfig(state, fleet=settings))
    result = _doctor(tmp_path / "good.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = {c["check"]: c["verdict"] for c in json.loads(result.stdout)}
    assert verdicts == {"config": "ok", "state dir": "ok", "disk": "ok", "token": "ok",
                        "device key": "ok", "certificate": "ok", "broker": "ok",
                        "clock": "ok", "runtimes": "ok", "accelerators": "ok"}
    old = _expired_identity(fleet, tmp_path / "old")
    (state / "api-token").write_text("t\n")
    (state / "api-token").chmod(0o644)
    write_config(tmp_path / "sick.toml", AgentConfig(state, fleet=FleetSettings(
        "testfleet", "gw-old", "mqtts://127.0.0.1:1", old.ca_file, old.cert_file, old.key_file,
        "https://127.0.0.1:1")))
    result = _doctor(tmp_path / "sick.toml")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert checks["token"]["verdict"] == "FAIL"
    assert checks["token"]["fix"] == f"chmod 600 {state / 'api-token'}"
    assert checks["certificate"]["verdict"] == "FAIL"
    assert "expired" in checks["certificate"]["detail"]
    assert checks["broker"]["verdict"] == "FAIL"
    assert checks["clock"]["verdict"] == "warn"
    # A config that does not load: nothing is checked as if the defaults were this agent's.
    (tmp_path / "broken.toml").write_text(f'state_dir = "{state}"\n[api]\nport = 99999\n')
    result = _doctor(tmp_path / "broken.toml")
    assert result.returncode == 1
    verdicts = {c["check"]: c["verdict"] for c in json.loads(result.stdout)}
    assert verdicts == {"config": "FAIL", "others": "skip"}

"""``edge-agent doctor``'s probes: the I/O that gathers facts for :mod:`.doctor`'s checks.

Each probe turns what it meets (an OSError, an SSL error, a missing module) into a fact
and never raises for it; :func:`run_checks` runs every probe and check in order.

The broker is probed with a TLS handshake using the device's certificate, and no MQTT
CONNECT: the fleet's broker takes the certificate's CN as the client id, so a CONNECT
would take over the running agent's session.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from firmware_profiles import load_profiles, probe_host
from firmware_profiles.matching import accelerator_available
from firmware_profiles.model import Profile
from transport.mqtt import BrokerAddress, TLSIdentity, tls_context

from .config import AgentConfig
from .doctor import (
    AcceleratorFact,
    BrokerOutcome,
    Check,
    ServerTime,
    Verdict,
    check_broker,
    check_certificate,
    check_clock,
    check_disk,
    check_private_file,
    check_runtimes,
    check_state_dir,
)

__all__ = ["largest_model_bytes", "probe_broker", "probe_server_time", "run_checks"]

_TOKEN_FILE = "api-token"
#: How long to wait after the handshake for a TLS 1.3 broker's verdict on our certificate.
_VERDICT_WAIT_S = 1.0


def probe_broker(url: str, identity: TLSIdentity, timeout: float = 5.0,
                 verdict_wait_s: float = _VERDICT_WAIT_S) -> tuple[BrokerOutcome, str]:
    """Open a TLS connection to the broker at ``url`` as ``identity``; what came of it."""
    address = BrokerAddress.from_url(url)
    try:
        context = tls_context(identity)
    except (OSError, ssl.SSLError) as exc:
        return (BrokerOutcome.IDENTITY_UNUSABLE,
                f"cannot load this device's certificate and key ({exc})")
    try:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
    except OSError as exc:
        return BrokerOutcome.UNREACHABLE, f"cannot connect ({exc.strerror or exc})"
    try:
        with context.wrap_socket(sock, server_hostname=address.host) as tls:
            return _verdict(tls, verdict_wait_s)
    except ssl.SSLCertVerificationError as exc:
        return BrokerOutcome.BROKER_UNTRUSTED, f"the broker's certificate: {exc.verify_message}"
    except ssl.SSLError as exc:
        return (BrokerOutcome.DEVICE_REFUSED,
                f"the broker refused the TLS session ({exc.reason or exc})")
    except OSError as exc:  # reset during the handshake: a refusal with no alert
        return (BrokerOutcome.DEVICE_REFUSED,
                f"the connection broke in the handshake ({exc.strerror or exc})")


def _verdict(tls: ssl.SSLSocket, wait_s: float) -> tuple[BrokerOutcome, str]:
    """After the handshake: TLS 1.2 has judged our certificate already, TLS 1.3 does so
    now, a refusal arriving as an alert on the first read (ssl.SSLError, raised to the
    caller). The broker sends nothing to a client that has not sent CONNECT, so silence
    means accepted."""
    tls.settimeout(wait_s)
    try:
        data = tls.recv(1)
    except TimeoutError:
        return BrokerOutcome.ACCEPTED, ""
    if not data:
        return BrokerOutcome.DEVICE_REFUSED, "the broker closed the connection after the handshake"
    return BrokerOutcome.ACCEPTED, ""


def probe_server_time(server_url: str, ca_file: Path, timeout: float = 5.0) -> ServerTime:
    """The fleet server's time (its HTTP ``Date``) and when it was asked and answered."""
    parts = urlsplit(server_url)
    host, port = parts.hostname or "", parts.port
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            now = datetime.now(timezone.utc)
            return ServerTime(None, now, now, f"cannot load {ca_file} ({exc})")
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    sent = datetime.now(timezone.utc)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        received = datetime.now(timezone.utc)
        date = response.getheader("Date")
    except (OSError, http.client.HTTPException) as exc:
        return ServerTime(None, sent, datetime.now(timezone.utc),
                          str(exc) or type(exc).__name__)
    finally:
        connection.close()
    if date is None:
        return ServerTime(None, sent, received, "its answer has no Date header")
    try:
        return ServerTime(parsedate_to_datetime(date), sent, received)
    except (TypeError, ValueError):
        return ServerTime(None, sent, received, f"its Date header {date[:40]!r} is not a date")


def largest_model_bytes(state_dir: Path) -> int:
    """The size of the largest installed model slot (0 without any)."""
    largest = 0
    for slot in (state_dir / "models").glob("*/*"):
        if slot.is_dir():
            size = sum(f.stat().st_size for f in slot.iterdir() if f.is_file())
            largest = max(largest, size)
    return largest


def _writable(directory: Path) -> bool:
    """Whether this user can create in ``directory``, tried rather than inferred from its
    mode (root may write anywhere by mode, yet not in /proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".doctor-", dir=directory))
    except OSError:
        return False
    return True


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        return None


def _runtime_checks(profile: Profile | None) -> list[Check]:
    from firmware_profiles.runtimes import import_litert

    try:
        import onnxruntime
        ort_version: str | None = onnxruntime.__version__
        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        ort_version, providers = None, ()
    litert = import_litert()
    facts = []
    if profile is not None:
        host = probe_host(load_profiles())
        facts = [AcceleratorFact(a.name, a.runtime, a.provider, accelerator_available(a, host))
                 for a in profile.accelerators]
    return check_runtimes(ort_version, providers, litert.distribution if litert else None,
                          profile.name if profile else None, facts)


def run_checks(config: AgentConfig, profile: Profile | None,
               now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
               ) -> list[Check]:
    """Every check for the agent ``config`` describes, in a fixed order."""
    state = config.state_dir
    checks = []
    # The agent creates a missing state directory: judge the directory it would be made in.
    existing = state
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    checks.append(check_state_dir(state, existing, _writable(existing)))
    try:
        usage = shutil.disk_usage(existing)
        checks.append(check_disk(state, usage.free, largest_model_bytes(state)))
    except OSError as exc:
        checks.append(Check("disk", Verdict.FAIL, f"cannot measure {existing} "
                            f"({exc.strerror})", "pass a usable --state-dir"))
    checks.append(check_private_file("token", state / _TOKEN_FILE, _mode(state / _TOKEN_FILE),
                                     created_later=True))
    fleet = config.fleet
    if fleet is None:
        checks.append(Check("fleet", Verdict.SKIP, "no [fleet] in the config: the agent runs "
                            "offline"))
    else:
        checks.append(check_private_file("device key", fleet.key_file, _mode(fleet.key_file),
                                         created_later=False))
        try:
            cert, ca = fleet.cert_file.read_bytes(), fleet.ca_file.read_bytes()
        except OSError as exc:
            checks.append(Check("certificate", Verdict.FAIL, f"cannot read {exc.filename} "
                                f"({exc.strerror})", "re-enroll the device (edge-agent enroll)"))
        else:
            checks.append(check_certificate(cert, ca, now()))
        outcome, reason = probe_broker(fleet.broker_url, TLSIdentity(
            fleet.ca_file, fleet.cert_file, fleet.key_file))
        checks.append(check_broker(fleet.broker_url, outcome, reason))
        checks.append(check_clock(fleet.server_url, None if fleet.server_url is None
                                  else probe_server_time(fleet.server_url, fleet.ca_file)))
    checks += _runtime_checks(profile)
    return checks

"""``edge-agent doctor``'s judgements: pure functions from facts to one verdict per check.

Each function takes what :mod:`.doctor_probes` found (bytes of a certificate, a file's
mode, free bytes, the outcome of a connection, two clocks) and returns a :class:`Check`:
its verdict, one line saying what was found and, unless it is fine, the fix. No I/O, no
clock of its own, so every verdict is tested with made-up facts; the probes are tested
against the real things (a Mosquitto broker with TLS, certificates made to expire).

A ``warn`` is something the agent works around (a missing accelerator: it serves on the
CPU); only a ``FAIL`` makes the doctor exit 1.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

__all__ = [
    "AcceleratorFact",
    "BrokerOutcome",
    "Check",
    "ServerTime",
    "Verdict",
    "check_broker",
    "check_certificate",
    "check_clock",
    "check_disk",
    "check_private_file",
    "check_runtimes",
    "check_state_dir",
    "exit_code",
    "render",
]

_MIB = 1 << 20
#: Free space kept beside what installs need (agent/installer.py keeps the same reserve).
RESERVE_BYTES = 8 * _MIB
#: Below this much free space the state directory fails whatever its models' sizes.
MIN_FREE_BYTES = 64 * _MIB
#: A certificate expiring sooner than this is a failure: it must be renewed now.
CERT_WARN_DAYS = 30
#: Clock skew beyond which certificate, metadata expiry and telemetry times go wrong.
MAX_SKEW_S = 60.0
_REENROLL = "re-enroll the device: edge-agent enroll --server URL --token TOKEN"


class Verdict(enum.Enum):
    """How one check came out."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class Check:
    """One check's result: what was found, and the fix unless it is fine."""

    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``verdict  name  detail; fix: ...`` on one line."""
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.verdict.value:4}  {self.name:12}  {self.detail}{fix}"


class BrokerOutcome(enum.Enum):
    """What a TLS connection to the broker with the device's certificate came to."""

    ACCEPTED = "accepted"
    UNREACHABLE = "unreachable"  # no TCP connection (refused, timed out, no such host)
    BROKER_UNTRUSTED = "broker_untrusted"  # the broker's certificate fails our CA or name
    DEVICE_REFUSED = "device_refused"  # the broker refused the device's certificate
    IDENTITY_UNUSABLE = "identity_unusable"  # our own certificate or key cannot be loaded


def check_state_dir(path: Path, existing: Path, writable: bool) -> Check:
    """The state directory ``path``, or ``existing``, its nearest existing ancestor (the
    agent creates the rest), usable by this user."""
    where = path if existing == path else existing
    if not writable:
        return Check("state dir", Verdict.FAIL, f"{where} is not a directory this user can "
                     "write", "chown it to the agent's user, or pass --state-dir")
    if existing == path:
        return Check("state dir", Verdict.OK, f"{path} writable")
    return Check("state dir", Verdict.OK, f"{path} does not exist yet; the agent creates it "
                 f"in {existing}")


def check_disk(path: Path, free_bytes: int, largest_model_bytes: int) -> Check:
    """Room in the state directory for the next install: the bundle and its unpacked
    artifact, each assumed as large as the largest installed model, plus the reserve."""
    needed = max(MIN_FREE_BYTES, 2 * largest_model_bytes + RESERVE_BYTES)
    detail = f"{path}: {free_bytes / _MIB:,.0f} MiB free, {needed / _MIB:,.0f} MiB needed"
    if free_bytes >= needed:
        return Check("disk", Verdict.OK, detail)
    return Check("disk", Verdict.FAIL, detail, f"free {(needed - free_bytes) / _MIB:,.0f} MiB "
                 f"on the file system of {path}, or move the state directory (--state-dir)")


def check_private_file(name: str, path: Path, mode: int | None, *, created_later: bool
                       ) -> Check:
    """A secret file (the API token, the device key) readable by its owner only.

    ``mode`` is None when the file does not exist; ``created_later``: that is fine (the
    agent creates the token 0600 when it starts)."""
    if mode is None:
        if created_later:
            return Check(name, Verdict.OK, f"{path} not created yet (the agent creates it "
                         "0600 at start)")
        return Check(name, Verdict.FAIL, f"{path} is missing", _REENROLL)
    if mode & 0o077:
        return Check(name, Verdict.FAIL, f"{path} has mode {mode & 0o777:o}: others may read "
                     "it", f"chmod 600 {path}")
    return Check(name, Verdict.OK, f"{path} mode {mode & 0o777:o}")


def check_certificate(cert_pem: bytes, ca_pem: bytes, now: datetime,
                      warn_days: int = CERT_WARN_DAYS) -> Check:
    """The device certificate: PEM, issued by the fleet CA, valid now and for ``warn_days``
    more. ``now`` is timezone-aware."""
    loaded = _issued(cert_pem, ca_pem)
    if isinstance(loaded, Check):
        return loaded
    subject = loaded.subject.rfc4514_string()
    start, end = loaded.not_valid_before_utc, loaded.not_valid_after_utc
    if now < start:
        return Check("certificate", Verdict.FAIL, f"{subject} is valid only from "
                     f"{start:%Y-%m-%d %H:%M} UTC; this clock says {now:%Y-%m-%d %H:%M}",
                     "set the clock (timedatectl set-ntp true)")
    if now >= end:
        return Check("certificate", Verdict.FAIL, f"{subject} expired on {end:%Y-%m-%d}",
                     _REENROLL)
    left = end - now
    detail = f"{subject} valid until {end:%Y-%m-%d} ({left.days} days)"
    if left < timedelta(days=warn_days):
        return Check("certificate", Verdict.FAIL, f"{detail}, under {warn_days} days",
                     f"renew it before it expires: {_REENROLL}")
    return Check("certificate", Verdict.OK, detail)


def _issued(cert_pem: bytes, ca_pem: bytes) -> x509.Certificate | Check:
    """The certificate if it parses and the CA issued it, else the failed check."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        return Check("certificate", Verdict.FAIL, f"not a PEM certificate ({exc})", _REENROLL)
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        return Check("certificate", Verdict.FAIL, f"the fleet CA file is not a PEM "
                     f"certificate ({exc})", _REENROLL)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Check("certificate", Verdict.FAIL, f"{cert.subject.rfc4514_string()} was not "
                     f"issued by the fleet CA {ca.subject.rfc4514_string()}", _REENROLL)
    return cert


def check_broker(url: str, outcome: BrokerOutcome, reason: str) -> Check:
    """The broker at ``url`` as a TLS connection with the device's identity found it."""
    if outcome is BrokerOutcome.ACCEPTED:
        return Check("broker", Verdict.OK, f"{url} accepted this device's certificate")
    detail = f"{url}: {reason}"
    fix = {
        BrokerOutcome.UNREACHABLE: "check the network, the broker's host and port "
                                   "(fleet.broker_url) and that the broker runs",
        BrokerOutcome.BROKER_UNTRUSTED: "the broker is not the fleet's, or its certificate "
                                        "does not name this host: check fleet.broker_url and "
                                        "fleet.ca_file",
        BrokerOutcome.DEVICE_REFUSED: "the certificate may be revoked, expired or of "
                                      f"another fleet: {_REENROLL}",
        BrokerOutcome.IDENTITY_UNUSABLE: _REENROLL,
    }[outcome]
    return Check("broker", Verdict.FAIL, detail, fix)


@dataclass(frozen=True)
class ServerTime:
    """The fleet server's time (None if it could not be read, and ``problem`` says why),
    and this clock when the question was sent and when the answer came."""

    time: datetime | None
    sent: datetime
    received: datetime
    problem: str | None = None


def check_clock(server_url: str | None, server: ServerTime | None,
                max_skew_s: float = MAX_SKEW_S) -> Check:
    """This clock against the fleet server's (its HTTP ``Date``, whole seconds), taking the
    local time as the middle of the exchange."""
    if server_url is None or server is None:
        return Check("clock", Verdict.SKIP, "no fleet.server_url to compare with")
    if server.time is None:
        return Check("clock", Verdict.WARN, f"cannot read the time of {server_url} "
                     f"({server.problem})", "check fleet.server_url and that the server runs")
    trip = server.received - server.sent
    skew = (server.sent + trip / 2 - server.time).total_seconds()
    # The Date header has whole seconds: a second of skew may be rounding.
    tolerance = max_skew_s + 1 + trip.total_seconds() / 2
    detail = f"{abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} {server_url}"
    if abs(skew) <= tolerance:
        return Check("clock", Verdict.OK, detail)
    return Check("clock", Verdict.FAIL, f"{detail}, over {max_skew_s:.0f} s: certificates "
                 "and signed metadata may be judged expired or not yet valid",
                 "enable time synchronisation (timedatectl set-ntp true)")


@dataclass(frozen=True)
class AcceleratorFact:
    """A profile's accelerator and whether this host offers it."""

    name: str
    runtime: str
    provider: str
    available: bool


def check_runtimes(onnxruntime: str | None, providers: Sequence[str], litert: str | None,
                   profile: str | None, accelerators: Sequence[AcceleratorFact],
                   ) -> list[Check]:
    """The inference runtimes (``onnxruntime``/``litert``: the installed version or
    distribution, None if absent) and the profile's accelerators."""
    checks = []
    if onnxruntime is None and litert is None:
        checks.append(Check("runtimes", Verdict.FAIL, "neither onnxruntime nor LiteRT is "
                            "installed: no model can be served",
                            "pip install 'edgefleet[agent-onnx]' (or agent-litert)"))
    else:
        found = []
        if onnxruntime is not None:
            found.append(f"onnxruntime {onnxruntime} ({', '.join(providers)})")
        if litert is not None:
            found.append(f"LiteRT from {litert}")
        missing = [] if onnxruntime is not None else [".onnx"]
        missing += [] if litert is not None else [".tflite"]
        detail = "; ".join(found)
        if missing:
            checks.append(Check("runtimes", Verdict.WARN, f"{detail}; {' and '.join(missing)} "
                                "variants cannot be served", "install the other runtime's "
                                "extra if the fleet ships them"))
        else:
            checks.append(Check("runtimes", Verdict.OK, detail))
    if profile is None:
        checks.append(Check("accelerators", Verdict.SKIP, "no firmware profile fits this "
                            "host: generic CPU"))
        return checks
    for acc in accelerators:
        what = f"{acc.name} ({acc.runtime} {acc.provider}) of profile {profile}"
        if acc.available:
            checks.append(Check("accelerators", Verdict.OK, f"{what} available"))
        else:
            kind = "execution provider" if acc.runtime == "onnxruntime" else "delegate"
            checks.append(Check("accelerators", Verdict.WARN, f"{what} is not available: "
                                "models run on the CPU", f"install the {acc.provider} {kind} "
                                "and its driver, or set the profile that fits (edge-agent "
                                "probe)"))
    if not accelerators:
        checks.append(Check("accelerators", Verdict.OK, f"profile {profile} uses the CPU only"))
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    """1 if any check failed, else 0."""
    return 1 if any(c.verdict is Verdict.FAIL for c in checks) else 0


def render(checks: Sequence[Check]) -> str:
    """One line per check, then a summary line."""
    failed = sum(c.verdict is Verdict.FAIL for c in checks)
    warned = sum(c.verdict is Verdict.WARN for c in checks)
    summary = (f"{failed} check(s) failed" if failed else "all checks passed") + (
        f", {warned} warning(s)" if warned else "")
    return "\n".join([*(c.line() for c in checks), summary])

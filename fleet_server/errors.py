"""Exceptions raised by the fleet_server package.

Every message says what was wrong and what to do about it. Errors of the bundle package
(:class:`bundle.errors.BundleError`) pass through unchanged: they already name the reason a
bundle was refused, and the CLI prints them the same way. The tree::

    FleetError
    ├── KeyStoreError       the keys directory is missing, incomplete or inconsistent
    ├── BundleInputError    the artifacts, model or report given to `fleet bundle build`
    ├── RegistryError       the registry refused a request (unknown device, used token, ...)
    ├── CAError             the fleet CA directory is unusable, or a name cannot be issued
    ├── CSRError            a device's certificate signing request is refused
    ├── BrokerError         the MQTT broker cannot be configured or started
    ├── ServiceError        `fleet serve` cannot start: data directory, keys, configuration
    ├── EnrollmentError     an enrollment token was refused (unknown, used or expired)
    ├── ReleaseError        a publish, rollback or re-release devices would refuse, or that
    │                       this server cannot sign
    ├── ApiError            the operator API refused a request, or cannot be reached
    └── MonitoringError     monitoring's configuration (alert rules, webhooks) or a metrics
                            query (window, step, grouping) is unusable
"""

from __future__ import annotations

__all__ = ["ApiError", "BrokerError", "BundleInputError", "CAError", "CSRError",
           "EnrollmentError", "FleetError", "KeyStoreError", "MonitoringError", "RegistryError",
           "ReleaseError", "ServiceError"]


class FleetError(Exception):
    """Root of every error the fleet_server package raises on purpose."""


class KeyStoreError(FleetError):
    """The keys directory is missing, incomplete or inconsistent."""


class BundleInputError(FleetError):
    """The artifacts directory, model file or report.json cannot be used for a bundle."""


class RegistryError(FleetError):
    """The registry refused a request: unknown device or group, a used, expired or unknown
    enrollment token, a bundle clash, nothing to roll back, an unusable database URL.

    Failures of the database itself (disk full, connection lost) are not wrapped: they
    surface as the driver's own errors (:class:`sqlite3.Error`, :class:`psycopg.Error`), so a
    caller can tell "refused" (the client's fault) from "broken" (the server's)."""


class CAError(FleetError):
    """The fleet CA directory is missing, incomplete or inconsistent, or an identity name
    cannot be issued (invalid, or reserved for another kind of identity)."""


class CSRError(FleetError):
    """A device's CSR cannot be signed: not a CSR, a signature that does not verify, an
    unsupported key, or an invalid or reserved device id. The device should make a new
    CSR (bad data) or the operator pick another id; signing it again as is cannot work."""


class BrokerError(FleetError):
    """The MQTT broker cannot be configured or started (the message carries its log)."""


class ServiceError(FleetError):
    """The fleet service cannot start or run as configured: an unusable data directory, a
    missing root.json, a fleet name that differs from the CA's, a broker it cannot reach."""


class EnrollmentError(FleetError):
    """An enrollment was refused because of its token (unknown, already used, expired): the
    installer needs a new token from the operator. Bad CSRs are :class:`CSRError`."""


class ReleaseError(FleetError):
    """Nothing was published because devices would refuse it (a version lower than one
    they have, metadata older than what they trust) or because the server cannot sign the
    re-release it needs (no online keys): the message says what to do instead."""


class ApiError(FleetError):
    """The operator API answered with an error, or the server cannot be reached.

    ``status`` is the HTTP status (0 when no answer came), so scripts can tell a refusal
    (4xx) from a broken server (5xx) or one that is not running (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class MonitoringError(FleetError):
    """Monitoring's configuration or a metrics query is unusable (the message names the key
    or parameter and the fix)."""

"""Schema v9: the fleet CA's records in the registry, shared by every server process
(issue 16: several ``fleet serve`` processes, each with a copy of the CA directory).

- ``ca_issued``: every device certificate issued (its fingerprint, device, serial as a
  decimal string: serials are up to 159 bits, past BIGINT; the PEM), so any process can
  revoke a certificate another one issued.
- ``ca_revoked``: every revocation (fingerprint, serial, device, when, why): the list each
  process renders its ``crl.pem`` from, so the CRLs of all processes agree.

A CA directory's own ``issued/`` and ``revoked.json`` (one process, or before v9) are still
read: nothing to copy here.
"""

from __future__ import annotations

from fleet_server.registry.database import Tx

__all__ = ["upgrade"]


def upgrade(tx: Tx) -> None:
    """Create both tables."""
    tx.run("CREATE TABLE ca_issued (fingerprint TEXT PRIMARY KEY, device_id TEXT NOT NULL, "
           "serial TEXT NOT NULL, cert_pem TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL)")
    tx.run("CREATE TABLE ca_revoked (fingerprint TEXT PRIMARY KEY, serial TEXT NOT NULL, "
           "device_id TEXT NOT NULL, revoked_at DOUBLE PRECISION NOT NULL, "
           "reason TEXT NOT NULL)")

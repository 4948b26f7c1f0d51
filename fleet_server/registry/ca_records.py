"""The fleet CA's shared records (schema v9): certificates issued and revoked, so that
every server process's CA can revoke what another one issued and renders the same CRL
(:class:`fleet_server.ca.FleetCA`, docs/scale.md)."""

from __future__ import annotations

from fleet_server.ca import IssuedCertificate, RevokedCertificate
from fleet_server.registry.database import Tx

__all__ = ["add_issued", "add_revoked", "issued", "revoked"]


def add_issued(tx: Tx, record: IssuedCertificate) -> None:
    """Record a certificate issued (again: nothing changes)."""
    tx.run("INSERT INTO ca_issued (fingerprint, device_id, serial, cert_pem, issued_at) "
           "VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
           (record.fingerprint, record.device, str(record.serial),
            record.cert_pem.decode("ascii"), record.issued_at))


def issued(tx: Tx, fingerprint: str) -> IssuedCertificate | None:
    """The certificate issued with this fingerprint; None if none was recorded."""
    row = tx.one("SELECT fingerprint, device_id, serial, cert_pem, issued_at FROM ca_issued "
                 "WHERE fingerprint = ?", (fingerprint,))
    return None if row is None else IssuedCertificate(
        str(row[0]), str(row[1]), int(row[2]), str(row[3]).encode("ascii"), float(row[4]))


def add_revoked(tx: Tx, record: RevokedCertificate) -> bool:
    """Record a revocation; False if that certificate was revoked already."""
    return tx.run("INSERT INTO ca_revoked (fingerprint, serial, device_id, revoked_at, reason) "
                  "VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
                  (record.fingerprint, str(record.serial), record.device, record.revoked_at,
                   record.reason)) > 0


def revoked(tx: Tx) -> list[RevokedCertificate]:
    """Every revocation, oldest first."""
    return [RevokedCertificate(int(r[0]), str(r[1]), str(r[2]), float(r[3]), str(r[4]))
            for r in tx.all("SELECT serial, fingerprint, device_id, revoked_at, reason "
                            "FROM ca_revoked ORDER BY revoked_at, fingerprint")]

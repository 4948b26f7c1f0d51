"""The operator API's JSON shapes of the server's records (the OpenAPI schemas of
:mod:`fleet_server.api_spec`), shared by its route modules."""

from __future__ import annotations

import base64
from typing import Any

from .enroller import Enrollment, IssuedToken
from .publishing import PublishResult
from .registry import (
    BundleRecord,
    DeltaRecord,
    DesiredChange,
    Device,
    EventRecord,
    desired_json,
)

__all__ = ["bundle_json", "change_json", "device_json", "enrollment_json", "event_json",
           "publish_json", "token_json"]


def device_json(device: Device, *, online: bool | None) -> dict[str, Any]:
    """A device as the API shows it (OpenAPI schema ``Device``); ``online`` is None when
    the server cannot tell (no broker connection)."""
    return {"id": device.id, "group": device.group, "tags": list(device.tags),
            "profile": device.profile, "cert_fingerprint": device.cert_fingerprint,
            "enrolled_at": device.enrolled_at, "last_seen": device.last_seen,
            "online": online,
            "desired": device.desired_json(),
            "reported": dict(device.reported), "reported_at": device.reported_at,
            "converged": device.converged, "encryption_key": device.encryption_key,
            "reset_at": device.reset_at}


def bundle_json(record: BundleRecord | DeltaRecord) -> dict[str, Any]:
    """A stored bundle (schema ``Bundle``); the blob's path stays private."""
    if isinstance(record, DeltaRecord):
        return {"sha256": record.sha256, "size": record.size, "created_at": record.created_at,
                "bundle_sha256": record.bundle_sha256, "base_version": record.base_version}
    return {"sha256": record.sha256, "name": record.name, "version": record.version,
            "size": record.size, "created_at": record.created_at,
            "metadata_version": record.metadata_version, "rollback_of": record.rollback_of}


def event_json(event: EventRecord) -> dict[str, Any]:
    """An event of the log (schema ``Event``)."""
    return {"id": event.id, "at": event.at, "device": event.device, "kind": event.kind,
            "detail": dict(event.detail)}


def change_json(change: DesiredChange) -> dict[str, Any]:
    """A desired-state change (schema ``Change``)."""
    return {"device": change.device, "model": change.model,
            "before": None if change.before is None else desired_json(change.before),
            "after": None if change.after is None else desired_json(change.after)}


def publish_json(result: PublishResult) -> dict[str, Any]:
    """The answer of publish and rollback (schema ``PublishResult``)."""
    return {"devices": list(result.devices),
            "changes": [change_json(c) for c in result.changes],
            "delivered": result.delivered,
            "released": [bundle_json(b) for b in result.released],
            "transfer": None if result.transfer is None else result.transfer.as_json()}


def token_json(issued: IssuedToken) -> dict[str, Any]:
    """An issued enrollment token (schema ``EnrollmentToken``)."""
    return {"token": issued.token, "group": issued.group, "expires_at": issued.expires_at,
            "device": issued.device}


def enrollment_json(enrollment: Enrollment) -> dict[str, Any]:
    """An enrollment (schema ``Enrollment``): PEM strings, root.json in base64."""
    return {"device_id": enrollment.device_id, "fleet": enrollment.fleet,
            "group": enrollment.group,
            "certificate": enrollment.certificate_pem.decode("ascii"),
            "ca_certificate": enrollment.ca_certificate_pem.decode("ascii"),
            "broker_url": enrollment.broker_url,
            "root": base64.b64encode(enrollment.root_json).decode("ascii")}


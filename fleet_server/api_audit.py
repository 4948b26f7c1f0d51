"""The audit log at the operator API: ``GET /api/audit``, and the entries written for the
API's changing operations (publish, rollback, upload, enrollment, reset) and for a new
root.json (a key rotation). Rollout actions and automatic halts are written by the rollout
runner itself. The chain is :mod:`fleet_server.audit`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .audit import AuditEntry

if TYPE_CHECKING:
    from .api import Request
    from .service import FleetService

__all__ = ["AUDITED", "AUDIT_ROUTES", "audit_json", "audit_request", "note_root"]

log = logging.getLogger(__name__)

#: The API operations each audited success writes an entry for, by (method, route path).
AUDITED = {("POST", "/api/publish"): "publish", ("POST", "/api/rollback"): "rollback",
           ("POST", "/api/bundles"): "bundle.upload", ("POST", "/api/enroll"): "enroll",
           ("POST", "/api/devices/{id}/reset"): "device.reset"}
_MAX_ENTRIES = 10_000


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    """An entry as the API shows it (schema ``AuditEntry``)."""
    return {"seq": entry.seq, "at": entry.at, "actor": entry.actor, "action": entry.action,
            "target": entry.target, "reason": entry.reason, "detail": dict(entry.detail),
            "prev_hash": entry.prev_hash, "hash": entry.hash}


def _audit(service: FleetService, request: Request) -> tuple[int, Any]:
    entries = service.registry.audit_log(since_seq=request.int_arg("since", 0, 0, 2**63 - 1),
                                         limit=request.int_arg("limit", 1000, 1, _MAX_ENTRIES))
    seq, last = service.registry.audit_head()
    return 200, {"entries": [audit_json(e) for e in entries],
                 "head": {"seq": seq, "hash": last}}


def audit_request(service: FleetService, action: str, request: Request,
                  answer: Mapping[str, Any]) -> None:
    """Write the entry for a successful audited operation (``answer``: its response)."""
    body = request.cached_json or {}
    reason = body.get("reason") if isinstance(body.get("reason"), str) else ""
    selection = (f"group:{body['group']}" if isinstance(body.get("group"), str)
                 else f"devices:{','.join(map(str, body.get('devices') or []))[:500]}")
    actor = request.actor
    if action == "publish":
        target = selection
        detail = {"bundle_sha256": body.get("bundle_sha256"),
                  "changes": len(answer.get("changes", [])),
                  "released": [b.get("version") for b in answer.get("released", [])]}
    elif action == "rollback":
        target = selection
        detail = {"model": body.get("model"), "changes": len(answer.get("changes", []))}
    elif action == "bundle.upload":
        target = f"bundle:{answer.get('name')} v{answer.get('version')}"
        detail = {"sha256": answer.get("sha256")}
    elif action == "enroll":
        actor = f"device:{answer.get('device_id')} (enrollment token)"
        target = f"device:{answer.get('device_id')}"
        detail = {"group": answer.get("group")}
    else:
        target = f"device:{request.params.get('id')}"
        detail = {"cert_fingerprint": answer.get("cert_fingerprint")}
    service.registry.append_audit(actor, action, target, str(reason or "")[:500], detail)


def note_root(service: FleetService) -> None:
    """Write a ``keys.rotated`` entry when the keys directory's root.json is newer than the
    one the log last saw (key rotations happen offline, with ``fleet keys rotate``)."""
    try:
        version = int(json.loads(service.root_json())["signed"]["version"])
    except (ValueError, KeyError, TypeError):
        return  # check_root at start refuses such a root; nothing to record
    last = service.registry.last_audit("keys.rotated")
    seen = last.detail.get("root_version") if last is not None else None
    if seen == version:
        return
    service.registry.append_audit(
        "keys directory", "keys.rotated", "root.json",
        f"root.json v{version} found (was {'none' if seen is None else f'v{seen}'})",
        {"root_version": version})
    log.info("audit: root.json v%d recorded", version)


#: (method, path, handler) of the audit operations.
AUDIT_ROUTES = (("GET", "/api/audit", _audit),)

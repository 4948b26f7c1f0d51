"""The device's trusted state on disk: TUF metadata it trusts and model versions it installed.

One file, ``trust.json`` in the state directory, replaced atomically
(:func:`common.atomic.write_atomic`) so power loss leaves the old or the new state, never
a mix of metadata versions. Format::

    {"format": 1,
     "root": "<base64 of root.json>", "timestamp": "<base64>" | null,
     "snapshot": "<base64>" | null, "targets": "<base64>" | null,
     "installed": {"<model name>": {"version": 3, "manifest_sha256": "<hex>"}}}

Metadata is stored as the exact signed bytes, since signatures cover them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.trust import InstalledVersion, TrustedState
from common.atomic import write_atomic

from .errors import TrustStoreError

__all__ = ["TrustStore"]

_FORMAT = 1
_ROLES = ("root", "timestamp", "snapshot", "targets")


@dataclass(frozen=True)
class TrustStore:
    """The trusted state kept in ``directory``."""

    directory: Path

    @property
    def path(self) -> Path:
        """The state file."""
        return self.directory / "trust.json"

    def exists(self) -> bool:
        """Whether the device has been initialised with a pinned root."""
        return self.path.exists()

    def load(self) -> TrustedState:
        """Read the trusted state."""
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError as exc:
            raise TrustStoreError(f"no trusted state in {self.directory}; initialise it with "
                                  "--root ROOT.json (the fleet's pinned root)") from exc
        except (OSError, ValueError) as exc:
            raise TrustStoreError(f"{self.path} is unreadable ({exc}); restore it or "
                                  "re-provision the device") from exc
        try:
            return _from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise TrustStoreError(f"{self.path} is corrupt ({exc!r}); restore it or "
                                  "re-provision the device") from exc

    def save(self, state: TrustedState) -> None:
        """Replace the trusted state atomically and durably."""
        data = json.dumps(_to_dict(state), indent=1, sort_keys=True).encode("utf-8")
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            raise TrustStoreError(f"cannot write {self.path} ({exc.strerror}); check the "
                                  "state directory's permissions and free space") from exc


def _to_dict(state: TrustedState) -> dict[str, Any]:
    out: dict[str, Any] = {"format": _FORMAT}
    for role in _ROLES:
        data = getattr(state, role)
        out[role] = None if data is None else base64.b64encode(data).decode("ascii")
    out["installed"] = {name: {"version": v.version, "manifest_sha256": v.manifest_sha256}
                        for name, v in state.installed.items()}
    return out


def _from_dict(raw: dict[str, Any]) -> TrustedState:
    if raw["format"] != _FORMAT:
        raise ValueError(f"unknown format {raw['format']!r}")
    blobs = {role: None if raw[role] is None else base64.b64decode(raw[role], validate=True)
             for role in _ROLES}
    root = blobs.pop("root")
    if root is None:
        raise ValueError("no root")
    return TrustedState(
        root=root, timestamp=blobs["timestamp"], snapshot=blobs["snapshot"],
        targets=blobs["targets"],
        installed={str(name): InstalledVersion(int(v["version"]), str(v["manifest_sha256"]))
                   for name, v in raw["installed"].items()})

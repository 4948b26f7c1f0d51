"""The device's trusted state on disk: TUF metadata it trusts and model versions it installed.

One file, ``trust.json`` in the state directory, replaced atomically
(:func:`common.atomic.write_atomic`) so power loss leaves the old or the new state, never
a mix of metadata versions. Format::

    {"format": 1,
     "root": "<base64 of root.json>", "timestamp": "<base64>" | null,
     "snapshot": "<base64>" | null, "targets": "<base64>" | null,
     "installed": {"<model name>": {"version": 3, "manifest_sha256": "<hex>"}}}

Metadata is stored as the exact signed bytes, since signatures cover them.

:func:`resolve_root` is how a ``--root ROOT.json`` option meets the store: the file must be
TUF root metadata signed by its own keys, and a device that already pins another root says
so and what to do, instead of ignoring the option while every bundle is then rejected.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, Root

from bundle import root as bundle_root
from bundle.errors import InvalidRootError
from bundle.trust import InstalledVersion, TrustedState
from common.atomic import write_atomic

from .errors import TrustStoreError

__all__ = ["TrustStore", "check_root", "resolve_root"]

log = logging.getLogger(__name__)
_FORMAT = 1
_ROLES = ("root", "timestamp", "snapshot", "targets")
#: Far more than any root.json (a few keys and signatures); a bigger file is not one.
_MAX_ROOT_BYTES = 1 << 20


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


def check_root(data: bytes, source: str) -> Metadata[Root]:
    """:func:`bundle.root.check_root`, its error as a TrustStoreError (the agent's tree)."""
    try:
        return bundle_root.check_root(data, source)
    except InvalidRootError as exc:
        raise TrustStoreError(str(exc)) from exc


def resolve_root(store: TrustStore, root: Path | None) -> TrustedState | None:
    """What the device trusts, given ``--root``: the stored state, or a new state from
    ``root`` if the store is empty (not saved here). None when neither exists.

    The stored state wins while ``root`` is the root it pins or an older version of it (a
    rotation since). A different root raises TrustStoreError saying how to re-pin, rather
    than leaving the option silently ignored and every bundle rejected.
    """
    given = None if root is None else _read_root(root)
    if not store.exists():
        return None if given is None else TrustedState(root=given)
    state = store.load()
    if given is None or given == state.root:
        return state
    assert root is not None
    pinned = check_root(state.root, f"the root pinned in {store.path}").signed
    offered_md = check_root(given, str(root))
    offered = offered_md.signed
    if offered.version < pinned.version:
        log.info("%s pins root v%d, newer than %s (v%d): rotated since; keeping it",
                 store.path, pinned.version, root, offered.version)
        return state
    if offered.version == pinned.version + 1 and pinned.get_verification_result(
            Root.type, offered_md.signed_bytes, offered_md.signatures).verified:
        raise TrustStoreError(
            f"{root} is the next root (v{offered.version}) of the fleet {store.path} trusts "
            f"(v{pinned.version}); the device takes it from the next bundle, signed by the "
            "fleet: leave out --root")
    raise TrustStoreError(
        f"{store.path} pins another root (v{pinned.version}, keys {_key_ids(pinned)}) than "
        f"{root} (v{offered.version}, keys {_key_ids(offered)}), and bundles are verified "
        f"against the pinned one. If {root} is the right fleet's root, move "
        f"{store.directory} away (the device forgets the model versions it trusted) and "
        "start again with --root; otherwise leave out --root")


def _read_root(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_ROOT_BYTES + 1)
    except OSError as exc:
        raise TrustStoreError(f"cannot read root metadata {path} ({exc.strerror})") from exc
    if len(data) > _MAX_ROOT_BYTES:
        raise TrustStoreError(f"{path} is over {_MAX_ROOT_BYTES} bytes; it is not a "
                              "root.json")
    check_root(data, str(path))
    return data


def _key_ids(root: Root) -> str:
    return ", ".join(sorted(key_id[:8] for key_id in root.roles[Root.type].keyids))

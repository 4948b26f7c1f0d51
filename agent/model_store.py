"""The model store on disk: versioned slots per model and an atomically flipped active pointer.

Layout under the store directory::

    {name}/{version}/model.onnx|model.tflite   the artifact this device runs (plaintext)
    {name}/{version}/member-N.onnx|.tflite     a composite's members after the first
                                               (the first is model.*; slot.json lists all)
    {name}/{version}/manifest.json             the verified bundle manifest
    {name}/{version}/slot.json                 which variant, its sha256, when installed
    {name}/active.json                         {"version": 3, "previous": 2}

A slot is written into a hidden staging directory, fsynced and renamed into place, so a slot
directory either is complete or does not exist. ``active.json`` is replaced atomically, so it
always names a complete slot. The previous version's slot is kept until the next commit:
it is the known-good model to go back to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.errors import BundleError
from bundle.manifest import ArtifactVariant, Manifest, manifest_from_json, manifest_to_json
from common.atomic import fsync_dir, write_atomic
from protocol.names import InvalidNameError, check_name

from .errors import AgentError

__all__ = ["ActivePointer", "MemberFile", "ModelStore", "StoredModel", "sha256_file"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ActivePointer:
    """Which version of a model serves, and which one to go back to."""

    version: int
    previous: int | None


@dataclass(frozen=True)
class MemberFile:
    """One member artifact of a composite's slot."""

    path: Path
    format: str
    sha256: str


@dataclass(frozen=True)
class StoredModel:
    """One complete slot; a composite's has every member in ``members`` (the first is
    ``path``), an ordinary one none."""

    name: str
    version: int
    path: Path
    format: str
    dtype: str
    sha256: str
    manifest: Manifest
    manifest_sha256: str
    bundle_sha256: str | None = None  # of the bundle file it came from
    members: tuple[MemberFile, ...] = ()

    def intact(self) -> bool:
        """Whether the model files still hash to what was installed (bit rot, tampering)."""
        files = self.members or (MemberFile(self.path, self.format, self.sha256),)
        try:
            return all(sha256_file(f.path) == f.sha256 for f in files)
        except OSError:
            return False


class ModelStore:
    """The slots under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Models that have an active version."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/active.json"))

    def all_names(self) -> list[str]:
        """Every model with a directory in the store, active or not."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _valid_name(p.name))

    def active(self, name: str) -> ActivePointer | None:
        """The active pointer of ``name``, or None if it was never activated."""
        path = self._dir(name) / "active.json"
        try:
            raw = json.loads(path.read_bytes())
            previous = raw["previous"]
            return ActivePointer(int(raw["version"]), None if previous is None else int(previous))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"{path} is corrupt ({exc!r}); reinstall the model's bundle") from exc

    def versions(self, name: str) -> list[int]:
        """Versions with a complete slot."""
        directory = self._dir(name)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def slot(self, name: str, version: int) -> StoredModel:
        """Read a slot's records. Raises AgentError when it is missing or corrupt."""
        directory = self._dir(name) / str(version)
        try:
            info = json.loads((directory / "slot.json").read_bytes())
            manifest_bytes = (directory / "manifest.json").read_bytes()
            return StoredModel(
                name=name, version=version, path=directory / info["file"],
                format=info["format"], dtype=info["dtype"], sha256=info["sha256"],
                manifest=manifest_from_json(manifest_bytes),
                manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                bundle_sha256=info.get("bundle_sha256"),
                members=tuple(MemberFile(directory / m["file"], m["format"], m["sha256"])
                              for m in info.get("members", ())))
        except (OSError, ValueError, KeyError, TypeError, BundleError) as exc:
            raise AgentError(f"slot {directory} is missing or corrupt ({exc}); reinstall "
                             f"{name} v{version}") from exc

    def stage(self, manifest: Manifest, variant: ArtifactVariant, model: Iterable[bytes],
              installed_at: float, bundle_sha256: str | None = None) -> StoredModel:
        """Write the slot for ``manifest``'s ``variant`` durably; ``model`` is the plaintext
        artifact in blocks (an error raised while they are read leaves no slot behind).

        Replaces an earlier slot of the same version (a resumed install) unless it is the
        active one and intact: an active slot that no longer reads back is staged again.
        """
        return self._stage(manifest, [(variant, model)], installed_at, bundle_sha256)

    def stage_members(self, manifest: Manifest,
                      members: Sequence[tuple[ArtifactVariant, Iterable[bytes]]],
                      installed_at: float, bundle_sha256: str | None = None) -> StoredModel:
        """Write the slot of a composite: every member artifact, in member order, as
        :meth:`stage` writes one."""
        return self._stage(manifest, members, installed_at, bundle_sha256, composite=True)

    def _stage(self, manifest: Manifest,
               parts: Sequence[tuple[ArtifactVariant, Iterable[bytes]]], installed_at: float,
               bundle_sha256: str | None, composite: bool = False) -> StoredModel:
        name, version = _check_name(manifest.name), manifest.version
        try:
            pointer = self.active(name)
        except AgentError:
            pointer = None  # damaged: the restore stopped trusting it, so may we
        if pointer is not None and pointer.version == version:
            try:
                existing = self.slot(name, version)
            except AgentError:
                existing = None
            if existing is not None and existing.intact():
                return existing
            log.warning("the active slot %s v%d is damaged; staging it again", name, version)
        model_dir = self._dir(name)
        staging = model_dir / f".staging-{version}"
        final = model_dir / str(version)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            files = []
            for index, (variant, blocks) in enumerate(parts):
                file_name = f"{'member-' + str(index) if index else 'model'}.{variant.format}"
                digest, size = _write_blocks(staging / file_name, blocks)
                files.append({"file": file_name, "format": variant.format,
                              "dtype": variant.dtype, "variant": variant.path,
                              "sha256": digest, "size": size})
            info: dict[str, Any] = {**files[0], "installed_at": installed_at,
                                    "bundle_sha256": bundle_sha256}
            if composite:
                info["members"] = files
            _write_blocks(staging / "manifest.json", [manifest_to_json(manifest)])
            _write_blocks(staging / "slot.json", [json.dumps(info, indent=1).encode()])
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        fsync_dir(model_dir)
        return self.slot(name, version)

    def set_active(self, name: str, version: int, previous: int | None) -> None:
        """Flip the active pointer atomically."""
        data = json.dumps({"version": version, "previous": previous}).encode()
        write_atomic(self._dir(name) / "active.json", data)

    def deactivate(self, name: str) -> None:
        """Stop serving ``name`` from the store (its first version failed probation)."""
        path = self._dir(name) / "active.json"
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_dir(path.parent)

    def sweep(self, name: str, installing: Collection[int]) -> list[Path]:
        """Delete staging directories and slots of ``name`` that are neither active,
        previous nor in ``installing``; with a damaged pointer only staging directories
        (the restore decides about slots). Returns what it deleted."""
        try:
            pointer = self.active(name)
        except AgentError:
            pointer, keep = None, None
        else:
            keep = set(installing) | (set() if pointer is None
                                      else {pointer.version, pointer.previous})
        removed = []
        for path in sorted(self._dir(name).iterdir()):
            if path.is_dir() and (path.name.startswith(".staging-") or (
                    keep is not None and path.name.isdigit() and int(path.name) not in keep)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def remove(self, name: str, version: int) -> None:
        """Delete one slot (a version that failed), never the active one."""
        pointer = self.active(name)
        if pointer is not None and pointer.version == version:
            raise AgentError(f"refusing to delete the active slot {name} v{version}")
        shutil.rmtree(self._dir(name) / str(version), ignore_errors=True)

    def _dir(self, name: str) -> Path:
        return self.root / _check_name(name)


def _check_name(name: str) -> str:
    # Model names become directory names; refuse anything that could escape the store.
    try:
        return check_name(name, "model name")
    except InvalidNameError as exc:
        raise AgentError(str(exc)) from None


def _valid_name(name: str) -> bool:
    try:
        check_name(name, "model name")
    except InvalidNameError:
        return False
    return True


def _write_blocks(path: Path, blocks: Iterable[bytes]) -> tuple[str, int]:
    """Write ``blocks`` to ``path`` durably; their sha256 and total size."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "wb") as f:
        for block in blocks:
            f.write(block)
            digest.update(block)
            size += len(block)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""A tiny in-memory TUF repository for tests (after python-tuf's RepositorySimulator).

It holds keys per role and the root chain, builds signed bundles, and offers the surgical
edits attack tests need: replace an entry, re-sign metadata, strip signatures.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from bundle.archive import frame, read_archive
from bundle.signing import (
    ArtifactInput,
    BundleSpec,
    build_bundle,
    make_root,
    rotate_root,
    sign_metadata,
)

# python-tuf checks expiry against the wall clock, so test time is real time (rounded).
NOW = datetime.now(timezone.utc).replace(microsecond=0)
VALID = NOW + timedelta(days=30)
ONLINE = ("targets", "snapshot", "timestamp")
MODEL = b"\x08\x07model-bytes" * 64


def spec(name: str = "digits", version: int = 1, profiles: Sequence[str] = ("x86-avx2",),
         artifacts: Sequence[ArtifactInput] | None = None) -> BundleSpec:
    """A small bundle spec; the artifact bytes are arbitrary (bundles are format-agnostic)."""
    return BundleSpec(name=name, version=version, profiles=tuple(profiles),
                      artifacts=tuple(artifacts or (
                          ArtifactInput("model.onnx", MODEL, "onnx", "fp32"),
                          ArtifactInput("model.int8.onnx", MODEL[:300], "onnx", "int8",
                                        "x86-avx2"))))


class Repo:
    """Keys, thresholds and a root chain; each :meth:`build` bumps the metadata version."""

    def __init__(self, *, keys: dict[str, int] | None = None,
                 thresholds: dict[str, int] | None = None) -> None:
        counts = {"root": 1, **dict.fromkeys(ONLINE, 1), **(keys or {})}
        self.signers: dict[str, list[Signer]] = {
            role: [CryptoSigner.generate_ed25519() for _ in range(n)]
            for role, n in counts.items()}
        md = make_root({r: [s.public_key for s in ss] for r, ss in self.signers.items()},
                       thresholds=thresholds, expires=NOW + timedelta(days=365))
        self.root_chain = [sign_metadata(md, self.signers["root"])]
        self.metadata_version = 0

    @property
    def root(self) -> bytes:
        """Root v1: what a device pins when provisioned."""
        return self.root_chain[0]

    def rotate(self, role: str, *, count: int = 1,
               signed_by: Sequence[Signer] | None = None) -> None:
        """New key(s) for ``role`` in a new root version, signed by the current root keys
        (or ``signed_by``) and, for a root rotation, by the new root keys too."""
        new: list[Signer] = [CryptoSigner.generate_ed25519() for _ in range(count)]
        md = rotate_root(self.root_chain[-1], role=role, new_keys=[s.public_key for s in new],
                         expires=NOW + timedelta(days=365))
        vouching = list(self.signers["root"] if signed_by is None else signed_by)
        self.root_chain.append(sign_metadata(md, vouching + (new if role == "root" else [])))
        self.signers[role] = new

    def build(self, bundle_spec: BundleSpec | None = None, *, expires: datetime = VALID,
              recipients: Sequence[X25519PublicKey] = ()) -> bytes:
        """A signed bundle with the next metadata version."""
        self.metadata_version += 1
        return build_bundle(bundle_spec or spec(), root_chain=self.root_chain,
                            signers={r: self.signers[r] for r in ONLINE},
                            metadata_version=self.metadata_version, expires=expires,
                            recipients=recipients)


def entries(bundle: bytes) -> dict[str, bytes]:
    """Entry name -> bytes, in archive order."""
    archive = read_archive(bundle)
    return {name: archive.read(name) for name in archive.index}


def rebuild(items: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None,
            ) -> bytes:
    """Frame ``items`` as a bundle with a valid checksum (optionally adding raw tar members)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return frame(buf.getvalue())


def replace(bundle: bytes, name: str, data: bytes) -> bytes:
    """``bundle`` with entry ``name`` replaced, re-framed so only deeper checks can object."""
    return rebuild({**entries(bundle), name: data})


def edit_metadata(data: bytes, change: Callable[[Any], None],
                  signers: Sequence[Signer] | None = None) -> bytes:
    """Apply ``change`` to the signed part; re-sign with ``signers`` or keep old signatures."""
    md: Metadata[Any] = Metadata.from_bytes(data)
    change(md.signed)
    if signers is not None:
        return sign_metadata(md, signers)
    return md.to_bytes(JSONSerializer(compact=True))


def forge_delta(bundle: bytes, path: str, delta: bytes, targets_signers: Sequence[Signer],
                *, carry: bool = True) -> bytes:
    """The delta bundle ``bundle`` with delta ``path`` replaced by ``delta`` and everything
    signed again with the targets keys: what a faulty (or hostile) builder holding the keys
    would produce. Snapshot and timestamp name only the targets version, so they stay.
    With ``carry`` False, ``bundle`` is the release's full bundle: its manifest and targets
    are changed alike, and the delta is not added to it."""
    import hashlib
    import json

    from tuf.api.metadata import TargetFile

    items = entries(bundle)
    manifest = json.loads(items["targets/manifest.json"])
    for art in manifest["artifacts"]:
        for d in art.get("deltas", []):
            if d["path"] == path:
                d["sha256"], d["size"] = hashlib.sha256(delta).hexdigest(), len(delta)
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()

    def change(signed: Any) -> None:
        signed.targets[path] = TargetFile.from_data(path, delta, ["sha256"])
        signed.targets["manifest.json"] = TargetFile.from_data("manifest.json", manifest_bytes,
                                                               ["sha256"])

    items["metadata/targets.json"] = edit_metadata(items["metadata/targets.json"], change,
                                                   targets_signers)
    items["targets/manifest.json"] = manifest_bytes
    if carry:
        items[f"targets/{path}"] = delta
    return rebuild(items)

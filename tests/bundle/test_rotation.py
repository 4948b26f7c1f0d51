"""Key rotation through root: devices walk the chain, and old keys stop being trusted."""

from __future__ import annotations

import pytest
from tuf.api.metadata import Metadata

from bundle.errors import UntrustedSignatureError
from bundle.trust import TrustedState, verify_bundle
from tests.bundle.repo import NOW, Repo, edit_metadata, entries, replace

TS = "metadata/timestamp.json"


def _root_version(data: bytes) -> int:
    return int(Metadata.from_bytes(data).signed.version)


def test_device_walks_root_chain_1_2_3() -> None:
    repo = Repo()
    repo.rotate("root")
    repo.rotate("root")
    verified = verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW)
    assert verified.root_version == 3
    assert _root_version(verified.trusted.root) == 3


def test_root_rotation_with_threshold_2_of_3() -> None:
    repo = Repo(keys={"root": 3}, thresholds={"root": 2})
    repo.rotate("root", count=3, signed_by=repo.signers["root"][:2])
    verified = verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW)
    assert verified.root_version == 2


def test_old_root_key_is_not_trusted_after_rotation() -> None:
    repo = Repo()
    stolen = list(repo.signers["root"])
    repo.rotate("root")
    device = verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW).trusted
    # The thief of the retired root key signs a root v3 of their own.
    repo.rotate("timestamp", signed_by=stolen)
    with pytest.raises(UntrustedSignatureError, match=r"root v3 \(checked against root v2\)"):
        verify_bundle(repo.build(), device, now=NOW)


def test_old_timestamp_key_is_not_trusted_after_rotation() -> None:
    repo = Repo()
    retired = list(repo.signers["timestamp"])
    repo.rotate("timestamp")
    b = repo.build()
    forged = edit_metadata(entries(b)[TS], lambda s: None, retired)
    with pytest.raises(UntrustedSignatureError, match="not trusted for timestamp"):
        verify_bundle(replace(b, TS, forged), TrustedState(root=repo.root), now=NOW)


def test_bundle_built_before_rotation_is_refused_after_it() -> None:
    repo = Repo()
    before = repo.build()
    repo.rotate("timestamp")
    device = verify_bundle(repo.build(), TrustedState(root=repo.root), now=NOW).trusted
    with pytest.raises(UntrustedSignatureError, match="checked against root v2"):
        verify_bundle(before, device, now=NOW)

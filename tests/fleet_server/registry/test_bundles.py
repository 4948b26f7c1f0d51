"""Bundles: records in the database, bytes in the bundle store, versions immutable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fleet_server.errors import RegistryError
from fleet_server.registry import Registry, open_registry
from fleet_server.registry.bundle_store import BundleStore
from tests.fleet_server.registry.helpers import bundle, kinds


def test_put_bundle_is_idempotent_and_content_addressed(reg: Registry, tmp_path: Path) -> None:
    data = b"\x89EFB bundle bytes" * 100
    record = reg.put_bundle(data, "digits", 3)
    sha = hashlib.sha256(data).hexdigest()
    assert (record.sha256, record.name, record.version, record.size) == (sha, "digits", 3,
                                                                         len(data))
    assert record.path == (tmp_path / "blobs" / f"{sha}.efb").resolve()
    assert record.path.read_bytes() == data
    assert reg.put_bundle(data, "digits", 3) == record
    assert reg.get_bundle(sha) == record
    assert reg.get_bundle(sha.upper()) == record
    assert reg.get_bundle("0" * 64) is None
    record.path.unlink()
    assert reg.put_bundle(data, "digits", 3) == record  # a lost blob is written again
    assert record.path.read_bytes() == data
    record.path.write_bytes(b"x" * len(data))
    assert reg.put_bundle(data, "digits", 3) == record  # so is a damaged one
    assert record.path.read_bytes() == data
    assert reg.list_bundles() == [record]
    assert kinds(reg) == ["bundle.stored"]


def test_put_bundle_repairs_the_recorded_blob(reg: Registry, db_url: str,
                                              tmp_path: Path) -> None:
    """A registry opened with another blob_dir still repairs the file the record names."""
    record = reg.put_bundle(b"bytes", "digits", 1)
    record.path.unlink()
    with open_registry(db_url, blob_dir=tmp_path / "elsewhere") as other:
        assert other.put_bundle(b"bytes", "digits", 1) == record
    assert record.path.read_bytes() == b"bytes"
    assert not (tmp_path / "elsewhere").exists()


def test_put_bundle_refuses_clashes(reg: Registry, tmp_path: Path) -> None:
    reg.put_bundle(b"one", "digits", 1)
    with pytest.raises(RegistryError, match=r"digits v1 is already stored as another bundle"):
        reg.put_bundle(b"two", "digits", 1)
    with pytest.raises(RegistryError, match=r"already stored as digits v1, not other v1"):
        reg.put_bundle(b"one", "other", 1)
    with pytest.raises(RegistryError, match="version must be a positive integer"):
        reg.put_bundle(b"three", "digits", 0)
    with pytest.raises(RegistryError, match="invalid bundle name"):
        reg.put_bundle(b"three", " digits", 3)
    # The refused bytes left no file behind.
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [
        f"{hashlib.sha256(b'one').hexdigest()}.efb"]


def test_list_bundles_orders_by_name_and_version(reg: Registry) -> None:
    for name, version in [("vit", 1), ("digits", 2), ("digits", 1)]:
        bundle(reg, name, version)
    assert [(b.name, b.version) for b in reg.list_bundles()] == [
        ("digits", 1), ("digits", 2), ("vit", 1)]
    assert [b.version for b in reg.list_bundles("digits")] == [1, 2]


def test_put_bundle_needs_a_blob_dir(db_url: str) -> None:
    with open_registry(db_url) as reg, pytest.raises(RegistryError,
                                                     match=r"open_registry.*blob_dir=DIR"):
        reg.put_bundle(b"x", "digits", 1)
    assert open_registry(db_url).blob_dir is None


def test_bundle_store_writes_only_what_it_does_not_hold(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "store")
    sha = hashlib.sha256(b"data").hexdigest()
    path = store.path_for(sha)
    assert path == (tmp_path / "store" / f"{sha}.efb").resolve()
    store.save(b"data", sha, path)
    written = path.stat().st_mtime_ns
    store.save(b"data", sha, path)  # intact: left alone
    assert path.stat().st_mtime_ns == written
    path.write_bytes(b"damaged")
    store.save(b"data", sha, path)
    assert path.read_bytes() == b"data"


def test_bundle_store_names_an_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    store = BundleStore(blocker)  # a file where the directory should be
    with pytest.raises(RegistryError, match=r"cannot write the bundle to .*writable"):
        store.save(b"data", "0" * 64, store.path_for("0" * 64))

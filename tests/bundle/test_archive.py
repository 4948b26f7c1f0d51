"""The container: frame checks, entry checks, limits."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from bundle.archive import Limits, frame, read_archive, write_archive
from bundle.errors import ChecksumError, MalformedBundleError, OversizeError, UnsafePathError
from tests.bundle.repo import rebuild

_TAR = write_archive([("targets/x", b"x" * 20000)])[16:-32]


def test_round_trip() -> None:
    data = write_archive([("metadata/a.json", b"{}"), ("targets/x", b"123")])
    archive = read_archive(data)
    assert list(archive.index) == ["metadata/a.json", "targets/x"]
    assert archive.read("targets/x") == b"123"


def test_writer_refuses_unsafe_names() -> None:
    with pytest.raises(UnsafePathError):
        write_archive([("targets/../x", b"")])


@pytest.mark.parametrize(("data", "limits", "error", "fragment"), [
    (b"short", Limits(), MalformedBundleError, "too short"),
    (frame(b"x" * 512)[:-32] + b"\0" * 32, Limits(), ChecksumError, "checksum"),
    (b"\0" * 100, Limits(max_bundle_bytes=50), OversizeError, "over the limit"),
    (frame(b"\0" * 1024).replace(b"\x89EFB", b"\x89EFC"), Limits(), ChecksumError, "checksum"),
    (rebuild({f"targets/{i}": b"" for i in range(5)}), Limits(max_entries=4), OversizeError,
     "more than 4 entries"),
    (rebuild({"other/x": b""}), Limits(), MalformedBundleError, "unexpected entry"),
    (frame(b"not a tar" * 100), Limits(), MalformedBundleError, "unreadable"),
    (frame(_TAR + b"junk" * 200), Limits(), MalformedBundleError, "after its last valid entry"),
    (frame(_TAR[:-12000]), Limits(), MalformedBundleError, "truncated"),
])
def test_bad_containers(data: bytes, limits: Limits, error: type[Exception],
                        fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        read_archive(data, limits)


def test_wrong_magic_with_valid_checksum_is_malformed() -> None:
    good = frame(b"\0" * 1024)
    head = b"NOTABNDL" + good[8:-32]
    with pytest.raises(MalformedBundleError, match="bad magic"):
        read_archive(head + hashlib.sha256(head).digest())


def test_duplicate_and_directory_entries() -> None:
    def add_dir(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("targets/dir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)

    def add_dup(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("targets/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"y"))

    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_archive(rebuild({"targets/x": b"x"}, add_dir))
    with pytest.raises(MalformedBundleError, match="appears twice"):
        read_archive(rebuild({"targets/x": b"x"}, add_dup))

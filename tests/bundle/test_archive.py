"""The container: frame checks, entry checks, limits."""

from __future__ import annotations

import hashlib
import io
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundle.archive import Limits, frame, read_archive, write_archive
from bundle.errors import (
    BundleError,
    ChecksumError,
    MalformedBundleError,
    OversizeError,
    UnsafePathError,
)
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
    (b"\x08\x07\x12\x07pytorch" + b"\0" * 200, Limits(), MalformedBundleError,
     "a model file must be built into one first"),
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
    with pytest.raises(MalformedBundleError, match="not an edgefleet bundle"):
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


def _raw_header(name: str, kind: bytes, size: int,
                fmt: Literal[0, 1, 2] = tarfile.GNU_FORMAT) -> bytes:
    """One tar header block of type ``kind`` announcing ``size`` bytes of data."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(format=fmt)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _chained(kind: bytes, depth: int, then: bytes = b"") -> bytes:
    """``depth`` extension headers of type ``kind``, each with a long name as its data, then
    ``then`` (more tar blocks) and the end-of-archive marker, framed as a bundle."""
    long_name = _padded(b"targets/" + b"n" * 150 + b"\0")
    link = _raw_header("././@LongLink", kind, len(long_name))
    return frame((link + long_name) * depth + then + bytes(1024))


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                                  tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_thousands_of_chained_extension_headers_are_malformed_not_a_crash(kind: bytes) -> None:
    # issue 9 item 1: tarfile follows these chains by recursion (RecursionError, a crash
    # of every reader); here each is refused at the first header, in constant time.
    regular = _raw_header("targets/x", tarfile.REGTYPE, 1) + _padded(b"x")
    with pytest.raises(MalformedBundleError, match="extension header"):
        read_archive(_chained(kind, 4000, regular))


def test_an_archive_read_from_a_file_is_the_same_as_from_bytes(tmp_path: Path) -> None:
    data = write_archive([("metadata/a.json", b"{}"), ("targets/x", b"1" * 3000)])
    path = tmp_path / "b.efb"
    path.write_bytes(data)
    from_file, from_bytes = read_archive(path), read_archive(data)
    assert from_file.index == from_bytes.index
    assert from_file.read("targets/x") == from_bytes.read("targets/x") == b"1" * 3000
    assert b"".join(from_file.blocks("targets/x", block=1000)) == b"1" * 3000
    assert [len(b) for b in from_file.blocks("targets/x", block=1000)] == [1000] * 3


def test_a_file_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.efb"
    with open(path, "wb") as f:
        f.truncate(10_000_000)  # sparse: nothing to read quickly if the reader tried
    with pytest.raises(OversizeError, match="over the limit"):
        read_archive(path, Limits(max_bundle_bytes=1_000_000))


_KINDS = [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
          tarfile.XGLTYPE, tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE,
          tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.GNUTYPE_SPARSE, b"Z"]


@settings(max_examples=120, deadline=timedelta(seconds=2))
@given(st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(1, 3000),
                          st.integers(0, 700), st.sampled_from([tarfile.GNU_FORMAT,
                                                                tarfile.USTAR_FORMAT])),
                min_size=1, max_size=6))
def test_deeply_chained_headers_only_ever_give_a_bundle_error(
        runs: list[tuple[bytes, int, int, Literal[0, 1, 2]]]) -> None:
    # Runs of headers of one kind, thousands deep, each announcing some data: whatever the
    # mix, reading ends with a BundleError (or a valid index) and never recurses.
    payload = b""
    for kind, depth, size, fmt in runs:
        name = "targets/x" if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else "././@LongLink"
        block = _raw_header(name, kind, size, fmt) + _padded(b"n" * size)
        payload += block * depth
    try:
        archive = read_archive(frame(payload + bytes(1024)))
    except BundleError:
        return
    assert list(archive.index) == ["targets/x"]  # one regular entry, once

"""The single-file container: a checksummed frame around an uncompressed ustar archive.

Layout (docs/bundle-format.md has the byte-level description)::

    magic (8 bytes) | payload length (u64, big endian) | payload (tar) | sha256 of all before

Reading is bounded and happens in this order: the total size against :class:`Limits`, the
trailing checksum over every other byte, the framing, then the tar headers one by one (type,
name and size checked before any entry data is touched). Entries are exposed as slices of
the payload; nothing is extracted to disk, so there is nothing to escape from, and the name
checks exist to reject bundles that would be dangerous for any other reader.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import ChecksumError, MalformedBundleError, OversizeError, UnsafePathError

__all__ = ["MAGIC", "Archive", "Limits", "frame", "read_archive", "write_archive"]

#: First bytes of every bundle. The high byte and CR LF catch 7-bit and text-mode transfers.
MAGIC = b"\x89EFB\r\n\x1a\n"
_HEADER = struct.Struct(">8sQ")
_DIGEST_LEN = 32
#: End-of-archive blocks plus padding to tar's 10240-byte record, with room to spare.
_MAX_TRAILER = 2 * tarfile.RECORDSIZE
#: Every entry lives under one of these directories.
_TOP_LEVEL = ("metadata", "targets")


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied before reading; each protects memory and time on a device."""

    max_bundle_bytes: int = 512 * 1024 * 1024
    max_entries: int = 256
    max_name_length: int = 200


@dataclass(frozen=True)
class Archive:
    """A parsed container: entry names mapped to ``(offset, size)`` in the file ``data``."""

    data: bytes
    index: Mapping[str, tuple[int, int]]

    def size(self, name: str) -> int:
        """Size of entry ``name`` from its header; ``KeyError`` if absent."""
        return self.index[name][1]

    def read(self, name: str) -> bytes:
        """The bytes of entry ``name``; ``KeyError`` if absent."""
        offset, size = self.index[name]
        return self.data[offset:offset + size]


def write_archive(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """Frame ``(name, data)`` pairs as a bundle file (deterministic: fixed mtime, owner)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            _check_name(name, Limits().max_name_length)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return frame(buf.getvalue())


def frame(payload: bytes) -> bytes:
    """Wrap an already built tar ``payload`` in the bundle frame (magic, length, checksum)."""
    head = _HEADER.pack(MAGIC, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def read_archive(data: bytes, limits: Limits | None = None) -> Archive:
    """Check the frame of ``data`` and index its entries; raise a ``BundleError`` if unsafe."""
    limits = limits or Limits()
    if len(data) > limits.max_bundle_bytes:
        raise OversizeError(f"bundle is {len(data)} bytes, over the limit of "
                            f"{limits.max_bundle_bytes}; refusing to read it")
    if len(data) < _HEADER.size + _DIGEST_LEN:
        raise MalformedBundleError(f"file is {len(data)} bytes, too short to be a bundle")
    # The checksum comes first so that any corruption, even of the framing, reads as such.
    # memoryview: hash and parse in place, a bundle may be most of a device's free memory.
    if hashlib.sha256(memoryview(data)[:-_DIGEST_LEN]).digest() != data[-_DIGEST_LEN:]:
        raise ChecksumError("bundle checksum mismatch: the file was corrupted or modified "
                            "after it was built; fetch it again from the fleet server")
    magic, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedBundleError("not an edgefleet bundle (bad magic bytes)")
    if length != len(data) - _HEADER.size - _DIGEST_LEN:
        raise MalformedBundleError(f"payload length field says {length} bytes but the file "
                                   f"holds {len(data) - _HEADER.size - _DIGEST_LEN}")
    return Archive(data=data, index=_index(data, limits))


def _index(data: bytes, limits: Limits) -> dict[str, tuple[int, int]]:
    """Entry offsets, absolute in ``data``. tarfile starts at the payload (offset 16) and
    stops at the end-of-archive blocks; a header running into the trailing checksum is
    truncated, which ends the walk, and data running into it fails the bounds check."""
    index: dict[str, tuple[int, int]] = {}
    payload_end = len(data) - _DIGEST_LEN
    fileobj = io.BytesIO(data)  # shares the bytes object's buffer until written to
    fileobj.seek(_HEADER.size)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            while (member := tar.next()) is not None:
                if len(index) >= limits.max_entries:
                    raise OversizeError(f"bundle has more than {limits.max_entries} entries")
                _check_member(member, limits)
                if member.name in index:
                    raise MalformedBundleError(f"entry {member.name!r} appears twice")
                if member.offset_data + member.size > payload_end:
                    raise MalformedBundleError(f"entry {member.name!r} is truncated")
                index[member.name] = (member.offset_data, member.size)
            end_of_entries = tar.offset
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError) as exc:
        raise MalformedBundleError(f"bundle archive is unreadable ({exc})") from exc
    # tarfile quietly stops at the first header it cannot parse; only the end-of-archive
    # zero blocks and record padding may follow the last entry.
    rest = memoryview(data)[end_of_entries:payload_end]
    if len(rest) > _MAX_TRAILER or rest != bytes(len(rest)):
        raise MalformedBundleError(f"bundle archive is unreadable: {len(rest)} bytes after "
                                   f"its last valid entry ({len(index)} entries) are not the "
                                   "end-of-archive marker")
    return index


def _check_member(member: tarfile.TarInfo, limits: Limits) -> None:
    _check_name(member.name, limits.max_name_length)
    if member.islnk() or member.issym():
        raise UnsafePathError(f"entry {member.name!r} is a link; bundles hold regular files "
                              "only, so this one was crafted: discard it")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise UnsafePathError(f"entry {member.name!r} is not a regular file "
                              f"(tar type {member.type!r}); discard the bundle")
    if member.size > limits.max_bundle_bytes:
        raise OversizeError(f"entry {member.name!r} claims {member.size} bytes")


def _check_name(name: str, max_length: int) -> None:
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or ":" in name or "\x00" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise UnsafePathError(f"entry name {name!r} is absolute or has an empty, '.' or '..' "
                              "component (path traversal); discard the bundle")
    if len(name) > max_length or not name.isascii() or not name.isprintable():
        raise UnsafePathError(f"entry name {name!r} is too long or not printable ASCII")
    if len(parts) < 2 or parts[0] not in _TOP_LEVEL:
        raise MalformedBundleError(f"unexpected entry {name!r}: entries live under "
                                   f"{' or '.join(_TOP_LEVEL)}/")

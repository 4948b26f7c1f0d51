"""The single-file container: a checksummed frame around an uncompressed ustar archive.

Layout (docs/bundle-format.md has the byte-level description)::

    magic (8 bytes) | payload length (u64, big endian) | payload (tar) | sha256 of all before

Reading is bounded and happens in this order: the total size against :class:`Limits`, the
trailing checksum over every other byte, the framing, then the tar headers one by one (type,
name and size checked before any entry data is touched). A bundle may be bytes in memory or
a file: from a file every pass reads bounded blocks, so a bundle larger than the device's
memory verifies in a few megabytes. Entries are exposed as slices of the payload; nothing is
extracted to disk, so there is nothing to escape from, and the name checks exist to reject
bundles that would be dangerous for any other reader.

The tar headers are walked here rather than by :mod:`tarfile`: bundles are plain ustar
(:func:`write_archive`), and tarfile follows chains of GNU long-name and pax extension
headers by recursion, so a few thousand chained headers (a 3 MB file) raise RecursionError.
This walker is a loop that accepts only ustar regular-file headers, refuses every extension
header by its type, and checks each header's checksum, so no input can make it recurse, run
long or allocate more than one block.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumError, MalformedBundleError, OversizeError, UnsafePathError

__all__ = ["MAGIC", "Archive", "Limits", "frame", "read_archive", "write_archive"]

#: First bytes of every bundle. The high byte and CR LF catch 7-bit and text-mode transfers.
MAGIC = b"\x89EFB\r\n\x1a\n"
_HEADER = struct.Struct(">8sQ")
_DIGEST_LEN = 32
_BLOCK = 512
#: End-of-archive blocks plus padding to tar's 10240-byte record, with room to spare.
_MAX_TRAILER = 2 * tarfile.RECORDSIZE
#: Every entry lives under one of these directories.
_TOP_LEVEL = ("metadata", "targets")
#: How much of a file one read takes: bounds the reader's memory, whatever the bundle's size.
READ_BLOCK = 1 << 20
_REGULAR = (b"0", b"\0")
_LINKS = (b"1", b"2")
#: pax (x, g), GNU long name/link (L, K) and other extension headers: never in a bundle.
_EXTENSIONS = (b"x", b"g", b"L", b"K", b"X", b"N", b"V", b"M", b"S")


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied before reading; each protects memory and time on a device."""

    max_bundle_bytes: int = 512 * 1024 * 1024
    max_entries: int = 256
    max_name_length: int = 200


@dataclass(frozen=True)
class Archive:
    """A parsed container: entry names mapped to ``(offset, size)`` in the bundle, which is
    ``data`` in memory or the file at ``path`` (read again on each access, never whole)."""

    data: bytes | None
    index: Mapping[str, tuple[int, int]]
    path: Path | None = None

    def size(self, name: str) -> int:
        """Size of entry ``name`` from its header; ``KeyError`` if absent."""
        return self.index[name][1]

    def read(self, name: str) -> bytes:
        """The bytes of entry ``name``; ``KeyError`` if absent. For small entries (metadata,
        the manifest): artifacts are read with :meth:`blocks`."""
        return b"".join(self.blocks(name))

    def blocks(self, name: str, block: int = READ_BLOCK) -> Iterator[bytes]:
        """The bytes of entry ``name`` in pieces of at most ``block``; ``KeyError`` if
        absent. A file that shrank since it was indexed raises MalformedBundleError."""
        offset, size = self.index[name]
        if self.data is not None:
            view = memoryview(self.data)
            for start in range(offset, offset + size, block):
                yield bytes(view[start:min(start + block, offset + size)])
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(offset)
            left = size
            while left:
                piece = f.read(min(block, left))
                if not piece:
                    raise MalformedBundleError(f"entry {name!r} is truncated: the bundle file "
                                               f"{self.path} shrank while it was read")
                left -= len(piece)
                yield piece


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


def read_archive(source: bytes | Path, limits: Limits | None = None) -> Archive:
    """Check the frame of ``source`` (bytes, or a bundle file read in bounded blocks) and
    index its entries; raise a ``BundleError`` if unsafe. A file that cannot be read raises
    OSError: that is the caller's I/O, not the bundle's fault."""
    limits = limits or Limits()
    if isinstance(source, Path):
        with open(source, "rb") as f:
            reader = _FileReader(f, os.fstat(f.fileno()).st_size)
            index = _read(reader, limits)
        return Archive(data=None, index=index, path=source)
    return Archive(data=source, index=_read(_BytesReader(source), limits))


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.size = len(data)
        self._view = memoryview(data)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._view[offset:offset + length])

    def hash_prefix(self, end: int) -> bytes:
        # memoryview: hash in place, a bundle may be most of a device's free memory.
        return hashlib.sha256(self._view[:end]).digest()


class _FileReader:
    def __init__(self, f: io.BufferedReader, size: int) -> None:
        self.size = size
        self._f = f

    def pread(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(length)

    def hash_prefix(self, end: int) -> bytes:
        digest = hashlib.sha256()
        self._f.seek(0)
        left = end
        while left:
            block = self._f.read(min(READ_BLOCK, left))
            if not block:
                raise MalformedBundleError("the bundle file shrank while it was read")
            digest.update(block)
            left -= len(block)
        return digest.digest()


def _read(reader: _BytesReader | _FileReader, limits: Limits) -> dict[str, tuple[int, int]]:
    size = reader.size
    if size > limits.max_bundle_bytes:
        raise OversizeError(f"bundle is {size} bytes, over the limit of "
                            f"{limits.max_bundle_bytes}; refusing to read it")
    if size < _HEADER.size + _DIGEST_LEN:
        raise MalformedBundleError(f"file is {size} bytes, too short to be a bundle")
    magic, length = _HEADER.unpack(reader.pread(0, _HEADER.size))
    # A file of another kind (a model given where a bundle is due) is told apart from a
    # damaged bundle by its first bytes (a damaged bundle still has most of the magic); then
    # the checksum comes before anything else, so that any corruption, even of the framing
    # or of a magic byte, reads as such.
    if sum(a == b for a, b in zip(magic, MAGIC, strict=True)) < len(MAGIC) // 2:
        raise MalformedBundleError(
            "not an edgefleet bundle (it does not start with the bundle magic): give a .efb "
            "file made by `fleet bundle build` (a model file must be built into one first)")
    if reader.hash_prefix(size - _DIGEST_LEN) != reader.pread(size - _DIGEST_LEN, _DIGEST_LEN):
        raise ChecksumError("bundle checksum mismatch: the file was corrupted or modified "
                            "after it was built; fetch it again from the fleet server")
    if magic != MAGIC:
        raise MalformedBundleError("not an edgefleet bundle (bad magic bytes)")
    if length != size - _HEADER.size - _DIGEST_LEN:
        raise MalformedBundleError(f"payload length field says {length} bytes but the file "
                                   f"holds {size - _HEADER.size - _DIGEST_LEN}")
    return _index(reader, size - _DIGEST_LEN, limits)


def _index(reader: _BytesReader | _FileReader, payload_end: int,
           limits: Limits) -> dict[str, tuple[int, int]]:
    """Entry offsets, absolute in the file: one ustar header after another from the payload
    (offset 16) to the end-of-archive zero block, each checked before its data is used."""
    index: dict[str, tuple[int, int]] = {}
    offset = _HEADER.size
    while True:
        block = reader.pread(offset, _BLOCK) if offset + _BLOCK <= payload_end else b""
        if len(block) < _BLOCK:
            if not index and offset == _HEADER.size:
                raise MalformedBundleError("bundle archive is unreadable (no tar header)")
            raise MalformedBundleError(f"bundle archive is truncated: it ends inside or "
                                       f"before the header after {len(index)} entries")
        if block == bytes(_BLOCK):
            break  # the end-of-archive marker
        try:
            name, size = _header(block, limits)
        except _NotAHeader as exc:
            if index:
                # Whatever follows the last good entry is not a header: say so plainly.
                raise MalformedBundleError(
                    f"bundle archive is unreadable: {payload_end - offset} bytes after its "
                    f"last valid entry ({len(index)} entries) are not the end-of-archive "
                    f"marker ({exc})") from None
            raise MalformedBundleError(f"bundle archive is unreadable ({exc})") from None
        if len(index) >= limits.max_entries:
            raise OversizeError(f"bundle has more than {limits.max_entries} entries")
        if name in index:
            raise MalformedBundleError(f"entry {name!r} appears twice")
        data_at = offset + _BLOCK
        if data_at + size > payload_end:
            raise MalformedBundleError(f"entry {name!r} is truncated")
        index[name] = (data_at, size)
        offset = data_at + -(-size // _BLOCK) * _BLOCK
    # Only the end-of-archive zero blocks and record padding may follow the last entry.
    rest_len = payload_end - offset
    rest = reader.pread(offset, min(rest_len, _MAX_TRAILER + 1))
    if rest_len > _MAX_TRAILER or rest != bytes(len(rest)):
        raise MalformedBundleError(f"bundle archive is unreadable: {rest_len} bytes after "
                                   f"its last valid entry ({len(index)} entries) are not the "
                                   "end-of-archive marker")
    return index


def _header(block: bytes, limits: Limits) -> tuple[str, int]:
    """Name and data size from one ustar header block; raises a BundleError if the header
    is damaged, is not plain ustar, or describes anything but a regular file."""
    try:
        stored = _octal(block[148:156], "checksum")
    except MalformedBundleError as exc:
        raise _NotAHeader(str(exc)) from None
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    if stored != computed:
        raise _NotAHeader(f"tar header checksum {stored} != {computed}")
    if block[257:265] not in (b"ustar\x0000", b"ustar  \x00"):
        raise _NotAHeader("not a ustar header")
    kind = block[156:157]
    if kind in _EXTENSIONS:
        raise MalformedBundleError(f"bundle archive has a tar extension header (type "
                                   f"{kind.decode('latin-1')!r}, pax or GNU long name); "
                                   "bundles are plain ustar: rebuild it with fleet bundle build")
    name = _text(block[0:100])
    prefix = _text(block[345:500])
    if prefix:
        name = f"{prefix}/{name}"
    if kind not in _REGULAR:
        name = name.rstrip("/")  # tar writes directory names with a trailing slash
    _check_name(name, limits.max_name_length)
    if kind in _LINKS:
        raise UnsafePathError(f"entry {name!r} is a link; bundles hold regular files "
                              "only, so this one was crafted: discard it")
    if kind not in _REGULAR:
        raise UnsafePathError(f"entry {name!r} is not a regular file "
                              f"(tar type {kind.decode('latin-1')!r}); discard the bundle")
    size = _octal(block[124:136], f"size of {name!r}")
    if size > limits.max_bundle_bytes:
        raise OversizeError(f"entry {name!r} claims {size} bytes")
    return name, size


class _NotAHeader(Exception):
    """A block that is no tar header at all (damaged, or not tar)."""


def _octal(field: bytes, what: str) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise MalformedBundleError(f"bundle archive is unreadable (tar header {what} is not "
                                   "an octal number)")
    return int(digits, 8)


def _text(field: bytes) -> str:
    raw = field.split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise UnsafePathError(f"entry name {raw!r} is not printable ASCII") from None


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

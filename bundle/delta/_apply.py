"""Applying a delta (device side): the target rebuilt op by op, streaming, in bounded memory.

No model parser: base ranges are read by offset, the target is written and hashed as it
is produced. What is held at once, besides one delta block:

- ``copy``, ``sparse`` and the base check: one block of at most :data:`STREAM_BLOCK`;
- ``zstd``: the op's bytes; ``xor``/``sub``: the op's bytes and its decompressed change
  (the base range is read into the output buffer and changed in place, plane by plane);
- ``zdict``: the base range as dictionary and the op's bytes;
- the skeleton (when there is one): its bytes and its dictionary, for the whole apply.

So the peak is about twice the largest tensor (plus the skeleton), with no fixed cost
that matters on a 150 KB model: blocks are 64 KiB, and one zstd context (under 100 KiB)
serves every frame without a dictionary.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol

import numpy as np
import zstandard

from bundle.errors import DeltaBaseError, RebuildMismatchError

from ._header import MAX_SPARSE, DeltaHeader, DeltaOp, Reader, bad, check_declared_size, read_header

#: Bytes a streaming op (and the base check) holds at once. Small enough to vanish beside
#: a 150 KB artifact, large enough that the per-block Python cost does not show on 100 MB.
STREAM_BLOCK = 64 * 1024


class BaseFile(Protocol):
    """The stored base artifact, read by ranges (an open file, or BytesIO in tests)."""

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def readinto(self, buffer: bytearray | memoryview, /) -> int: ...


#: A ``zdict`` op longer than this (in practice the whole-file fallback) is handed on in
#: blocks rather than as one piece.
_STREAM_ZDICT_FROM = 1024 * 1024

#: Changes of a ``sparse`` op decoded at once (about 40 KB of index arrays).
_SPARSE_BATCH = 512
_NONE = np.zeros(0, np.int64)

Chunk = bytes | bytearray | memoryview


def apply_delta(delta: Iterable[bytes], delta_size: int, base: BaseFile, out: BinaryIO, *,
                base_sha256: str, target_sha256: str, target_size: int) -> None:
    """Rebuild the target artifact from ``base`` into ``out``, streaming: ``delta`` is the
    delta's bytes (``delta_size`` of them) in blocks of any size, read as the ops need them.

    ``base_sha256`` is the artifact the delta was made against, ``target_sha256`` and
    ``target_size`` the full artifact's, all from the signed manifest: ``base`` must hash
    to the first and the bytes written to the second. Raises DeltaBaseError when
    ``base`` is not the artifact the delta was made against (missing or damaged: install
    the full bundle instead), RebuildMismatchError when the rebuilt bytes differ from the
    signed artifact (``out`` then holds bytes to discard), MalformedBundleError for a delta
    that does not parse.
    """
    stream = _Blocks(delta)
    # One context for every frame without a dictionary: a fresh one per frame would pay
    # its allocation again for each tensor.
    plain = zstandard.ZstdDecompressor()
    header = read_header(stream, delta_size, decompressor=plain)
    if header.target_size != target_size:
        raise RebuildMismatchError(
            f"the delta rebuilds {header.target_size} bytes, not the signed artifact's "
            f"{target_size}; the delta does not belong to this release: install the full "
            "bundle")
    _check_base(base, header.base_size, base_sha256)
    digest = hashlib.sha256()
    written = 0
    for block in _Rebuild(header, stream, base, plain).blocks():
        digest.update(block)
        out.write(block)
        written += len(block)
    if written != target_size or digest.hexdigest() != target_sha256:
        raise RebuildMismatchError(
            f"the artifact rebuilt from the delta hashes to {digest.hexdigest()[:16]} "
            f"({written} bytes), not the signed {target_sha256[:16]} ({target_size} bytes); "
            "the delta was made wrongly or tampered with before signing: install the full "
            "bundle")


class _Blocks:
    """``read(n)`` over an iterable of blocks, holding the current block and no copy of it
    (the agent's blocks are 1 MiB: a buffer they are appended to would hold two)."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        self._blocks = iter(blocks)
        self._block = memoryview(b"")

    def read(self, n: int) -> bytes:
        if n <= len(self._block):  # the usual case: within the current block
            data = bytes(self._block[:n])
            self._block = self._block[n:]
            return data
        out = bytearray()
        while len(out) < n:
            if not self._block:
                self._block = memoryview(b"")  # let the spent block go before the next
                self._block = memoryview(next(self._blocks, b""))
                if not self._block:
                    break
            k = min(n - len(out), len(self._block))
            out += self._block[:k]
            self._block = self._block[k:]
        return bytes(out)


def _check_base(base: BaseFile, base_size: int, base_sha256: str) -> None:
    digest = hashlib.sha256()
    size = 0
    block = bytearray(STREAM_BLOCK)
    base.seek(0)
    with memoryview(block) as view:
        while n := base.readinto(view):
            digest.update(view[:n])
            size += n
    if (size, digest.hexdigest()) != (base_size, base_sha256):
        raise DeltaBaseError(
            f"the stored artifact this delta builds on is damaged or another version "
            f"({size} bytes, sha256 {digest.hexdigest()[:16]}; the delta needs "
            f"{base_size} bytes, {base_sha256[:16]}); install the full bundle")


class _Rebuild:
    """The target's bytes, op by op; each block must be used before the next is asked for
    (streaming ops reuse one buffer)."""

    def __init__(self, header: DeltaHeader, delta: Reader, base: BaseFile,
                 plain: zstandard.ZstdDecompressor) -> None:
        self._header, self._delta, self._base, self._plain = header, delta, base, plain

    def blocks(self) -> Iterator[Chunk]:
        skeleton = self._skeleton()
        for op in self._header.ops:
            if op.op == "copy":
                yield from _base_blocks(self._base, op.base_offset, op.length)
            elif op.op == "skel":
                yield _read_exact(skeleton, op.length, "skeleton")
            elif op.op == "sparse":
                yield from self._sparse(op)
            elif op.op == "zstd":
                yield self._decompress(self._payload(op), op.length)
            elif op.op == "zdict" and op.length > _STREAM_ZDICT_FROM:
                yield from self._stream_zdict(op)
            elif op.op == "zdict":
                yield self._zdict(op)
            else:
                yield self._xor_or_sub(op)

    def _payload(self, op: DeltaOp) -> bytes:
        return _read_exact(self._delta, op.payload, "payload")

    def _skeleton(self) -> BinaryIO:
        h = self._header
        if not h.skeleton:
            return io.BytesIO(b"")
        packed = _read_exact(self._delta, h.skeleton, "skeleton")
        decompressor = _with_dictionary(self._read_ranges(h.skeleton_dict), h.skeleton_size)
        return io.BytesIO(self._decompress(packed, h.skeleton_size, decompressor))

    def _zdict(self, op: DeltaOp) -> bytes:
        payload = self._payload(op)
        decompressor = _with_dictionary(self._read_ranges([(op.base_offset, op.base_length)]),
                                        op.length)
        return self._decompress(payload, op.length, decompressor)

    def _stream_zdict(self, op: DeltaOp) -> Iterator[bytes]:
        """A large ``zdict`` op (the whole-file fallback), decompressed block by block."""
        payload = io.BytesIO(self._payload(op))
        decompressor = _with_dictionary(self._read_ranges([(op.base_offset, op.base_length)]),
                                        op.length)
        reader = decompressor.stream_reader(payload)
        try:
            yield from _chunks(reader.read, op.length, bad("a payload ends early"))
        except zstandard.ZstdError as exc:
            raise bad(f"a payload does not decompress ({exc})") from exc

    def _xor_or_sub(self, op: DeltaOp) -> bytearray:
        """The base range with the decompressed change applied, plane by plane, in place:
        the range and the change are all that is held."""
        change = np.frombuffer(self._decompress(self._payload(op), op.length), np.uint8)
        rebuilt = self._read_ranges([(op.base_offset, op.base_length)])
        elements = np.frombuffer(rebuilt, np.uint8).reshape(-1, op.width)
        for k, plane in enumerate(change.reshape(op.width, -1)):
            if op.op == "xor":
                elements[:, k] ^= plane
            else:
                elements[:, k] += plane
        return rebuilt

    def _sparse(self, op: DeltaOp) -> Iterator[memoryview]:
        """The base range with the listed bytes changed, block by block."""
        batches = _sparse_changes(op, self._payload(op), self._plain)
        positions, values = next(batches, (_NONE, _NONE))
        done = 0
        for block in _base_blocks(self._base, op.base_offset, op.length):
            view, end = np.frombuffer(block, np.uint8), done + len(block)
            while len(positions) and positions[0] < end:
                k = int(np.searchsorted(positions, end))
                view[positions[:k] - done] ^= values[:k]
                positions, values = positions[k:], values[k:]
                if not len(positions):
                    positions, values = next(batches, (_NONE, _NONE))
            done = end
            yield block

    def _read_ranges(self, ranges: Iterable[tuple[int, int]]) -> bytearray:
        """The base ranges, concatenated into one buffer (no copy of each, then a join)."""
        spans = list(ranges)
        data = bytearray(sum(n for _, n in spans))
        at = 0
        with memoryview(data) as view:
            for offset, length in spans:
                self._base.seek(offset)
                got = self._base.readinto(view[at:at + length])
                if got != length:
                    raise _base_changed()
                at += length
        return data

    def _decompress(self, payload: bytes, size: int,
                    decompressor: zstandard.ZstdDecompressor | None = None) -> bytes:
        check_declared_size(payload, size, "a payload")
        try:
            data = (decompressor or self._plain).decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise bad(f"a payload does not decompress ({exc})") from exc
        if len(data) != size:
            raise bad(f"a payload decompresses to {len(data)} bytes, not {size}")
        return data


def _with_dictionary(dictionary: bytearray, size: int) -> zstandard.ZstdDecompressor:
    """A context with ``dictionary`` (a base range: zstd's patch-from) whose window may
    reach over it and ``size`` bytes of output, and no further."""
    # The dictionary object keeps a copy: the caller's buffer is dropped on return.
    zdict = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if dictionary else None)
    window = 1 << max(10, min(31, (size + len(dictionary)).bit_length()))
    return zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=window)


def _sparse_changes(op: DeltaOp, payload: bytes, decompressor: zstandard.ZstdDecompressor,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, XOR values) of a ``sparse`` payload, in increasing order, a batch of at
    most :data:`_SPARSE_BATCH` at a time: the payload is u32 count, each changed byte's gap
    from the previous one as a varint, then the changed bytes XOR the base's, in zstd.

    The payload's layout (count, varints filling the space before the values) is checked
    before the first batch; a gap too large or a position past the op, in its batch."""
    limit = 4 + 6 * min(op.length, MAX_SPARSE)
    check_declared_size(payload, limit, "a payload")
    try:
        data = decompressor.decompress(payload, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise bad(f"a payload does not decompress ({exc})") from exc
    if len(data) < 4:
        raise bad("a sparse payload is too short")
    (count,) = struct.unpack_from(">I", data)
    raw = np.frombuffer(data, np.uint8, offset=4)
    varints, values = raw[:max(0, len(raw) - count)], raw[len(raw) - count:]
    # Exactly ``count`` varints end in the space before the values, the last at its end.
    if count > MAX_SPARSE or len(values) != count or np.count_nonzero(varints < 0x80) != count \
            or (count and varints[-1] >= 0x80):
        raise bad("a sparse payload does not add up")
    at, done, last = 0, 0, -1
    while done < count:
        n = min(_SPARSE_BATCH, count - done)
        ends = np.flatnonzero(varints[at:at + 6 * n] < 0x80)[:n]
        starts = np.concatenate([[0], ends[:-1] + 1])
        lengths = ends - starts + 1
        if len(ends) < n or lengths.max() > 6:  # over 6 bytes is over 35 bits
            raise bad("a sparse payload has an oversized gap")
        shift = (np.arange(ends[-1] + 1) - np.repeat(starts, lengths)) * 7
        digits = (varints[at:at + ends[-1] + 1] & 0x7F).astype(np.int64) << shift
        positions = last + np.cumsum(np.add.reduceat(digits, starts) + 1)
        if positions[-1] >= op.length:
            raise bad("a sparse payload changes bytes past its op")
        yield positions, values[done:done + n]
        at, done, last = at + int(ends[-1]) + 1, done + n, int(positions[-1])


def _base_blocks(base: BaseFile, offset: int, length: int) -> Iterator[memoryview]:
    """``length`` bytes of the base from ``offset``, in blocks of STREAM_BLOCK read into one
    buffer: each block is valid until the next is asked for."""
    base.seek(offset)
    buffer = memoryview(bytearray(min(STREAM_BLOCK, length)))
    while length:
        block = buffer[:min(len(buffer), length)]
        if base.readinto(block) != len(block):
            raise _base_changed()
        length -= len(block)
        yield block


def _base_changed() -> DeltaBaseError:
    return DeltaBaseError("the stored base artifact changed while the delta was applied; "
                          "install the full bundle")


def _chunks(read: Callable[[int], bytes], length: int, short: Exception) -> Iterator[bytes]:
    """``length`` bytes from ``read`` in blocks of at most STREAM_BLOCK; ``short`` if they
    end."""
    while length:
        block = read(min(STREAM_BLOCK, length))
        if not block:
            raise short
        length -= len(block)
        yield block


def _read_exact(stream: Reader | BinaryIO, length: int, what: str) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise bad(f"its {what} ends early")
    return data

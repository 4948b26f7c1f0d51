"""Weight-level deltas: an artifact rebuilt from the previous version and what changed.

The server makes a delta (:func:`make_delta`) from two versions of one artifact; the device
rebuilds the new artifact from its stored old one (:func:`apply_delta`) and checks the
result against the full artifact's sha256 in the signed manifest. The format is laid out in
docs/bundle-format.md §8; in short::

    b"EFDELTA1" | u32 n | header: n bytes, zstd of canonical JSON | payloads, in op order

The header gives the base's and the target's sizes and lists *ops*, each producing the
next ``length`` bytes of the target (their sha256 are in the signed manifest, not here):

- ``copy``: the bytes at ``base_offset`` of the base, unchanged (an untouched tensor);
- ``skel``: the next bytes of the *skeleton*, everything of the target that is not a large
  tensor (graph, names, headers, small tensors), compressed once with zstd using the
  base's skeleton as dictionary: unchanged structure costs almost nothing;
- ``zstd``: a payload that zstd-decompresses to the bytes (a new tensor);
- ``zdict``: the same with the base range ``base_offset``/``base_length`` as dictionary
  (zstd's patch-from for one tensor, or for the whole file as the last resort);
- ``xor`` and ``sub``: the target's bytes are the base range's XOR (or byte-wise sum) with
  the decompressed payload, stored as ``width`` byte planes (byte 0 of every element, then
  byte 1, ...). A fine-tuned float keeps its sign, exponent and high mantissa bits, so the
  XOR's high planes are almost all zero; a re-quantized int8 moves by one step, so the
  byte-wise difference is almost all 0 and +-1.

:func:`make_delta` pairs tensors by name (:mod:`bundle.tensor_index`) and, per tensor,
keeps the smallest encoding; when a zstd patch-from of the whole file is smaller than the
sum (a file whose format it does not know), that single ``zdict`` op is the delta.
Applying needs no model parser: it streams op by op, reading base ranges by offset and
writing and hashing the target as it goes, so memory is a few times the largest tensor
(the whole base only for a whole-file ``zdict``), never the two whole files.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np
import zstandard

from .errors import DeltaBaseError, MalformedBundleError, RebuildMismatchError
from .manifest import canonical_json
from .tensor_index import TensorSpan, tensor_index

__all__ = ["MAGIC", "DeltaHeader", "DeltaOp", "apply_delta", "make_delta", "read_header"]

MAGIC = b"EFDELTA1"
_LENGTH = struct.Struct(">I")
#: Header bytes a reader accepts (a 1,000-tensor model's header is about 100 KB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_OPS = 200_000
#: Tensors smaller than this go to the skeleton: a frame and an op each would cost more.
SMALL_TENSOR_BYTES = 2048
_LEVEL = 19
_BLOCK = 1024 * 1024
_OPS = {"copy", "skel", "zstd", "zdict", "xor", "sub", "sparse"}
#: A sparse op lists at most this many changed bytes (it is for a few scattered changes).
MAX_SPARSE = 1_000_000
_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class DeltaOp:
    """One step of the rebuild: the next ``length`` bytes of the target (module docstring)."""

    op: str
    length: int
    base_offset: int = 0
    base_length: int = 0
    width: int = 1
    payload: int = 0  # bytes of payload this op consumes


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta rebuilds from and into, and how."""

    base_size: int
    target_size: int
    skeleton: int  # payload bytes of the compressed skeleton (first payload)
    skeleton_size: int  # bytes the skeleton decompresses to
    skeleton_dict: tuple[tuple[int, int], ...]  # base ranges that form its dictionary
    ops: tuple[DeltaOp, ...]


# --- making ---------------------------------------------------------------------------------

def make_delta(base: bytes, target: bytes, fmt: str) -> bytes:
    """The delta that rebuilds ``target`` from ``base``, two versions of an artifact of
    format ``fmt`` (``onnx``, ``tflite``; any other is diffed as opaque bytes)."""
    base_spans = {s.name: s for s in tensor_index(base, fmt)}
    target_spans = [s for s in tensor_index(target, fmt) if s.length >= SMALL_TENSOR_BYTES]
    base_gaps = _gaps(len(base), [s for s in base_spans.values()
                                  if s.length >= SMALL_TENSOR_BYTES])
    steps: list[tuple[DeltaOp, int, bytes]] = []  # (op, where in the target, payload)
    pos = 0
    for span in [*target_spans, TensorSpan("", len(target), 0)]:
        if span.offset > pos:
            steps.append((DeltaOp("skel", span.offset - pos), pos, b""))
        if span.length:
            op, payload = _encode_tensor(base, target, span, base_spans.get(span.name))
            steps.append((op, span.offset, payload))
        pos = span.offset + span.length
    steps = _merge_copies(steps, base, target)
    ops = [op for op, _, _ in steps]
    payloads = [payload for _, _, payload in steps]
    skeleton = b"".join(target[at:at + op.length] for op, at, _ in steps if op.op == "skel")
    skeleton_dict = b"".join(base[o:o + n] for o, n in base_gaps)
    packed_skeleton = _compress(skeleton, skeleton_dict) if skeleton else b""
    header = DeltaHeader(
        base_size=len(base), target_size=len(target), skeleton=len(packed_skeleton),
        skeleton_size=len(skeleton),
        skeleton_dict=tuple(base_gaps) if skeleton else (), ops=tuple(ops))
    tensor_wise = _pack(header, [packed_skeleton, *payloads])
    candidates = [tensor_wise]
    # One op over the whole file: zstd's patch-from, or the few bytes that changed.
    for kind, whole in (("zdict", _compress(target, base)), ("sparse", _sparse(base, target))):
        if whole is not None:
            candidates.append(_pack(DeltaHeader(len(base), len(target), 0, 0, (), (DeltaOp(
                kind, len(target), 0, len(base), payload=len(whole)),)), [whole]))
    return min(candidates, key=len)


def _sparse(base: bytes, target: bytes) -> bytes | None:
    """The ``sparse`` payload for ``target`` against a base of the same size (None when the
    sizes differ or too many bytes changed): u32 count, then each changed byte's gap from
    the previous one as a varint, then the changed bytes XOR the base's, zstd-compressed."""
    if len(base) != len(target):
        return None
    a, b = np.frombuffer(base, np.uint8), np.frombuffer(target, np.uint8)
    changed = np.flatnonzero(a != b)
    if len(changed) > MAX_SPARSE:
        return None
    gaps = np.diff(changed, prepend=-1) - 1
    return _compress(struct.pack(">I", len(changed)) + _varints(gaps)
                     + (a[changed] ^ b[changed]).tobytes())


def _varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for gap in values.tolist():
        rest = gap
        while rest >= 0x80:
            out.append(rest & 0x7F | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


def _merge_copies(steps: list[tuple[DeltaOp, int, bytes]], base: bytes, target: bytes,
                  ) -> list[tuple[DeltaOp, int, bytes]]:
    """``steps`` with skeleton pieces that continue an unchanged tensor in the base (before
    or after it) turned into copies, and adjacent copies merged: an unchanged stretch of
    file is one op, however many tensors it holds."""
    merged: list[tuple[DeltaOp, int, bytes]] = []
    for step, at, payload in steps:
        op = step
        if merged:
            prev, prev_at, _ = merged[-1]
            if op.op == "skel" and prev.op == "copy":
                src = prev.base_offset + prev.length
                if target[at:at + op.length] == base[src:src + op.length]:
                    op = DeltaOp("copy", op.length, src, op.length)
            elif op.op == "copy" and prev.op == "skel" and op.base_offset >= prev.length:
                src = op.base_offset - prev.length
                if target[prev_at:at] == base[src:op.base_offset]:
                    merged[-1] = (DeltaOp("copy", prev.length, src, prev.length), prev_at, b"")
            prev, prev_at, _ = merged[-1]
            if (op.op == prev.op == "copy"
                    and prev.base_offset + prev.length == op.base_offset):
                length = prev.length + op.length
                merged[-1] = (DeltaOp("copy", length, prev.base_offset, length), prev_at, b"")
                continue
        merged.append((op, at, payload))
    return merged


def _gaps(size: int, spans: list[TensorSpan]) -> list[tuple[int, int]]:
    """The (offset, length) ranges of ``size`` bytes that ``spans`` do not cover."""
    gaps, pos = [], 0
    for span in sorted(spans, key=lambda s: s.offset):
        if span.offset > pos:
            gaps.append((pos, span.offset - pos))
        pos = max(pos, span.offset + span.length)
    if pos < size:
        gaps.append((pos, size - pos))
    return gaps


def _encode_tensor(base: bytes, target: bytes, span: TensorSpan,
                   old: TensorSpan | None) -> tuple[DeltaOp, bytes]:
    """The smallest encoding of one target tensor against its namesake in the base."""
    new = target[span.offset:span.offset + span.length]
    raw = _compress(new)
    best = (DeltaOp("zstd", span.length, payload=len(raw)), raw)
    if old is None:
        return best
    before = base[old.offset:old.offset + old.length]
    if before == new:
        return DeltaOp("copy", span.length, old.offset, old.length), b""
    candidates = [("zdict", 1, _compress(new, before))]
    if old.length == span.length:
        a = np.frombuffer(before, np.uint8)
        b = np.frombuffer(new, np.uint8)
        widths = sorted({1, span.elem_size} & set(_WIDTHS))
        for width in widths if span.length % max(widths) == 0 else (1,):
            candidates.append(("xor", width, _compress(_planes(a ^ b, width))))
            candidates.append(("sub", width, _compress(_planes(b - a, width))))
    for op, width, payload in candidates:
        if len(payload) < len(best[1]):
            best = (DeltaOp(op, span.length, old.offset, old.length, width, len(payload)),
                    payload)
    return best


def _planes(values: np.ndarray, width: int) -> bytes:
    return values.reshape(-1, width).T.tobytes() if width > 1 else values.tobytes()


def _unplanes(data: bytes, width: int) -> np.ndarray:
    values = np.frombuffer(data, np.uint8)
    return values.reshape(width, -1).T.reshape(-1) if width > 1 else values


def _compress(data: bytes, dictionary: bytes = b"") -> bytes:
    # The window must reach back over the whole dictionary: that is patch-from.
    window = max(10, min(30, (len(data) + len(dictionary)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        _LEVEL, window_log=window, enable_ldm=len(dictionary) > _BLOCK,
        write_content_size=True, write_checksum=False, write_dict_id=False)
    zdict = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if dictionary else None)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=zdict).compress(data)


def _pack(header: DeltaHeader, payloads: list[bytes]) -> bytes:
    head = _compress(canonical_json({
        "base_size": header.base_size, "target_size": header.target_size,
        "skeleton": header.skeleton, "skeleton_size": header.skeleton_size,
        "skeleton_dict": [list(r) for r in header.skeleton_dict],
        "ops": [[o.op, o.length, o.base_offset, o.base_length, o.width, o.payload]
                for o in header.ops]}))
    return b"".join([MAGIC, _LENGTH.pack(len(head)), head, *payloads])


# --- reading and applying -------------------------------------------------------------------

class _Blocks:
    """``read(n)`` over an iterable of blocks, holding at most one block besides."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        self._blocks = iter(blocks)
        self._buffer = b""

    def read(self, n: int) -> bytes:
        parts, have = [self._buffer], len(self._buffer)
        while have < n:
            block = next(self._blocks, b"")
            if not block:
                break
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._buffer = data[n:]
        return data[:n]


class _Reader(Protocol):
    def read(self, n: int, /) -> bytes: ...


def read_header(delta: _Reader, delta_size: int) -> DeltaHeader:
    """Parse and bound-check the header at the start of ``delta`` (``delta_size`` bytes in
    all), leaving the stream at the first payload. MalformedBundleError if it is not one."""
    start = delta.read(len(MAGIC) + _LENGTH.size)
    if len(start) != len(MAGIC) + _LENGTH.size or not start.startswith(MAGIC):
        raise _bad("it does not start with EFDELTA1")
    (length,) = _LENGTH.unpack_from(start, len(MAGIC))
    if length > MAX_HEADER_BYTES or len(start) + length > delta_size:
        raise _bad(f"its header claims {length} bytes")
    try:
        obj = json.loads(_decompress_bounded(delta.read(length), MAX_HEADER_BYTES))
        ops = obj["ops"]
        if not isinstance(ops, list) or len(ops) > MAX_OPS:
            raise _bad(f"it lists {len(ops) if isinstance(ops, list) else '?'} ops")
        header = DeltaHeader(
            base_size=_nat(obj["base_size"]), target_size=_nat(obj["target_size"]),
            skeleton=_nat(obj["skeleton"]), skeleton_size=_nat(obj["skeleton_size"]),
            skeleton_dict=tuple((_nat(o), _nat(n)) for o, n in obj["skeleton_dict"]),
            ops=tuple(DeltaOp(str(op), *map(_nat, rest)) for op, *rest in ops))
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad(f"its header does not parse ({exc})") from exc
    _check_header(header, delta_size - len(start) - length)
    return header


def _nat(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a non-negative integer")
    return value


def _check_header(h: DeltaHeader, payload_bytes: int) -> None:
    def within(offset: int, length: int) -> bool:
        return offset + length <= h.base_size

    if sum(o.length for o in h.ops) != h.target_size:
        raise _bad("its ops do not add up to the target's size")
    if sum(o.payload for o in h.ops) + h.skeleton != payload_bytes:
        raise _bad("its payloads do not add up to its size")
    if sum(o.length for o in h.ops if o.op == "skel") != h.skeleton_size:
        raise _bad("its skeleton ops do not add up to the skeleton's size")
    if not all(within(o, n) for o, n in h.skeleton_dict):
        raise _bad("its skeleton dictionary lies outside the base")
    for op in h.ops:
        if (op.op not in _OPS or op.width not in _WIDTHS or op.length % op.width
                or not within(op.base_offset, op.base_length)
                or (op.op in ("copy", "xor", "sub", "sparse") and op.base_length != op.length)):
            raise _bad(f"it has an invalid op {op}")


def apply_delta(delta: Iterable[bytes], delta_size: int, base: BinaryIO, out: BinaryIO, *,
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
    header = read_header(stream, delta_size)
    if header.target_size != target_size:
        raise RebuildMismatchError(
            f"the delta rebuilds {header.target_size} bytes, not the signed artifact's "
            f"{target_size}; the delta does not belong to this release: install the full "
            "bundle")
    _check_base(base, header.base_size, base_sha256)
    digest = hashlib.sha256()
    written = 0
    for block in _rebuild(header, stream, base):
        digest.update(block)
        out.write(block)
        written += len(block)
    if written != target_size or digest.hexdigest() != target_sha256:
        raise RebuildMismatchError(
            f"the artifact rebuilt from the delta hashes to {digest.hexdigest()[:16]} "
            f"({written} bytes), not the signed {target_sha256[:16]} ({target_size} bytes); "
            "the delta was made wrongly or tampered with before signing: install the full "
            "bundle")


def _check_base(base: BinaryIO, base_size: int, base_sha256: str) -> None:
    digest = hashlib.sha256()
    size = 0
    base.seek(0)
    for block in iter(lambda: base.read(_BLOCK), b""):
        digest.update(block)
        size += len(block)
    if (size, digest.hexdigest()) != (base_size, base_sha256):
        raise DeltaBaseError(
            f"the stored artifact this delta builds on is damaged or another version "
            f"({size} bytes, sha256 {digest.hexdigest()[:16]}; the delta needs "
            f"{base_size} bytes, {base_sha256[:16]}); install the full bundle")


def _rebuild(h: DeltaHeader, delta: _Reader, base: BinaryIO) -> Iterator[bytes]:
    skeleton = _skeleton_reader(h, delta, base)
    for op in h.ops:
        if op.op == "copy":
            yield from _base_blocks(base, op.base_offset, op.length)
        elif op.op == "skel":
            yield _read_exact(skeleton, op.length, "skeleton")
        elif op.op == "zdict" and op.length > _BLOCK:
            yield from _stream_zdict(op, delta, base)
        elif op.op == "sparse":
            yield from _apply_sparse(op, _read_exact(delta, op.payload, "payload"), base)
        else:
            yield _decode(op, _read_exact(delta, op.payload, "payload"), base)


def _skeleton_reader(h: DeltaHeader, delta: _Reader, base: BinaryIO) -> BinaryIO:
    if not h.skeleton:
        return io.BytesIO(b"")
    packed = _read_exact(delta, h.skeleton, "skeleton")
    dictionary = b"".join(_read_base(base, o, n) for o, n in h.skeleton_dict)
    return io.BytesIO(_decompress(packed, h.skeleton_size, dictionary))


def _apply_sparse(op: DeltaOp, payload: bytes, base: BinaryIO) -> Iterator[bytes]:
    """The base range with the listed bytes changed, block by block."""
    data = _decompress_bounded(payload, 4 + 6 * min(op.length, MAX_SPARSE), "a payload")
    if len(data) < 4:
        raise _bad("a sparse payload is too short")
    (count,) = struct.unpack_from(">I", data)
    raw = np.frombuffer(data, np.uint8, offset=4)
    ends = np.flatnonzero(raw < 0x80)
    if count > MAX_SPARSE or len(ends) < count or len(raw) != (
            (ends[count - 1] + 1 if count else 0) + count):
        raise _bad("a sparse payload does not add up")
    used = ends[count - 1] + 1 if count else 0
    group = np.concatenate([[0], np.cumsum(raw[:used] < 0x80)[:-1]]) if used else raw[:0]
    starts = np.concatenate([[0], ends[:count - 1] + 1]) if count else ends[:0]
    shift = (np.arange(used) - starts[group]) * 7
    if used and shift.max() > 35:
        raise _bad("a sparse payload has an oversized gap")
    gaps = np.zeros(count, np.int64)
    np.add.at(gaps, group, (raw[:used] & 0x7F).astype(np.int64) << shift)
    positions = np.cumsum(gaps + 1) - 1
    if count and positions[-1] >= op.length:
        raise _bad("a sparse payload changes bytes past its op")
    values = raw[used:]
    done = 0
    for block in _base_blocks(base, op.base_offset, op.length):
        lo, hi = np.searchsorted(positions, [done, done + len(block)])
        changed = np.frombuffer(block, np.uint8).copy()
        changed[positions[lo:hi] - done] ^= values[lo:hi]
        done += len(block)
        yield changed.tobytes()


def _decode(op: DeltaOp, payload: bytes, base: BinaryIO) -> bytes:
    if op.op == "zstd":
        return _decompress(payload, op.length)
    before = _read_base(base, op.base_offset, op.base_length)
    if op.op == "zdict":
        return _decompress(payload, op.length, before)
    change = _unplanes(_decompress(payload, op.length), op.width)
    a = np.frombuffer(before, np.uint8)
    rebuilt: np.ndarray = a ^ change if op.op == "xor" else a + change
    return rebuilt.tobytes()


def _stream_zdict(op: DeltaOp, delta: _Reader, base: BinaryIO) -> Iterator[bytes]:
    """A large ``zdict`` op (the whole-file fallback), decompressed block by block."""
    dictionary = _read_base(base, op.base_offset, op.base_length)
    payload = io.BytesIO(_read_exact(delta, op.payload, "payload"))
    reader = _decompressor(dictionary, op.length).stream_reader(payload)
    try:
        yield from _chunks(reader.read, op.length, _bad("a payload ends early"))
    except zstandard.ZstdError as exc:
        raise _bad(f"a payload does not decompress ({exc})") from exc


def _decompressor(dictionary: bytes, size: int) -> zstandard.ZstdDecompressor:
    zdict = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if dictionary else None)
    window = 1 << max(10, min(31, (size + len(dictionary)).bit_length()))
    return zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=window)


def _check_declared_size(payload: bytes, limit: int, what: str) -> None:
    """A frame may declare its content size, which one-shot decompression allocates before
    checking it against ``max_output_size``: a damaged header claiming 10**18 bytes would
    end in MemoryError. Refuse such a claim first."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise _bad(f"{what} is not a zstd frame ({exc})") from exc
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise _bad(f"{what} claims {declared} bytes, over its bound of {limit}")


def _decompress_bounded(payload: bytes, limit: int, what: str = "its header") -> bytes:
    _check_declared_size(payload, limit, what)
    try:
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise _bad(f"{what} does not decompress ({exc})") from exc


def _decompress(payload: bytes, size: int, dictionary: bytes = b"") -> bytes:
    _check_declared_size(payload, size, "a payload")
    try:
        data = _decompressor(dictionary, size).decompress(payload, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise _bad(f"a payload does not decompress ({exc})") from exc
    if len(data) != size:
        raise _bad(f"a payload decompresses to {len(data)} bytes, not {size}")
    return data


def _base_blocks(base: BinaryIO, offset: int, length: int) -> Iterator[bytes]:
    base.seek(offset)
    yield from _chunks(base.read, length, DeltaBaseError(
        "the stored base artifact changed while the delta was applied; install the full "
        "bundle"))


def _chunks(read: Callable[[int], bytes], length: int, short: Exception) -> Iterator[bytes]:
    """``length`` bytes from ``read`` in blocks of at most 1 MiB; ``short`` if they end."""
    while length:
        block = read(min(_BLOCK, length))
        if not block:
            raise short
        length -= len(block)
        yield block


def _read_base(base: BinaryIO, offset: int, length: int) -> bytes:
    return b"".join(_base_blocks(base, offset, length))


def _read_exact(stream: _Reader, length: int, what: str) -> bytes:
    data = stream.read(length)
    if len(data) != length:
        raise _bad(f"its {what} ends early")
    return data


def _bad(what: str) -> MalformedBundleError:
    return MalformedBundleError(f"the delta is malformed: {what}; install the full bundle")

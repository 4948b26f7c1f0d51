"""Making a delta (server side): per tensor the smallest encoding, or one op over the file.

:func:`make_delta` pairs tensors by name (:mod:`bundle.tensor_index`) and, per tensor,
keeps the smallest of ``copy``, ``zstd``, ``zdict`` and ``xor``/``sub`` at width 1 and the
element size; everything else goes to the skeleton; when a zstd patch-from of the whole
file, or the few bytes that changed (``sparse``), is smaller than the sum, that single op
is the delta. zstd level 19 throughout.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from bundle.tensor_index import TensorSpan, tensor_index

from ._header import MAX_SPARSE, WIDTHS, DeltaHeader, DeltaOp, header_json, pack_header

#: Tensors smaller than this go to the skeleton: a frame and an op each would cost more.
SMALL_TENSOR_BYTES = 2048
_LEVEL = 19
#: Dictionaries over this size turn on zstd's long-distance matching.
_LDM_FROM = 1024 * 1024


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
        widths = sorted({1, span.elem_size} & set(WIDTHS))
        for width in widths if span.length % max(widths) == 0 else (1,):
            candidates.append(("xor", width, _compress(_planes(a ^ b, width))))
            candidates.append(("sub", width, _compress(_planes(b - a, width))))
    for op, width, payload in candidates:
        if len(payload) < len(best[1]):
            best = (DeltaOp(op, span.length, old.offset, old.length, width, len(payload)),
                    payload)
    return best


def _planes(values: np.ndarray, width: int) -> bytes:
    """``values`` (bytes of ``width``-byte elements) as byte planes: byte 0 of every
    element, then byte 1, ..."""
    return values.reshape(-1, width).T.tobytes() if width > 1 else values.tobytes()


def _compress(data: bytes, dictionary: bytes = b"") -> bytes:
    # The window must reach back over the whole dictionary: that is patch-from.
    window = max(10, min(30, (len(data) + len(dictionary)).bit_length()))
    params = zstandard.ZstdCompressionParameters.from_level(
        _LEVEL, window_log=window, enable_ldm=len(dictionary) > _LDM_FROM,
        write_content_size=True, write_checksum=False, write_dict_id=False)
    zdict = (zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
             if dictionary else None)
    return zstandard.ZstdCompressor(compression_params=params, dict_data=zdict).compress(data)


def _pack(header: DeltaHeader, payloads: list[bytes]) -> bytes:
    return b"".join([pack_header(_compress(header_json(header))), *payloads])

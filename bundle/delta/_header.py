"""The delta's header: its ops, their bounds, and writing and reading it (docs/bundle-format.md §8).

Shared by the making (:mod:`._encode`) and the applying (:mod:`._apply`) side; a reader
checks every size and range here before a single payload byte is decompressed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Protocol

import zstandard

from bundle.errors import MalformedBundleError
from bundle.manifest import canonical_json

MAGIC = b"EFDELTA1"
LENGTH = struct.Struct(">I")
#: Header bytes a reader accepts (a 1,000-tensor model's header is about 100 KB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_OPS = 200_000
#: A sparse op lists at most this many changed bytes (it is for a few scattered changes).
MAX_SPARSE = 1_000_000
OPS = {"copy", "skel", "zstd", "zdict", "xor", "sub", "sparse"}
WIDTHS = (1, 2, 4, 8)
#: Ops whose bytes are a base range of the same length, changed (or not).
SAME_LENGTH = ("copy", "xor", "sub", "sparse")


@dataclass(frozen=True)
class DeltaOp:
    """One step of the rebuild: the next ``length`` bytes of the target (module docstring of
    :mod:`bundle.delta`)."""

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


class Reader(Protocol):
    """Where a delta's bytes are read from, in order."""

    def read(self, n: int, /) -> bytes: ...


def pack_header(packed: bytes) -> bytes:
    """The delta's bytes up to its payloads: magic, length, and ``packed``, the header's
    canonical JSON (:func:`header_json`) compressed by the caller."""
    return MAGIC + LENGTH.pack(len(packed)) + packed


def header_json(header: DeltaHeader) -> bytes:
    """The header as the canonical JSON that is compressed into the delta."""
    return canonical_json({
        "base_size": header.base_size, "target_size": header.target_size,
        "skeleton": header.skeleton, "skeleton_size": header.skeleton_size,
        "skeleton_dict": [list(r) for r in header.skeleton_dict],
        "ops": [[o.op, o.length, o.base_offset, o.base_length, o.width, o.payload]
                for o in header.ops]})


def read_header(delta: Reader, delta_size: int, *,
                decompressor: zstandard.ZstdDecompressor | None = None) -> DeltaHeader:
    """Parse and bound-check the header at the start of ``delta`` (``delta_size`` bytes in
    all), leaving the stream at the first payload. MalformedBundleError if it is not one.
    ``decompressor``: a zstd context without dictionary to use (a fresh one if None)."""
    start = delta.read(len(MAGIC) + LENGTH.size)
    if len(start) != len(MAGIC) + LENGTH.size or not start.startswith(MAGIC):
        raise bad("it does not start with EFDELTA1")
    (length,) = LENGTH.unpack_from(start, len(MAGIC))
    if length > MAX_HEADER_BYTES or len(start) + length > delta_size:
        raise bad(f"its header claims {length} bytes")
    packed = delta.read(length)
    check_declared_size(packed, MAX_HEADER_BYTES, "its header")
    try:
        text = (decompressor or zstandard.ZstdDecompressor()).decompress(
            packed, max_output_size=MAX_HEADER_BYTES)
    except zstandard.ZstdError as exc:
        raise bad(f"its header does not decompress ({exc})") from exc
    try:
        obj = json.loads(text)
        ops = obj["ops"]
        if not isinstance(ops, list) or len(ops) > MAX_OPS:
            raise bad(f"it lists {len(ops) if isinstance(ops, list) else '?'} ops")
        header = DeltaHeader(
            base_size=_nat(obj["base_size"]), target_size=_nat(obj["target_size"]),
            skeleton=_nat(obj["skeleton"]), skeleton_size=_nat(obj["skeleton_size"]),
            skeleton_dict=tuple((_nat(o), _nat(n)) for o, n in obj["skeleton_dict"]),
            ops=tuple(DeltaOp(str(op), *map(_nat, rest)) for op, *rest in ops))
    except (ValueError, KeyError, TypeError) as exc:
        raise bad(f"its header does not parse ({exc})") from exc
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
        raise bad("its ops do not add up to the target's size")
    if sum(o.payload for o in h.ops) + h.skeleton != payload_bytes:
        raise bad("its payloads do not add up to its size")
    if sum(o.length for o in h.ops if o.op == "skel") != h.skeleton_size:
        raise bad("its skeleton ops do not add up to the skeleton's size")
    if not all(within(o, n) for o, n in h.skeleton_dict):
        raise bad("its skeleton dictionary lies outside the base")
    for op in h.ops:
        if (op.op not in OPS or op.width not in WIDTHS or op.length % op.width
                or not within(op.base_offset, op.base_length)
                or (op.op in SAME_LENGTH and op.base_length != op.length)):
            raise bad(f"it has an invalid op {op}")


def check_declared_size(payload: bytes, limit: int, what: str) -> None:
    """A frame may declare its content size, which one-shot decompression allocates before
    checking it against ``max_output_size``: a damaged header claiming 10**18 bytes would
    end in MemoryError. Refuse such a claim first."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as exc:
        raise bad(f"{what} is not a zstd frame ({exc})") from exc
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise bad(f"{what} claims {declared} bytes, over its bound of {limit}")


def bad(what: str) -> MalformedBundleError:
    """The error for a delta that is not well formed."""
    return MalformedBundleError(f"the delta is malformed: {what}; install the full bundle")

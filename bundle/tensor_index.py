"""Where a model file keeps its weights: named byte ranges of the tensors in ONNX and TFLite.

A weight-level delta (:mod:`bundle.delta`) pairs each tensor of the new artifact with the
tensor of the same name in the old one, so it needs to know where the tensors' bytes are.
Both formats are walked by hand, without the ``onnx`` or ``tflite`` packages (which the
agent does not install): ONNX is protobuf (``ModelProto.graph.initializer[]``, each
``TensorProto`` with ``name`` and ``raw_data`` or a packed typed field), TFLite is a
flatbuffer (``Model.buffers[].data``, named through ``subgraphs[].tensors[]``). Only the
server diffs, so only the server calls this; a file that does not parse yields no tensors
(the delta then treats it as opaque bytes) rather than an error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["TensorSpan", "tensor_index"]

#: ONNX ``TensorProto.DataType`` -> element size in bytes.
_ONNX_ELEM = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
              16: 2}
#: TFLite ``TensorType`` -> element size in bytes.
_TFLITE_ELEM = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 16: 4, 17: 2}
# TensorProto fields holding data: raw_data (9) and the packed typed ones.
_ONNX_DATA_FIELDS = {9, 4, 5, 7, 10, 11}


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's data in a model file: ``length`` bytes at ``offset``."""

    name: str
    offset: int
    length: int
    #: Bytes per element (1 when unknown): the stride of the byte planes of a delta.
    elem_size: int = 1


class _Malformed(ValueError):
    pass


def tensor_index(data: bytes, fmt: str) -> list[TensorSpan]:
    """The tensors of model file ``data`` in format ``fmt`` (``onnx`` or ``tflite``), sorted
    by offset and not overlapping; empty for another format or a file that does not parse."""
    try:
        if fmt == "onnx":
            spans = _onnx(data)
        elif fmt == "tflite":
            spans = _tflite(data)
        else:
            return []
    except (_Malformed, struct.error, IndexError, UnicodeDecodeError):
        return []
    spans.sort(key=lambda s: s.offset)
    kept: list[TensorSpan] = []
    names: set[str] = set()
    for span in spans:  # overlaps or repeated names would make the pairing ambiguous
        if span.length <= 0 or span.name in names or (
                kept and span.offset < kept[-1].offset + kept[-1].length):
            continue
        kept.append(span)
        names.add(span.name)
    return kept


# --- ONNX (protobuf wire format) -----------------------------------------------------------

def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload offset, payload length) of one message."""
    out = []
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            out.append((number, wire, value, 0))
        elif wire == 1:
            out.append((number, wire, pos, 8))
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise _Malformed("field runs past its message")
            out.append((number, wire, pos, length))
            pos += length
        elif wire == 5:
            out.append((number, wire, pos, 4))
            pos += 4
        else:
            raise _Malformed(f"wire type {wire}")
    if pos != end:
        raise _Malformed("message runs past its end")
    return out


def _onnx(data: bytes) -> list[TensorSpan]:
    graphs = [(p, n) for f, w, p, n in _fields(data, 0, len(data)) if f == 7 and w == 2]
    spans = []
    for start, length in graphs:
        for f, w, p, n in _fields(data, start, start + length):
            if f == 5 and w == 2:  # GraphProto.initializer
                span = _onnx_tensor(data, p, p + n)
                if span is not None:
                    spans.append(span)
    return spans


def _onnx_tensor(data: bytes, start: int, end: int) -> TensorSpan | None:
    name, dtype, where = None, 0, None
    for f, w, p, n in _fields(data, start, end):
        if f == 8 and w == 2:
            name = data[p:p + n].decode("utf-8")
        elif f == 2 and w == 0:
            dtype = p
        elif f in _ONNX_DATA_FIELDS and w == 2 and n:
            where = (p, n)
    if name is None or where is None:
        return None
    return TensorSpan(name, where[0], where[1], _ONNX_ELEM.get(dtype, 1))


# --- TFLite (flatbuffers) ------------------------------------------------------------------

def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", data, pos)[0])


def _field(data: bytes, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the table at ``table``, or None if absent."""
    vtable = table - int(struct.unpack_from("<i", data, table)[0])
    vsize = struct.unpack_from("<H", data, vtable)[0]
    if 4 + 2 * index >= vsize:
        return None
    offset = struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0]
    return None if offset == 0 else table + offset


def _indirect(data: bytes, pos: int) -> int:
    return pos + _u32(data, pos)


def _vector(data: bytes, table: int, index: int) -> tuple[int, int]:
    """(position of the first element, length) of a vector field; (0, 0) when absent."""
    pos = _field(data, table, index)
    if pos is None:
        return 0, 0
    vec = _indirect(data, pos)
    length = _u32(data, vec)
    if vec + 4 + length > len(data):
        raise _Malformed("vector runs past the file")
    return vec + 4, length


def _tflite(data: bytes) -> list[TensorSpan]:
    if data[4:8] != b"TFL3":
        raise _Malformed("no TFL3 identifier")
    model = _indirect(data, 0)
    buffers, count = _vector(data, model, 4)
    names: dict[int, tuple[str, int]] = {}
    subgraphs, sg_count = _vector(data, model, 2)
    for s in range(sg_count):
        subgraph = _indirect(data, subgraphs + 4 * s)
        tensors, t_count = _vector(data, subgraph, 0)
        for t in range(t_count):
            tensor = _indirect(data, tensors + 4 * t)
            buf_pos, name_pos, type_pos = (_field(data, tensor, i) for i in (2, 3, 1))
            if buf_pos is None or name_pos is None:
                continue
            name_at = _indirect(data, name_pos)
            name = data[name_at + 4:name_at + 4 + _u32(data, name_at)].decode("utf-8")
            ttype = 0 if type_pos is None else data[type_pos]
            names.setdefault(_u32(data, buf_pos), (name, _TFLITE_ELEM.get(ttype, 1)))
    spans = []
    for b in range(count):
        buffer = _indirect(data, buffers + 4 * b)
        start, length = _vector(data, buffer, 0)
        if length:
            name, elem = names.get(b, (f"buffer/{b}", 1))
            spans.append(TensorSpan(name, start, length, elem))
    return spans

"""Weight-level deltas: an artifact rebuilt from the previous version and what changed.

The server makes a delta (:func:`make_delta`, :mod:`._encode`) from two versions of one
artifact; the device rebuilds the new artifact from its stored old one (:func:`apply_delta`,
:mod:`._apply`) and checks the result against the full artifact's sha256 in the signed
manifest. The format (:mod:`._header`) is laid out in docs/bundle-format.md §8; in short::

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
  byte-wise difference is almost all 0 and +-1;
- ``sparse``: the base range with a few listed bytes changed (by gap and XOR).

Applying needs no model parser: it streams op by op, reading base ranges by offset and
writing and hashing the target as it goes, so memory is about twice the largest tensor
(the whole base only for a whole-file ``zdict``), never the two whole files.
"""

from __future__ import annotations

from ._apply import apply_delta
from ._encode import make_delta
from ._header import MAGIC, DeltaHeader, DeltaOp, read_header

__all__ = ["MAGIC", "DeltaHeader", "DeltaOp", "apply_delta", "make_delta", "read_header"]

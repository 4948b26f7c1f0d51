"""Build a ~100 MB sentence encoder (random weights) for the compressor's time and memory target.

The same architecture as ``train_text_encoder.py`` scaled to BERT-base-like width and depth
(vocabulary 8,000, width 512, 8 layers, 8 heads, feed-forward 2,048): about 29M parameters,
about 110 MB of fp32 weights. It is not trained: the benchmark measures how long compression
takes and how much memory it needs on a model of this size, and judges quality by agreement
with the fp32 model (nearest-neighbour agreement of the embeddings), which random weights
support.

Generated into ``models/generated/`` (not committed): ``large_encoder.onnx`` and
``large_encoder_data.npz`` (``calib_x/...`` 64 and ``eval_x/...`` 256 random sentences of up
to 64 tokens). Needs the ``models`` extra. Run: ``python models/build_large_encoder.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from train_text_encoder import SEED, TextEncoder, export_onnx

HERE = Path(__file__).resolve().parent
VOCAB, SEQ = 8000, 64


def random_sentences(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention masks of ``count`` random sentences, 8 to 64 tokens."""
    ids = rng.integers(2, VOCAB, size=(count, SEQ)).astype(np.int64)
    lengths = rng.integers(8, SEQ + 1, size=count)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 1
    return ids * mask, mask


def main() -> None:
    """Build the model and its data into models/generated/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE / "generated")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = TextEncoder(vocab=VOCAB, width=512, depth=8, heads=8, ffn=2048)
    params = sum(p.numel() for p in model.parameters())
    print(f"large encoder: {params / 1e6:.1f}M parameters, {params * 4 / 2**20:.0f} MB fp32")
    path = args.out_dir / "large_encoder.onnx"
    export_onnx(model, path, "edgefleet ~100 MB encoder, random weights "
                             "(models/build_large_encoder.py)")
    rng = np.random.default_rng(SEED)
    calib, evaluation = random_sentences(64, rng), random_sentences(256, rng)
    arrays: dict[str, Any] = {"calib_x/input_ids": calib[0], "calib_x/attention_mask": calib[1],
              "eval_x/input_ids": evaluation[0], "eval_x/attention_mask": evaluation[1]}
    np.savez_compressed(args.out_dir / "large_encoder_data.npz", **arrays)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()

"""Train a small BERT-style sentence encoder on generated "sentences" and export it to ONNX.

The model: token and position embeddings, 2 pre-norm transformer encoder layers (width 128,
4 heads, GELU feed-forward of 512), masked mean pooling and a final LayerNorm: about 0.5M
parameters, the interface of a sentence-embedding model (``input_ids`` and
``attention_mask``, int64 ``[batch, seq]`` with both axes dynamic, in; ``sentence_embedding``
float32 ``[batch, 128]`` out).

Data, generated with a fixed seed: 16 topics over a 1,000-token vocabulary; each topic has
56 words of its own and shares 100 common words with every other; a sentence is 8 to 32
tokens after a CLS token, half topic words and half common words in random order, padded
with 0 to 32. Training: a linear topic classifier on the embedding, cross-entropy, a few
epochs; the exported model is the encoder alone, and its embeddings place sentences of one
topic next to each other (the benchmark's quality measure is 1-nearest-neighbour topic
accuracy, ``--metric sentence_embedding=embedding`` with labels).

Writes (committed): ``models/text_encoder.onnx`` and ``models/text_encoder_data.npz``
(``calib_x/input_ids``, ``calib_x/attention_mask`` (128 sentences), ``eval_x/...`` (512),
``eval_y/sentence_embedding`` (topic ids)). Needs the ``models`` extra (PyTorch 2.13.0 CPU).
Run: ``python models/train_text_encoder.py``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx_export import export
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
VOCAB, TOPICS, COMMON, PER_TOPIC, SEQ = 1000, 16, 100, 56, 32


class EncoderLayer(nn.Module):
    """Pre-norm self-attention with an additive padding mask, then a GELU feed-forward."""

    def __init__(self, width: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.qkv(self.norm1(x))
        # Slices, not chunk(): chunk exports as an opset-18 Split the opset-17 model rejects.
        q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, seq, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + bias
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, width)
        x = x + self.out(attended)
        return x + self.ffn(self.norm2(x))


class TextEncoder(nn.Module):
    """Token + position embeddings, encoder layers, masked mean pooling, LayerNorm."""

    def __init__(self, vocab: int = VOCAB, *, width: int = 128, depth: int = 2,
                 heads: int = 4, ffn: int = 512, max_len: int = 128) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(max_len, width)
        self.layers = nn.ModuleList(EncoderLayer(width, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)[None]
        mask = attention_mask.to(x.dtype)
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]  # padding gets no attention
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.norm(pooled)


def make_sentences(count: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``count`` sentences: (input_ids, attention_mask, topic), as int64 arrays."""
    ids = np.zeros((count, SEQ), np.int64)
    mask = np.zeros((count, SEQ), np.int64)
    topics = rng.integers(0, TOPICS, count)
    for i, topic in enumerate(topics):
        length = int(rng.integers(8, SEQ))
        own = 2 + COMMON + topic * PER_TOPIC + rng.integers(0, PER_TOPIC, length)
        common = 2 + rng.integers(0, COMMON, length)
        words = np.where(rng.random(length) < 0.5, own, common)
        ids[i, 0], ids[i, 1:length + 1] = 1, words[:SEQ - 1]
        mask[i, :length + 1] = 1
    return ids, mask, topics.astype(np.int64)


def train(model: TextEncoder, data: tuple[np.ndarray, ...], epochs: int) -> None:
    """Topic classification on the pooled embedding (a linear head, dropped afterwards)."""
    torch.manual_seed(SEED)
    head = nn.Linear(model.norm.normalized_shape[0], TOPICS)
    params = [*model.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ids, mask, topics = (torch.from_numpy(a) for a in data)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        started = time.monotonic()
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(ids), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(head(model(ids[batch], mask[batch])),
                                               topics[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.monotonic() - started:.1f} s)", flush=True)


def neighbour_accuracy(model: TextEncoder, ids: np.ndarray, mask: np.ndarray,
                       topics: np.ndarray) -> float:
    """How often a sentence's nearest other sentence (cosine) has its topic, in percent."""
    model.eval()
    with torch.no_grad():
        emb = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(topics[similarity.argmax(1)] == topics) * 100)


def export_onnx(model: TextEncoder, path: Path, doc: str) -> None:
    """Export with dynamic batch and sequence axes, weights inside the one .onnx file."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=128)
    example = (torch.ones(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.int64))
    export(model, example, path, inputs=["input_ids", "attention_mask"],
           outputs=["sentence_embedding"], doc=doc,
           dynamic_shapes={"input_ids": {0: batch, 1: seq},
                           "attention_mask": {0: batch, 1: seq}})


def main() -> None:
    """Train and export the encoder and its data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--reuse", action="store_true",
                        help="export the weights of the last training run (generated/) again")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rng = np.random.default_rng(SEED)
    train_data = make_sentences(6400, rng)
    calib = make_sentences(128, rng)
    evaluation = make_sentences(512, rng)
    torch.manual_seed(SEED)
    model = TextEncoder()
    params = sum(p.numel() for p in model.parameters())
    print(f"TextEncoder: {params / 1e6:.2f}M parameters")
    cache = args.out_dir / "generated" / "text_encoder.pt"
    if args.reuse and cache.is_file():
        model.load_state_dict(torch.load(cache))
    else:
        train(model, train_data, args.epochs)
        cache.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), cache)
    path = args.out_dir / "text_encoder.onnx"
    export_onnx(model, path, "edgefleet sentence encoder (models/train_text_encoder.py)")
    data_path = args.out_dir / "text_encoder_data.npz"
    arrays: dict[str, Any] = {"calib_x/input_ids": calib[0], "calib_x/attention_mask": calib[1],
              "eval_x/input_ids": evaluation[0], "eval_x/attention_mask": evaluation[1],
              "eval_y/sentence_embedding": evaluation[2]}
    np.savez_compressed(data_path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB) and {data_path}; nearest-"
          f"neighbour topic accuracy {neighbour_accuracy(model, *evaluation):.2f}%")


if __name__ == "__main__":
    main()

"""Build the larger benchmark model: a small vision transformer on upsampled digits.

The digits CNN is too small to show what compression does to size and latency, so the
benchmarks use this model too. It is a ViT-style transformer encoder (patch embedding,
6 encoder layers of width 256 with 4 heads and a 1024-wide feed-forward, a linear head over
all tokens): about 4.9M parameters, 19 MB of fp32 weights, dominated by dense MatMuls, the case
where int8 quantization should pay off. It is trained for a few epochs on the digits images
upsampled to 16x16 (64 patches of 2x2 pixels), so accuracy changes caused by compression are
measured against a real, non-trivial baseline rather than random outputs.

Generated on demand (by the benchmarks, or by hand) into ``models/generated/``, which is not
committed: ``digits_vit.onnx`` (input ``input`` float32 ``[batch, 1, 16, 16]``, output
``logits`` ``[batch, 10]``) and ``digits_vit_data.npz`` (``calib_x``, ``eval_x``, ``eval_y``).

Needs the ``models`` extra (PyTorch 2.13.0 CPU). Run: ``python models/build_bench_model.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from train_digits import SEED, split_digits

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "generated"
SIDE, PATCH = 16, 2


class DigitsViT(nn.Module):
    """Patch embedding + transformer encoder + a linear head over all (normalised) tokens."""

    def __init__(self, width: int = 256, depth: int = 6, heads: int = 4,
                 ffn: int = 1024) -> None:
        super().__init__()
        tokens = (SIDE // PATCH) ** 2
        self.embed = nn.Conv2d(1, width, PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        # A head over every token keeps where each patch was; a mean-pooled head barely varied
        # between samples here and training never left chance level.
        self.head = nn.Linear(tokens * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.encoder(tokens)).flatten(1))


def upsample(images: np.ndarray) -> np.ndarray:
    """8x8 digits to 16x16 by bilinear interpolation, still NCHW float32 in 0..1."""
    resized = nn.functional.interpolate(torch.from_numpy(images), size=(SIDE, SIDE),
                                        mode="bilinear", align_corners=False)
    return np.asarray(resized.numpy(), dtype=np.float32)


def train(model: DigitsViT, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """AdamW, linear warm-up then cosine decay, per step: with ~1,000 training images there
    are few steps, and a transformer without warm-up does not leave chance level."""
    torch.manual_seed(SEED)
    batch_size = 16
    steps = epochs * -(-len(x) // batch_size)
    warmup = steps // 10
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + np.cos(np.pi * step / steps))))
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        started = time.monotonic()
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.monotonic() - started:.1f} s)", flush=True)


def accuracy(model: DigitsViT, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() * 100)


def export_onnx(model: DigitsViT, path: Path) -> None:
    """Export with a dynamic batch axis, weights inside the one .onnx file."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model, (torch.zeros(2, 1, SIDE, SIDE),), input_names=["input"],
        output_names=["logits"], dynamic_shapes={"x": {0: batch}}, opset_version=17,
        dynamo=True)
    program.optimize()
    proto = program.model_proto
    onnx.checker.check_model(proto)
    onnx.save_model(proto, path)


def main() -> None:
    """Train and export the benchmark model and its data into models/generated/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = split_digits()
    train_x, calib_x, eval_x = (upsample(data[k]) for k in ("train_x", "calib_x", "eval_x"))
    torch.manual_seed(SEED)
    model = DigitsViT()
    params = sum(p.numel() for p in model.parameters())
    print(f"DigitsViT: {params / 1e6:.2f}M parameters, {params * 4 / 2**20:.1f} MB fp32")
    train(model, train_x, data["train_y"], args.epochs)
    onnx_path = args.out_dir / "digits_vit.onnx"
    export_onnx(model, onnx_path)
    data_path = args.out_dir / "digits_vit_data.npz"
    np.savez_compressed(data_path, calib_x=calib_x, eval_x=eval_x, eval_y=data["eval_y"])
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MB) and {data_path}; "
          f"eval accuracy {accuracy(model, eval_x, data['eval_y']):.2f}%")


if __name__ == "__main__":
    main()

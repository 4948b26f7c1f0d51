"""Train a small CRNN text-line recogniser (CTC) on generated digit lines; export to ONNX.

The model reads a line image of any width: three 3x3 convolutions (16, 32, 64 channels) with
ReLU and pooling (height 16 -> 1, width / 4), a bidirectional LSTM of 48 units a direction
over the columns, and a linear layer to 11 classes per column (0 is the CTC blank, 1..10 the
digits 0..9): about 0.07M parameters. Interface: ``image`` float32 ``[batch, 1, 16, width]`` (width
dynamic, a multiple of 4) -> ``logits`` float32 ``[batch, width / 4, 11]``.

Data, generated with a fixed seed: lines of 2 to 5 digits, each glyph one of
scikit-learn's 8x8 digits scaled to 16x16, separated by 4-8 blank pixels, on a blank
background with light noise, left-aligned and padded to the array's width. Glyphs for
training come from the digits' training split, for calibration and evaluation from its
evaluation split (train_digits.split_digits). Training: cross-entropy per output column
(the generator knows which digit covers each column; blank elsewhere), a few epochs; the
model is read like a CTC model (greedy: repeats merged, blanks dropped).

Writes (committed): ``models/crnn.onnx`` and ``models/crnn_data.npz``: ``calib_x/image``
(128 lines, width 96), ``eval_x/image`` (400 lines, width 128: the widths differ on purpose,
the model's width is dynamic), ``eval_y/logits`` (the digits, as CTC classes 1..10, padded
with -1; measured with ``--metric logits=ctc``, lines read exactly).
Needs the ``models`` extra. Run: ``python models/train_crnn.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx_export import export
from torch import nn
from train_digits import SEED, split_digits

HERE = Path(__file__).resolve().parent
HEIGHT, CLASSES, MAX_DIGITS = 16, 11, 6


class CRNN(nn.Module):
    """Convolutions over the line, a BiLSTM over its columns, a class per column."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),     # 8 x w/2
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 4 x w/4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))  # 1 x w/4
        self.rnn = nn.LSTM(64, 48, batch_first=True, bidirectional=True)
        self.head = nn.Linear(96, CLASSES)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        columns = self.features(image).squeeze(2).transpose(1, 2)  # [batch, w/4, 64]
        return self.head(self.rnn(columns)[0])


def glyphs(images: np.ndarray) -> np.ndarray:
    """8x8 digits as 16x16 glyphs (nearest-neighbour upscaling), values 0..1."""
    return images[:, 0].repeat(2, axis=1).repeat(2, axis=2)


def make_lines(count: int, width: int, pool: np.ndarray, labels: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` line images ``[count, 1, 16, width]``, their digits (CTC classes, padded
    with -1) and a class for every output column ``[count, width / 4]`` (a digit where its
    glyph covers the column's four pixels, else the blank 0).

    Glyphs are at least 4 pixels apart, so every two digits have a blank column between
    them and a greedy CTC reading of the columns gives the line, repeated digits included.
    """
    images = np.zeros((count, 1, HEIGHT, width), np.float32)
    targets = np.full((count, MAX_DIGITS), -1, np.int64)
    columns = np.zeros((count, width // 4), np.int64)
    most = min(MAX_DIGITS, width // 22)
    for i in range(count):
        start = int(rng.integers(0, 4))
        for j in range(int(rng.integers(2, most + 1))):
            if start + 16 > width:
                break
            index = int(rng.integers(0, len(pool)))
            images[i, 0, :, start:start + 16] = pool[index]
            targets[i, j] = labels[index] + 1  # class 0 is the blank
            first, last = -(-start // 4), (start + 16) // 4  # columns fully inside the glyph
            columns[i, first:last] = labels[index] + 1
            start += 16 + int(rng.integers(4, 9))
    images += rng.normal(0, 0.05, images.shape).astype(np.float32)
    return np.clip(images, 0, 1), targets, columns


def train(model: CRNN, images: np.ndarray, columns: np.ndarray, epochs: int) -> None:
    """Cross-entropy of every output column against its class, Adam, cosine-decayed rate.

    The generator knows where each glyph is, so the columns are labelled directly; CTC from
    scratch sat on its blank-only plateau for hundreds of steps at this size.
    """
    torch.manual_seed(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    x, y = torch.from_numpy(images), torch.from_numpy(columns)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        started = time.monotonic()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            batch = order[start:start + 32]
            loss = nn.functional.cross_entropy(model(x[batch]).transpose(1, 2), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.monotonic() - started:.1f} s)", flush=True)


def line_accuracy(model: CRNN, images: np.ndarray, targets: np.ndarray) -> float:
    """Lines whose greedy CTC reading equals the digits exactly, in percent."""
    model.eval()
    with torch.no_grad():
        best = model(torch.from_numpy(images)).argmax(-1).numpy()
    right = 0
    for row, target in zip(best, targets, strict=True):
        merged = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        right += merged == [t for t in target if t >= 0]
    return 100.0 * right / len(images)


def export_onnx(model: CRNN, path: Path) -> None:
    """Export with dynamic batch and width axes."""
    width = 4 * torch.export.Dim("quarter_width", min=4, max=1024)
    export(model, (torch.zeros(2, 1, HEIGHT, 96),), path, inputs=["image"],
           outputs=["logits"], doc="edgefleet CRNN line recogniser (models/train_crnn.py)",
           dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=1024),
                                     3: width}})


def main() -> None:
    """Train and export the recogniser and its data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--reuse", action="store_true",
                        help="export the weights of the last training run (generated/) again")
    args = parser.parse_args()
    torch.set_num_threads(2)
    digits = split_digits()
    rng = np.random.default_rng(SEED)
    train_pool, train_labels = glyphs(digits["train_x"]), digits["train_y"]
    held_out, held_labels = glyphs(digits["eval_x"]), digits["eval_y"]
    train_x, _, train_columns = make_lines(4000, 128, train_pool, train_labels, rng)
    calib_x, _, _ = make_lines(128, 96, held_out, held_labels, rng)
    eval_x, eval_y, _ = make_lines(400, 128, held_out, held_labels, rng)
    torch.manual_seed(SEED)
    model = CRNN()
    print(f"CRNN: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    cache = args.out_dir / "generated" / "crnn.pt"
    if args.reuse and cache.is_file():
        model.load_state_dict(torch.load(cache))
    else:
        train(model, train_x, train_columns, args.epochs)
        cache.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), cache)
    path = args.out_dir / "crnn.onnx"
    export_onnx(model, path)
    data_path = args.out_dir / "crnn_data.npz"
    arrays: dict[str, Any] = {"calib_x/image": calib_x, "eval_x/image": eval_x,
                              "eval_y/logits": eval_y}
    np.savez_compressed(data_path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB) and {data_path}; lines read "
          f"exactly: {line_accuracy(model, eval_x, eval_y):.2f}%")


if __name__ == "__main__":
    main()

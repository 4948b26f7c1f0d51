"""Train the reference digits CNN and export it to ONNX with its data.

The model is small on purpose: it makes tests and the demo fast while still being a real
convolutional network that quantization, pruning and hot-swap can be measured on.

Data: scikit-learn's bundled ``load_digits`` (1,797 8x8 grayscale images, 10 classes; no
download). Pixels are scaled from 0..16 to 0..1 and laid out NCHW as ``[N, 1, 8, 8]``.
A stratified split with a fixed seed gives train / calibration / evaluation sets.

Writes (both committed, so nothing at test or run time needs torch):

- ``models/digits_cnn.onnx``: input ``input`` float32 ``[batch, 1, 8, 8]``, output
  ``logits`` float32 ``[batch, 10]``.
- ``models/digits_data.npz``: ``calib_x`` (calibration inputs), ``eval_x`` / ``eval_y``
  (held-out evaluation inputs and labels).

Needs the ``models`` extra: ``pip install -e '.[models]'`` (PyTorch 2.13.0 CPU).
Run: ``python models/train_digits.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two dense layers (about 38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def split_digits() -> dict[str, np.ndarray]:
    """The fixed train / calibration / evaluation split, inputs as float32 NCHW in 0..1."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    train_x, eval_x, train_y, eval_y = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=SEED)
    train_x, calib_x, train_y, _ = train_test_split(
        train_x, train_y, test_size=0.15, stratify=train_y, random_state=SEED)
    return {"train_x": train_x, "train_y": train_y, "calib_x": calib_x,
            "eval_x": eval_x, "eval_y": eval_y}


def train(data: dict[str, np.ndarray], epochs: int) -> DigitsCNN:
    """Train with Adam and light shift augmentation; deterministic for a given seed."""
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    # Decaying the rate to zero settles the weights instead of ending on a noisy step.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    x, y = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"])
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start:start + 64]
            # One-pixel random shifts make the tiny net robust to the slight misalignments
            # quantization noise resembles, at no cost in accuracy.
            shift = tuple(int(s) for s in torch.randint(-1, 2, (2,), generator=generator))
            inputs = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, "
              f"eval accuracy {evaluate(model, data):.2f}%")
    return model


def evaluate(model: DigitsCNN, data: dict[str, np.ndarray]) -> float:
    """Top-1 accuracy in percent on the evaluation split."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data["eval_x"]))
    return float((logits.argmax(1).numpy() == data["eval_y"]).mean() * 100)


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """Export with a dynamic batch axis as a single self-contained .onnx file."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        model, (torch.zeros(2, 1, 8, 8),), input_names=["input"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch}}, opset_version=17, dynamo=True)
    program.optimize()
    proto = program.model_proto
    proto.graph.doc_string = "edgefleet reference digits CNN (models/train_digits.py)"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save_model(proto, path)


def main() -> None:
    """Train, export and save the reference model and its data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = split_digits()
    print(f"train {len(data['train_x'])}, calibration {len(data['calib_x'])}, "
          f"eval {len(data['eval_x'])} samples")
    model = train(data, args.epochs)
    onnx_path = args.out_dir / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    data_path = args.out_dir / "digits_data.npz"
    np.savez_compressed(data_path, calib_x=data["calib_x"], eval_x=data["eval_x"],
                        eval_y=data["eval_y"])
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes) and {data_path} "
          f"({data_path.stat().st_size} bytes); eval accuracy {evaluate(model, data):.2f}%")


if __name__ == "__main__":
    main()

"""Train a small streaming voice-activity detector (a GRU cell, state carried by the caller).

The exported model is one step of a stateful recogniser, the way streaming models ship:
it takes one frame of 40 log-band energies and the previous state, and returns the speech
probability of the frame and the next state, which the caller feeds back in. Interface:
``frame`` float32 ``[1, 40]`` and ``state`` float32 ``[1, 64]`` in; ``prob`` float32
``[1, 1]`` and ``stateN`` float32 ``[1, 64]`` out (the compressor pairs ``stateN`` with
``state`` by name). Inside: a dense layer of 64 with ReLU, a GRU cell of 64, a dense layer
to one logit and a sigmoid: about 30k parameters.

Data, generated with a fixed seed: sequences of 100-frame clips. Background frames are
noise around a random floor; speech segments (10-40 frames) add a harmonic comb whose
pitch drifts within the segment; loud broadband bursts (not speech) are mixed in, so the
detector must look at spectral shape, not loudness alone. Labels are 1 on speech frames.
Training: the same cell unrolled over whole clips, binary cross-entropy, a few epochs
(1 thread: the per-step ops are tiny, a second thread only adds contention).

Writes (committed): ``models/vad.onnx`` and ``models/vad_data.npz``: ``calib_x/frame``
(8 clips of 100 frames, ``[clips, frames, 1, 40]``), ``eval_x/frame`` (40 clips),
``eval_y/prob`` (``[clips, frames]``, 0/1). Quality: frames on the same side of 0.5 as the
labels (``--metric prob=iou:0.5``).
Needs the ``models`` extra. Run: ``python models/train_vad.py``.
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

HERE = Path(__file__).resolve().parent
SEED, BANDS, HIDDEN, FRAMES = 0, 40, 64, 100


class VadStep(nn.Module):
    """One frame in, the speech probability and the next GRU state out."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(BANDS, HIDDEN), nn.ReLU())
        self.cell = nn.GRUCell(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, frame: torch.Tensor, state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        next_state = self.step(self.inp(frame), state)
        return torch.sigmoid(self.out(next_state)), next_state

    def step(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The GRU cell's arithmetic written out with slices: GRUCell itself exports its
        gate split as an opset-18 Split that the opset-17 model rejects."""
        cell = self.cell
        gi = x @ cell.weight_ih.T + cell.bias_ih
        gh = h @ cell.weight_hh.T + cell.bias_hh
        r = torch.sigmoid(gi[:, :HIDDEN] + gh[:, :HIDDEN])
        z = torch.sigmoid(gi[:, HIDDEN:2 * HIDDEN] + gh[:, HIDDEN:2 * HIDDEN])
        n = torch.tanh(gi[:, 2 * HIDDEN:] + r * gh[:, 2 * HIDDEN:])
        return (1 - z) * n + z * h

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """Per-frame logits over whole clips ``[batch, frames, bands]`` (training)."""
        state = torch.zeros(clips.shape[0], HIDDEN)
        steps = []
        for t in range(clips.shape[1]):
            state = self.cell(self.inp(clips[:, t]), state)
            steps.append(self.out(state)[:, 0])
        return torch.stack(steps, 1)


def make_clips(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips of log-band energies ``[count, FRAMES, BANDS]`` and 0/1 labels."""
    bands = np.arange(BANDS)
    x = np.zeros((count, FRAMES, BANDS), np.float32)
    y = np.zeros((count, FRAMES), np.float32)
    for i in range(count):
        floor = rng.uniform(0.1, 0.6)
        x[i] = floor + 0.35 * rng.normal(size=(FRAMES, BANDS))
        t = int(rng.integers(0, 15))
        while t < FRAMES - 10:
            length = int(rng.integers(10, 40))
            end = min(FRAMES, t + length)
            if rng.random() < 0.65:  # speech: a comb of harmonics with a drifting pitch
                pitch = rng.uniform(2.5, 6.0)
                for f in range(t, end):
                    pitch += rng.normal(0, 0.05)
                    comb = np.exp(-0.5 * ((bands % pitch) / 0.6) ** 2) * np.exp(-bands / 30)
                    x[i, f] += rng.uniform(0.2, 0.8) * comb
                y[i, t:end] = 1.0
            else:  # a broadband burst: loud, smooth, not speech
                tilt = rng.uniform(-0.02, 0.02) * (bands - BANDS / 2)
                x[i, t:end] += rng.uniform(0.3, 1.0) + tilt
            t = end + int(rng.integers(5, 25))
    return x, y


def train(model: VadStep, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """Binary cross-entropy per frame over unrolled clips, Adam."""
    torch.manual_seed(SEED)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    clips, labels = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        started = time.monotonic()
        order = torch.randperm(len(clips), generator=generator)
        for start in range(0, len(clips), 32):
            batch = order[start:start + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(
                model.logits(clips[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.monotonic() - started:.1f} s)", flush=True)


def frame_accuracy(model: VadStep, x: np.ndarray, y: np.ndarray) -> float:
    """Frames on the right side of 0.5, in percent."""
    with torch.no_grad():
        probs = torch.sigmoid(model.logits(torch.from_numpy(x))).numpy()
    return float(np.mean((probs > 0.5) == (y > 0.5)) * 100)


def export_onnx(model: VadStep, path: Path) -> None:
    """Export the single step with fixed shapes (one stream, one frame per call)."""
    export(model, (torch.zeros(1, BANDS), torch.zeros(1, HIDDEN)), path,
           inputs=["frame", "state"], outputs=["prob", "stateN"],
           doc="edgefleet streaming voice-activity detector (models/train_vad.py)")


def main() -> None:
    """Train and export the detector and its data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--reuse", action="store_true",
                        help="export the weights of the last training run (generated/) again")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny per-step ops: a second thread only adds contention
    rng = np.random.default_rng(SEED)
    train_x, train_y = make_clips(2000, rng)
    calib_x, _ = make_clips(8, rng)
    eval_x, eval_y = make_clips(40, rng)
    torch.manual_seed(SEED)
    model = VadStep()
    print(f"VadStep: {sum(p.numel() for p in model.parameters()) / 1e3:.1f}k parameters")
    cache = args.out_dir / "generated" / "vad.pt"
    if args.reuse and cache.is_file():
        model.load_state_dict(torch.load(cache))
    else:
        train(model, train_x, train_y, args.epochs)
        cache.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), cache)
    with torch.no_grad():  # the exported step computes what the trained cell computes
        frame, state = torch.randn(1, BANDS), torch.randn(1, HIDDEN)
        assert torch.allclose(model.step(model.inp(frame), state),
                              model.cell(model.inp(frame), state), atol=1e-6)
    path = args.out_dir / "vad.onnx"
    export_onnx(model, path)
    data_path = args.out_dir / "vad_data.npz"
    arrays: dict[str, Any] = {"calib_x/frame": calib_x[:, :, None, :],
                              "eval_x/frame": eval_x[:, :, None, :],
                              "eval_y/prob": eval_y.astype(np.int64)}
    np.savez_compressed(data_path, **arrays)
    print(f"wrote {path} ({path.stat().st_size / 2**10:.0f} KiB) and {data_path}; frame "
          f"accuracy {frame_accuracy(model, eval_x, eval_y):.2f}%")


if __name__ == "__main__":
    main()

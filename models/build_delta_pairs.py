"""Build pairs of model versions for the delta benchmark (benchmarks/delta_bench.py).

Each pair is a base version and the next version of the ViT benchmark model
(``build_bench_model.py``), as an operator would ship them:

- ``last_layer``: v1, then only the head fine-tuned (60 AdamW steps, lr 1e-4, the rest
  frozen);
- ``all_layers``: v1, then every layer fine-tuned a few steps (10 AdamW steps, lr 1e-4);
- ``pruned``: v1, then half of every weight matrix's smallest-magnitude weights set to 0;
- ``requantized``: v1 quantized to int8 (onnxruntime static QDQ) with one calibration set,
  then with another (the scales move, the int8 weights move by a step here and there).

Written to ``models/generated/delta/<case>/{base,target}.onnx`` (not committed), with the
trained v1 weights cached beside them. Needs the ``models`` extra (PyTorch 2.13.0 CPU);
about 3 minutes on 2 idle cores. Run: ``python models/build_delta_pairs.py``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import numpy as np
import torch
from build_bench_model import OUT_DIR, DigitsViT, export_onnx, train, upsample
from torch import nn
from train_digits import SEED, split_digits

DELTA_DIR = OUT_DIR / "delta"
CASES = ("last_layer", "all_layers", "pruned", "requantized")


def fine_tune(model: DigitsViT, x: np.ndarray, y: np.ndarray, steps: int,
              head_only: bool) -> DigitsViT:
    """A copy of ``model`` after ``steps`` AdamW steps (lr 1e-4) on batches of 16."""
    tuned = copy.deepcopy(model)
    params = list(tuned.head.parameters()) if head_only else list(tuned.parameters())
    for p in tuned.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(SEED + 1)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    tuned.train()
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (16,), generator=generator)
        loss = nn.functional.cross_entropy(tuned(inputs[batch]), labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return tuned


def pruned(model: DigitsViT, fraction: float = 0.5) -> DigitsViT:
    """A copy with the smallest ``fraction`` of each weight matrix's entries set to 0."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.dim() >= 2 and "position" not in name:
                cut = p.abs().flatten().kthvalue(int(p.numel() * fraction)).values
                p[p.abs() <= cut] = 0.0
    return out


def quantize(model: Path, out: Path, calib: np.ndarray) -> None:
    """int8 static QDQ quantization of ``model`` calibrated on ``calib``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def main() -> None:
    """Train v1 (or load its cached weights) and write every case's pair."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DELTA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    data = split_digits()
    train_x, calib_x = upsample(data["train_x"]), upsample(data["calib_x"])
    torch.manual_seed(SEED)
    v1 = DigitsViT()
    weights = out / "vit_v1.pt"
    if weights.exists():
        v1.load_state_dict(torch.load(weights))
    else:
        train(v1, train_x, data["train_y"], 4)
        torch.save(v1.state_dict(), weights)
    v1.eval()
    base = out / "vit_v1.onnx"
    export_onnx(v1, base)
    targets = {"last_layer": fine_tune(v1, train_x, data["train_y"], 60, head_only=True),
               "all_layers": fine_tune(v1, train_x, data["train_y"], 10, head_only=False),
               "pruned": pruned(v1)}
    for case, model in targets.items():
        (out / case).mkdir(exist_ok=True)
        shutil.copyfile(base, out / case / "base.onnx")
        model.eval()
        export_onnx(model, out / case / "target.onnx")
        print(f"{case}: written", flush=True)
    (out / "requantized").mkdir(exist_ok=True)
    half = len(calib_x) // 2
    quantize(base, out / "requantized" / "base.onnx", calib_x[:half])
    quantize(base, out / "requantized" / "target.onnx", calib_x[half:])
    print("requantized: written")


if __name__ == "__main__":
    main()

"""Cascade benchmark: the digits CNN in front of the ViT, against the ViT alone.

Both reference models classify the same digits (docs/models.md): the CNN takes the 8x8
images, the ViT the same images upsampled to 16x16. So that one request feeds both, the
ViT is given its upsampling as a first ONNX node (``Resize``, linear, half-pixel: the
interpolation ``models/build_bench_model.py`` used on its data); the benchmark prints the
ViT's accuracy both ways to show the wrapper changes nothing.

``compressor.composite.composite_report`` then chooses the cascade's threshold on the
evaluation split (fewest requests to the ViT at an accuracy at least the ViT's) and times
every variant request by request over the same rows, interleaved. Targets (issue 15):
cascade accuracy >= the ViT's, cascade mean latency <= 40% of the ViT's. The CNN alone is
more accurate than this ViT, so that target needs no ViT request at all;
``--target-accuracy`` sets a higher one (e.g. just above the CNN's) to see what the ViT
adds.

Needs ``models/generated/digits_vit.onnx`` (``python models/build_bench_model.py``).
Run::

    .venv/bin/python benchmarks/cascade_bench.py [--rows 540] [--target-accuracy 98.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.composite import composite_report  # noqa: E402
from compressor.runner import open_runner  # noqa: E402

CNN = ROOT / "models" / "digits_cnn.onnx"
CNN_DATA = ROOT / "models" / "digits_data.npz"
VIT = ROOT / "models" / "generated" / "digits_vit.onnx"
VIT_DATA = ROOT / "models" / "generated" / "digits_vit_data.npz"


def vit_on_8x8(source: Path, target: Path) -> None:
    """Write ``source`` with a first node that upsamples an 8x8 ``input`` to 16x16."""
    model = onnx.load(str(source))
    graph = model.graph
    (original,) = [i for i in graph.input if i.name == "input"]
    for node in graph.node:
        node.input[:] = ["upsampled" if name == "input" else name for name in node.input]
    graph.initializer.append(numpy_helper.from_array(
        np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32), "upsample_scales"))
    resize = helper.make_node("Resize", ["input", "", "upsample_scales"], ["upsampled"],
                              mode="linear", coordinate_transformation_mode="half_pixel")
    graph.node.insert(0, resize)
    batch = original.type.tensor_type.shape.dim[0]
    new_input = helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [batch.dim_param or batch.dim_value or None, 1, 8, 8])
    graph.input.remove(original)
    graph.input.insert(0, new_input)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def main() -> None:
    """Print the composite report and the two ratios the issue sets targets for."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=540, help="evaluation rows timed")
    parser.add_argument("--target-accuracy", type=float, default=None,
                        help="the cascade's accuracy target in percent (default: the ViT's)")
    args = parser.parse_args()
    if not VIT.is_file():
        sys.exit(f"{VIT} is missing; build it with: python models/build_bench_model.py")
    data, vit_data = np.load(CNN_DATA), np.load(VIT_DATA)
    labels = data["eval_y"]
    with tempfile.TemporaryDirectory() as tmp:
        wrapped = Path(tmp) / "digits_vit_8x8.onnx"
        vit_on_8x8(VIT, wrapped)
        vit_alone = open_runner(VIT).run({"input": vit_data["eval_x"]})["logits"]
        members = {"cnn": open_runner(CNN), "vit": open_runner(wrapped)}
        report = composite_report(members, {"input": data["eval_x"]}, labels, "logits",
                                  timed_rows=args.rows,
                                  target_accuracy=args.target_accuracy)
    print(f"ViT on its own 16x16 data: {np.mean(vit_alone.argmax(1) == labels) * 100:.2f}%; "
          f"wrapped, on 8x8: {report.members['vit'].accuracy:.2f}%")
    print(json.dumps(report.to_json(), indent=2))
    vit, cascade = report.members["vit"], report.cascade
    print(f"cascade accuracy {cascade.accuracy:.2f}% vs ViT {vit.accuracy:.2f}% "
          f"(difference {cascade.accuracy - vit.accuracy:+.2f} points); "
          f"{report.expensive_share * 100:.1f}% of requests sent to the ViT "
          f"(threshold {report.threshold:.4f}, target {report.target_accuracy:.2f}%)")
    print(f"cascade mean latency {cascade.mean_ms:.3f} ms vs ViT {vit.mean_ms:.3f} ms: "
          f"ratio {cascade.mean_ms / vit.mean_ms:.3f} (target <= 0.40)")


if __name__ == "__main__":
    main()

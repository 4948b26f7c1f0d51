"""Convert the reference digits ONNX model to TFLite with onnx2tf, and check the result.

The converter path is ONNX -> TensorFlow SavedModel -> TFLite (``onnx2tf``, which uses
TensorFlow's own TFLite converter). The input keeps the ONNX layout, NCHW ``[batch, 1, 8, 8]``
(``keep_ncw_or_nchw_or_ncdhw_input_names``), so both artifacts take the same tensors.

TensorFlow is heavy and pins its own numpy range, so this script runs in a separate virtual
environment, never in the project's::

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu onnx2tf onnx onnx-graphsurgeon sng4onnx \\
        psutil ai-edge-litert tf-keras onnxruntime
    /tmp/tfvenv/bin/python models/convert_tflite.py

Writes ``models/digits_cnn.tflite`` (float32, committed) after checking that it agrees with
onnxruntime on every evaluation sample.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx2tf
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter

HERE = Path(__file__).resolve().parent


def convert(onnx_path: Path, out_path: Path) -> None:
    """Run onnx2tf into a scratch folder and keep only its float32 .tflite."""
    with tempfile.TemporaryDirectory(prefix="onnx2tf-") as scratch:
        # onnx2tf simplifies its input model and overwrites the file in place: give it a copy.
        source = Path(scratch) / onnx_path.name
        shutil.copyfile(onnx_path, source)
        onnx2tf.convert(input_onnx_file_path=str(source), output_folder_path=scratch,
                        keep_ncw_or_nchw_or_ncdhw_input_names=["input"],
                        non_verbose=True)
        shutil.copyfile(Path(scratch) / f"{onnx_path.stem}_float32.tflite", out_path)


def check(onnx_path: Path, tflite_path: Path, data_path: Path) -> None:
    """Fail unless the TFLite model matches onnxruntime on the evaluation split."""
    data = np.load(data_path)
    x, y = data["eval_x"], data["eval_y"]
    reference = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"input": x})[0]
    interpreter = Interpreter(model_path=str(tflite_path), num_threads=1)
    detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    agree = float((got.argmax(1) == expected.argmax(1)).mean())
    diff = float(np.abs(got - expected).max())
    shape = [int(d) for d in detail["shape_signature"]]
    print(f"{tflite_path.name}: {tflite_path.stat().st_size} bytes, input {shape}, "
          f"accuracy {(got.argmax(1) == y).mean() * 100:.2f}%, "
          f"argmax agreement with onnxruntime {agree * 100:.2f}%, max |diff| {diff:.2e}")
    if agree < 0.99 or diff > 1e-3:
        raise SystemExit("conversion changed the model's outputs; not keeping it")


def main() -> None:
    """Convert and check; see the module docstring for the environment this needs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", type=Path, default=HERE / "digits_cnn.onnx")
    parser.add_argument("--data", type=Path, default=HERE / "digits_data.npz")
    parser.add_argument("--out", type=Path, default=HERE / "digits_cnn.tflite")
    args = parser.parse_args()
    convert(args.onnx, args.out)
    check(args.onnx, args.out, args.data)


if __name__ == "__main__":
    main()

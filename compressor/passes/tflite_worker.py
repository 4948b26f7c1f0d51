"""The TFLite conversions themselves, run in a child process by ``compressor.passes.tflite``.

``python -m compressor.passes.tflite_worker REQUEST.json`` reads what to convert (written by
:func:`compressor.passes.tflite.run_worker`), converts, and writes ``result.json`` beside the
request. Two tasks: ``to_tflite`` (ONNX -> SavedModel -> each TFLite variant) and ``to_onnx``
(a TFLite file -> ONNX, with tf2onnx, for a ``.tflite`` model given to the compressor). Exit
status 0 on success (single variants may still have failed: they are listed under
``skipped``), 3 when TensorFlow/onnx2tf/tf2onnx do not import, anything else when the model
cannot be converted at all. Everything it prints is the converter's log.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compressor.dataset import load_calls
from compressor.errors import first_line as _first_line
from compressor.passes.tflite import EXIT_UNAVAILABLE, TFLITE_VARIANTS

_INTEGER_KINDS = "iub"  # numpy dtype kinds: signed, unsigned, bool


def main(argv: list[str]) -> int:
    """Convert as REQUEST.json (``argv[0]``) says; see the module docstring."""
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    workdir = Path(request["workdir"])
    if request["task"] == "to_onnx":
        try:
            import tf2onnx  # noqa: F401  (a broken install fails here, in one place)
        except ImportError as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
            return EXIT_UNAVAILABLE
        result = _tflite_to_onnx(Path(request["model"]), workdir)
    else:
        import onnx

        # A file onnx cannot read fails here, before TensorFlow's seconds-long import.
        onnx.load(request["model"], load_external_data=False)
        try:
            import onnx2tf  # noqa: F401
            import tensorflow  # noqa: F401
        except ImportError as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
            return EXIT_UNAVAILABLE
        result = _to_tflite(request, workdir)
    (workdir / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def _to_tflite(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import tensorflow as tf

    model = Path(request["model"])
    calibration = load_calls(Path(request["calibration"])) if request["calibration"] else None
    saved_model, notes = _to_saved_model(model, request["input_names"], workdir)
    artifacts, skipped = [], {}
    for variant in request["variants"]:
        try:
            artifacts.append(_convert_variant(
                tf, saved_model, variant, stem=model.stem, workdir=workdir,
                input_names=request["input_names"], output_names=request["output_names"],
                calibration=calibration, notes=notes))
        except Exception as exc:  # the converter raises assorted errors per variant
            traceback.print_exc()
            skipped[variant] = _first_line(exc)
    return {"artifacts": artifacts, "skipped": skipped}


def _tflite_to_onnx(model: Path, workdir: Path) -> dict[str, Any]:
    """tf2onnx's translation of a TFLite file, at opset 17."""
    import tf2onnx

    out = workdir / f"{model.stem}.from-tflite.onnx"
    tf2onnx.convert.from_tflite(str(model), opset=17, output_path=str(out))
    return {"path": str(out),
            "notes": [f"translated from TFLite by tf2onnx {_version('tf2onnx')} (opset 17)"]}


def _to_saved_model(model: Path, input_names: list[str],
                    workdir: Path) -> tuple[Path, list[str]]:
    """The SavedModel onnx2tf makes of ``model``, and notes on what it changed."""
    import onnx
    import onnx2tf

    # onnx2tf rewrites its input file in place: give it a copy.
    source = workdir / f"{model.stem}.onnx2tf-input.onnx"
    shutil.copyfile(model, source)
    graph = onnx.load(str(model), load_external_data=False).graph
    # Float image-like inputs (rank 3-5) keep the ONNX layout, so artifacts take the ONNX
    # tensors; token ids and other integer inputs have no channels to move.
    channels_first = [i.name for i in graph.input if i.name in input_names
                      and len(i.type.tensor_type.shape.dim) in {3, 4, 5}
                      and i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    notes = [f"onnx2tf {_version('onnx2tf')} (onnxsim {_version('onnxsim')}), TensorFlow "
             f"{_version('tensorflow')} converter"]
    notes += _simplify(source)
    if channels_first:
        notes.append(f"{', '.join(channels_first)} kept in the ONNX layout (channels first); "
                     "TFLite's channels-last layout starts inside the model")
    # TFLite has no Erf builtin (exported GELU uses it); onnx2tf's pseudo Erf builds it from
    # builtin ops, which the device runtimes have, instead of a Flex op, which they do not.
    pseudo = ["erf"] if any(n.op_type == "Erf" for n in graph.node) else []
    if pseudo:
        notes.append("Erf computed by builtin ops (onnx2tf pseudo Erf, an approximation)")
    out = workdir / "saved_model"
    onnx2tf.convert(
        input_onnx_file_path=str(source), output_folder_path=str(out),
        # Keep NCW/NCHW/NCDHW inputs as they are, so artifacts take the ONNX tensors.
        keep_ncw_or_nchw_or_ncdhw_input_names=channels_first or None,
        replace_to_pseudo_operators=pseudo, output_signaturedefs=True, non_verbose=True,
        not_use_onnxsim=True)  # done once above; onnx2tf would run its command three times
    if not (out / "saved_model.pb").is_file():
        raise RuntimeError("onnx2tf wrote no SavedModel")
    return out, notes


def _simplify(path: Path) -> list[str]:
    """Simplify the model in place with onnxsim; notes only when that did not happen.

    onnxsim folds shape arithmetic (Shape -> Slice -> Concat -> Reshape, as in exported
    attention) that onnx2tf cannot convert with a dynamic batch.
    """
    import onnx

    try:
        import onnxsim
    except ImportError:
        return ["onnxsim not installed: the graph was converted without simplification"]
    try:
        simplified, checked = onnxsim.simplify(onnx.load(str(path)))
    except Exception as exc:  # onnxsim raises assorted errors on graphs it cannot fold
        return [f"onnxsim failed ({_first_line(exc)}); converted without simplification"]
    if not checked:
        return ["onnxsim could not verify its simplification; converted without it"]
    onnx.save(simplified, str(path))
    return []


def _convert_variant(tf: Any, saved_model: Path, variant: str, *, stem: str, workdir: Path,
                     input_names: list[str], output_names: list[str],
                     calibration: list[dict[str, np.ndarray]] | None,
                     notes: list[str]) -> dict[str, Any]:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    # Builtins only: the runtimes on devices (ai-edge-litert, tflite-runtime) have no Flex
    # delegate, so a TensorFlow op left in the model would fail at load on the device.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    notes = list(notes)
    if variant != "tflite-fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "tflite-fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant in {"tflite-int8-static", "tflite-int8-full"}:
        if calibration is None:
            raise ValueError(f"{variant} needs calibration data")
        converter.representative_dataset = _representative(tf, saved_model, calibration,
                                                            input_names)
        notes.append(f"calibration: min-max over {len(calibration)} calls, per-channel "
                     "weights")
        if variant == "tflite-int8-full":
            # Integer kernels only, and integer inputs and outputs. The converter may still
            # leave float ops it could not quantize, hence the check of every tensor below.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    data = _rename_io(bytes(converter.convert()), input_names, output_names)
    path = workdir / f"{stem}.{variant}.tflite"
    path.write_bytes(data)
    quantization = None
    if variant == "tflite-int8-full":
        interpreter = _interpreter(path)
        floats = [str(t["name"]) for t in interpreter.get_tensor_details()
                  if np.dtype(t["dtype"]).kind not in _INTEGER_KINDS]
        if floats:
            raise ValueError(f"int8-full model still has float tensors: {', '.join(floats[:5])}")
        quantization = {"inputs": [_describe(d) for d in interpreter.get_input_details()],
                        "outputs": [_describe(d) for d in interpreter.get_output_details()]}
        notes += [f"{io[:-1]} {t['name']}: {t['dtype']} scale={t['scale']:.6g} "
                  f"zero_point={t['zero_point']}"
                  for io in ("inputs", "outputs") for t in quantization[io]]
    return {"name": variant, "dtype": TFLITE_VARIANTS[variant], "path": str(path),
            "notes": notes, "io_quantization": quantization}


def _representative(tf: Any, saved_model: Path, calibration: list[dict[str, np.ndarray]],
                    input_names: list[str]) -> Any:
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    keys = _signature_keys(list(signature.structured_input_signature[1]), input_names)

    def samples() -> Iterator[dict[str, np.ndarray]]:
        for call in calibration:
            yield {key: call[name] for name, key in keys.items()}

    return samples


def _signature_keys(keys: list[str], input_names: list[str]) -> dict[str, str]:
    """ONNX input name -> the SavedModel signature's key for it.

    onnx2tf keeps ONNX names, made into Python identifiers (``input.1`` -> ``input_1``);
    a name that does not match that way goes by position.
    """
    def plain(name: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in name).lower()

    by_plain = {plain(k): k for k in keys}
    return {name: by_plain.get(plain(name), keys[i] if i < len(keys) else name)
            for i, name in enumerate(input_names)}


def _rename_io(data: bytes, input_names: list[str], output_names: list[str]) -> bytes:
    """Give the model's input and output tensors the ONNX names."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = model.subgraphs[0]
    # Inputs: through the signature's keys (onnx2tf's names for the ONNX inputs); outputs:
    # the SavedModel names them output_0, output_1... in ONNX order, and the flatbuffer's
    # output list may be sorted differently, so map through the signature's tensor indices.
    by_index: dict[int, str] = {}
    for signature in model.signatureDefs or []:
        keys = [i.name.decode() for i in signature.inputs or []]
        names = {key: name for name, key in _signature_keys(keys, input_names).items()}
        for entry in signature.inputs or []:
            name = names.get(entry.name.decode())
            if name is not None:
                by_index[entry.tensorIndex] = name
                entry.name = name.encode()
        for output in signature.outputs or []:
            key = output.name.decode()
            position = int(key.rsplit("_", 1)[1]) if key.startswith("output_") else -1
            if 0 <= position < len(output_names):
                by_index[output.tensorIndex] = output_names[position]
                output.name = output_names[position].encode()
    for index in [*graph.inputs, *graph.outputs]:
        if index in by_index:
            graph.tensors[index].name = by_index[index].encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _describe(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail["quantization"]
    return {"name": str(detail["name"]), "dtype": np.dtype(detail["dtype"]).name,
            "scale": float(scale), "zero_point": int(zero_point)}


def _interpreter(path: Path) -> Any:
    from firmware_profiles.runtimes import import_litert

    litert = import_litert()
    if litert is None:
        raise RuntimeError("no LiteRT runtime is installed to check the model; "
                           "install 'ai-edge-litert'")
    interpreter = litert.interpreter.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    return interpreter


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

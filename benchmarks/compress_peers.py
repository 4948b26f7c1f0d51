"""The peers' standard post-training quantization, one tool per run, for compress_bench.py.

Runs in whichever Python has the tool: onnxruntime's quantizers in the project's virtual
environment, Microsoft Olive and Intel Neural Compressor in their own (they pin other
versions of numpy and torch; see compress_bench.py). It imports only numpy, onnx,
onnxruntime and the tool, never the project::

    python benchmarks/compress_peers.py TOOL MODEL.onnx CALLS.npz OUT.onnx

TOOL: ``ort-dynamic`` (``quantize_dynamic``, defaults), ``ort-static``
(``quant_pre_process``, then ``quantize_static``: QDQ, per-channel, min-max), ``olive-dynamic``
/ ``olive-static`` (Olive's OnnxDynamicQuantization / OnnxStaticQuantization passes, defaults),
``inc-dynamic`` / ``inc-static`` (Neural Compressor's ``quantize`` with its default
DynamicQuantConfig / StaticQuantConfig). CALLS.npz holds calibration calls as
``<call number>/<input name>`` arrays (compressor.dataset.save_calls), the same calls
edgefleet calibrates with. Exit status 0 when OUT.onnx was written.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def load_calls(path: Path) -> list[dict[str, np.ndarray]]:
    """The calibration calls, in order (the format of compressor.dataset.save_calls)."""
    calls: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            number, _, name = key.partition("/")
            calls.setdefault(number, {})[name] = npz[key]
    return [calls[k] for k in sorted(calls)]


class Reader:
    """onnxruntime's CalibrationDataReader protocol over the calls (also what Olive and
    Neural Compressor take)."""

    def __init__(self, calls: list[dict[str, np.ndarray]]) -> None:
        self.calls = calls
        self._iter: Iterator[dict[str, np.ndarray]] = iter(calls)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.calls)


def ort(tool: str, model: Path, calls: list[dict[str, np.ndarray]], out: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if tool == "ort-dynamic":
        quantize_dynamic(str(model), str(out))
        return

    class OrtReader(Reader, CalibrationDataReader):  # type: ignore[misc]
        pass

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared))
        quantize_static(str(prepared), str(out), OrtReader(calls), quant_format=QuantFormat.QDQ,
                        per_channel=True)


def olive(tool: str, model: Path, calls: list[dict[str, np.ndarray]], out: Path) -> None:
    from olive.workflows import run

    with tempfile.TemporaryDirectory() as tmp:
        passes: dict[str, Any] = {"quant": {"type": "OnnxDynamicQuantization"}}
        config: dict[str, Any] = {
            "input_model": {"type": "ONNXModel", "model_path": str(model)},
            "systems": {"local": {"type": "LocalSystem", "accelerators": [
                {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
            "host": "local", "target": "local", "output_dir": str(Path(tmp) / "out"),
            "cache_dir": str(Path(tmp) / "cache"), "log_severity_level": 3,
            "evaluate_input_model": False}
        if tool == "olive-static":
            script = Path(tmp) / "olive_data.py"
            arrays: dict[str, Any] = {f"{i:06d}/{n}": v for i, c in enumerate(calls)
                                      for n, v in c.items()}
            np.savez(Path(tmp) / "calls.npz", **arrays)
            script.write_text(_OLIVE_SCRIPT.format(calls=Path(tmp) / "calls.npz"))
            config["data_configs"] = [{
                "name": "calib", "user_script": str(script),
                "load_dataset_config": {"type": "calls_dataset"},
                "dataloader_config": {"type": "calls_dataloader"}}]
            passes = {"quant": {"type": "OnnxStaticQuantization", "data_config": "calib"}}
        config["passes"] = passes
        run(config)
        found = sorted(Path(tmp, "out").rglob("*.onnx"))
        if not found:
            raise RuntimeError(f"Olive wrote no model; its output: "
                               f"{json.dumps([str(p) for p in Path(tmp).rglob('*')][:20])}")
        shutil.copyfile(found[0], out)


_OLIVE_SCRIPT = '''
import numpy as np
from olive.data.registry import Registry


@Registry.register_dataset()
def calls_dataset(data_dir=None, **kwargs):
    calls = {{}}
    with np.load("{calls}") as npz:
        for key in npz.files:
            number, _, name = key.partition("/")
            calls.setdefault(number, {{}})[name] = npz[key]
    return [(calls[k], 0) for k in sorted(calls)]


@Registry.register_dataloader()
def calls_dataloader(dataset, batch_size=1, **kwargs):
    return dataset
'''


def inc(tool: str, model: Path, calls: list[dict[str, np.ndarray]], out: Path) -> None:
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import config, quantize

    if tool == "inc-dynamic":
        quantize(str(model), str(out), config.DynamicQuantConfig())
        return

    class IncReader(Reader, data_reader.CalibrationDataReader):  # type: ignore[misc]
        pass

    quantize(str(model), str(out), config.StaticQuantConfig(IncReader(calls)))


def main(argv: list[str]) -> int:
    """Quantize as the arguments say (see the module docstring)."""
    tool, model, calls_path, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    calls = load_calls(calls_path)
    runners = {"ort": ort, "olive": olive, "inc": inc}
    runners[tool.split("-")[0]](tool, model, calls, out)
    if not out.is_file():
        return 1
    single_file(out)
    return 0


def single_file(path: Path) -> None:
    """Fold external weight files (Neural Compressor writes them) into the model, so every
    artifact's size is one file's size, as edgefleet's."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    externals = {e.value for i in graph.initializer for e in i.external_data
                 if e.key == "location"}
    proto = onnx.load(str(path))
    onnx.save(proto, str(path), save_as_external_data=False)
    for name in externals:
        (path.parent / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

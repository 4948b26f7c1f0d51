"""What the local APIs (HTTP and gRPC) say about models: metadata, repository index,
statistics, as protocol-shaped dicts built from the runtime. Shared so both protocols
answer alike; each encodes the dicts its own way."""

from __future__ import annotations

from typing import Any

from .runtime import Runtime, ServedModel
from .sessions import TensorInfo
from .tensors import DATATYPE_OF

__all__ = ["model_metadata", "model_statistics", "repository_index"]

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}


def repository_index(runtime: Runtime) -> list[dict[str, str]]:
    """Every served model as a repository index entry."""
    # Every served model is loaded, self-tested and warmed up: READY, in Triton's words.
    return [{"name": info.name, "version": str(info.version or 1), "state": "READY",
             "reason": ""} for info in runtime.models()]


def model_statistics(served: ServedModel) -> dict[str, Any]:
    """One model's entry of Triton's statistics extension. The agent runs each request as
    one execution on its connection's thread (no queue, no server-side batching), so
    inference and execution counts are both the successful requests and ``compute_infer``
    is the time in the runtime."""
    totals = served.stats.totals()
    success = {"count": totals.successes, "ns": round(totals.success_s * 1e9)}
    return {"name": served.name, "version": str(served.version or 1),
            "last_inference": 0 if totals.last_at is None else int(totals.last_at * 1e3),
            "inference_count": totals.successes, "execution_count": totals.successes,
            "inference_stats": {"success": success, "compute_infer": success,
                                "fail": {"count": totals.failures,
                                         "ns": round(totals.failure_s * 1e9)}},
            "batch_stats": []}


def model_metadata(runtime: Runtime, name: str) -> dict[str, Any]:
    """The model metadata of the served model ``name``, with edgefleet's parameters."""
    info = runtime.model(name)

    def tensors(infos: tuple[TensorInfo, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": DATATYPE_OF.get(t.dtype, t.dtype.upper()),
                 "shape": [-1 if d is None else d for d in t.shape]} for t in infos]

    return {"name": info.name, "versions": [str(info.version or 1)],
            "platform": _PLATFORMS.get(info.backend.split(":", 1)[0], info.backend),
            "inputs": tensors(info.inputs), "outputs": tensors(info.outputs),
            "parameters": {"backend": info.backend, "device": info.device,
                           "fallback": info.fallback, "state": info.state,
                           "source": info.source}}

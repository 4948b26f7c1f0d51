"""The local inference API over gRPC: KServe v2's ``inference.GRPCInferenceService``.

Beside the HTTP API, off unless ``api.grpc_port`` is set (``serve --grpc-port``); the
optional ``agent-grpc`` extra installs it. The service and its messages are Triton's
(``tritonclient.grpc.service_pb2``), a superset of KServe v2's with the same field numbers,
so ``tritonclient.grpc`` and KServe's clients work unchanged. Implemented: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (typed contents or
``raw_input_contents``; outputs always as ``raw_output_contents``), RepositoryIndex and
ModelStatistics; any other RPC answers UNIMPLEMENTED.

Same rules as HTTP: the liveness and readiness RPCs are open, every other needs the
``authorization: Bearer <token>`` metadata (UNAUTHENTICATED otherwise); a message over
``api.limits.max_body_bytes`` is refused by gRPC itself, a batch or input size over its
limit is RESOURCE_EXHAUSTED before any array is made (:func:`~.tensors.declared_tensor`),
a bad request INVALID_ARGUMENT, an unknown model NOT_FOUND, a failing model INTERNAL.
Metadata, index and statistics come from :mod:`.api_views`, as HTTP's do.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any, TypeVar

import numpy as np

from . import __version__
from .api_views import model_metadata, model_statistics, repository_index
from .config import ApiLimits
from .errors import (
    AgentError,
    InvalidInputError,
    ModelNotFoundError,
    RequestTooLargeError,
)
from .runtime import Runtime, ServedModel
from .tensors import DATATYPE_OF, declared_tensor

try:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError as exc:  # the agent-grpc extra is not installed
    raise ImportError("the gRPC API needs the agent-grpc extra: pip install "
                      "'edgefleet[agent-grpc]'") from exc

__all__ = ["GrpcServer"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Typed contents field of InferTensorContents per datatype (FP16 travels only raw).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents"}


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The RPCs over a runtime."""

    def __init__(self, runtime: Runtime, token: str | None, limits: ApiLimits) -> None:
        self.runtime = runtime
        self.token = token
        self.limits = limits

    # -- open --------------------------------------------------------------------------

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=bool(self.runtime.models()))

    # -- with the token ----------------------------------------------------------------

    def ModelReady(self, request: Any, context: Any) -> Any:
        return self._call(context, lambda: pb.ModelReadyResponse(
            ready=self._served(request.name, request.version) is not None))

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self._call(context, lambda: pb.ServerMetadataResponse(
            name="edgefleet-agent", version=__version__,
            extensions=["binary_tensor_data", "model_repository", "statistics", "edgefleet"]))

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            served = self._served(request.name, request.version)
            meta = model_metadata(self.runtime, served.name)
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t)
                         for t in meta["outputs"]])
        return self._call(context, answer)

    def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return self._call(context, lambda: pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(**entry)
            for entry in repository_index(self.runtime)]))

    def ModelStatistics(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            if request.name:
                served = [self._served(request.name, request.version)]
            else:
                served = [self.runtime.served(m.name) for m in self.runtime.models()]
            return pb.ModelStatisticsResponse(model_stats=[_statistics(s) for s in served])
        return self._call(context, answer)

    def ModelInfer(self, request: Any, context: Any) -> Any:
        def answer() -> Any:
            served = self._served(request.model_name, request.model_version)
            feeds = _decode_inputs(request, served, self.limits)
            wanted = [o.name for o in request.outputs] or served.output_names
            unknown = [n for n in wanted if n not in served.output_names]
            if unknown:
                raise InvalidInputError(f"requested output {unknown[0]!r} does not exist; "
                                        f"the model outputs {', '.join(served.output_names)}")
            outputs = served.run(feeds)
            response = pb.ModelInferResponse(model_name=served.name,
                                             model_version=str(served.version or 1),
                                             id=request.id)
            for name in wanted:
                array = np.ascontiguousarray(outputs[name])
                response.outputs.append(pb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype=DATATYPE_OF[array.dtype.name],
                    shape=list(array.shape)))
                response.raw_output_contents.append(
                    array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            return response
        return self._call(context, answer)

    # -- plumbing ----------------------------------------------------------------------

    def _served(self, name: str, version: str) -> ServedModel:
        served = self.runtime.served(name)
        if version and version != str(served.version or 1):
            raise ModelNotFoundError(f"model {name} serves version {served.version or 1}, "
                                     f"not {version}")
        return served

    def _call(self, context: Any, answer: Callable[[], _T]) -> _T:
        """``answer()`` after the token check, with our errors as gRPC status codes."""
        if self.token is not None:
            header = dict(context.invocation_metadata()).get("authorization", "")
            scheme, _, value = str(header).partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), self.token.encode()):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer "
                              "token; send the metadata 'authorization: Bearer <token>' with "
                              "the token from the agent's token file")
        try:
            return answer()
        except ModelNotFoundError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except RequestTooLargeError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except InvalidInputError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AgentError as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
        raise AssertionError("context.abort raises")


def _decode_inputs(request: Any, served: ServedModel, limits: ApiLimits,
                   ) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw_input_contents for {len(request.inputs)} "
                                "inputs; send one per input or none")
    feeds: dict[str, np.ndarray] = {}
    total = 0
    for number, tensor in enumerate(request.inputs):
        where = f"input {tensor.name!r}" if tensor.name else f"inputs[{number}]"
        declared = declared_tensor(where, tensor.name, tensor.datatype, list(tensor.shape),
                                   expected=served.session.inputs, limits=limits, total=total)
        total += declared.nbytes
        dtype = np.dtype(declared.dtype)
        if raw:
            if len(raw[number]) != declared.nbytes:
                raise InvalidInputError(f"{where}: {len(raw[number])} raw bytes do not fit "
                                        f"shape {declared.shape} of {tensor.datatype}")
            array = np.frombuffer(raw[number], dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            field = _CONTENTS.get(tensor.datatype)
            values = getattr(tensor.contents, field) if field else ()
            if len(values) != declared.count:
                raise InvalidInputError(f"{where}: {len(values)} values in contents for "
                                        f"shape {declared.shape} of {tensor.datatype}")
            array = np.asarray(values, dtype=dtype)
        feeds[declared.name] = array.reshape(declared.shape)
    return feeds


def _statistics(served: ServedModel) -> Any:
    stats = model_statistics(served)
    durations = {key: pb.StatisticDuration(**value)
                 for key, value in stats["inference_stats"].items()}
    return pb.ModelStatistics(
        name=stats["name"], version=stats["version"], last_inference=stats["last_inference"],
        inference_count=stats["inference_count"], execution_count=stats["execution_count"],
        inference_stats=pb.InferStatistics(**durations))


class GrpcServer:
    """The gRPC API on ``host:port`` over ``runtime``; start() and stop()."""

    def __init__(self, runtime: Runtime, host: str, port: int, token: str | None,
                 limits: ApiLimits) -> None:
        options: Mapping[str, int] = {
            "grpc.max_receive_message_length": limits.max_body_bytes,
            "grpc.max_send_message_length": limits.max_body_bytes,
            "grpc.max_concurrent_streams": limits.max_connections}
        self._server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=limits.max_connections, thread_name_prefix="edgefleet-grpc"),
            options=list(options.items()), maximum_concurrent_rpcs=limits.max_connections)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            _Servicer(runtime, token, limits), self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise AgentError(f"cannot listen for gRPC on {address} ({exc}); choose another "
                             "--grpc-port") from exc
        if self.port == 0:
            raise AgentError(f"cannot listen for gRPC on {address}; is another agent running? "
                             "choose another --grpc-port")

    def start(self) -> None:
        """Serve in background threads."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving; in-flight calls get a second to finish."""
        self._server.stop(grace=1.0).wait()

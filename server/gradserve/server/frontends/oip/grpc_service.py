"""``inference.GRPCInferenceService`` (the OIP over gRPC) on the server's gRPC port.

Registered as a generic handler with the private-pool classes of ``_messages``: the protocol's
``_pb2_grpc`` module would bind the default pool's classes (see ``_messages``). Tensors come in
``raw_input_contents`` or ``contents`` and go back in ``raw_output_contents``; or, with the
``shared_memory_*`` parameters, in registered system shared-memory regions, as Triton has it:
``raw_input_contents`` then holds only the other inputs, and an output written into a region
keeps its place in ``raw_output_contents`` with an empty entry.
"""
from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.frontends import rawbytes
from gradserve.server.frontends.oip import _messages as _m
from gradserve.server.frontends.oip.frontend import SERVER_NAME, InferenceFrontEnd
from gradserve.server.frontends.oip.translate import InferInput, InferRequest, datatype_of, shared_memory_ref
from gradserve.server.ops.status import status_for

__all__ = ["InferenceServicer", "OPEN_METHODS"]

PROTOCOL = "oip-grpc"
_INFER_REQUEST = _m.message_class("ModelInferRequest")
#: Methods answered without a bearer token, like the gRPC health service: probes.
OPEN_METHODS = (f"/{_m.SERVICE}/ServerLive", f"/{_m.SERVICE}/ServerReady")

#: The ``InferTensorContents`` field of each datatype (FP16 and BF16 travel raw only).
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
             "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameters(params: Any, field: str) -> dict[str, Any]:
    out = {}
    for name, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidArgumentError(f"{field}[{name[:64]!r}]: has no value")
        out[name] = getattr(value, choice)
    return out


def decode_request(request: Any) -> InferRequest:
    """An ``InferRequest`` of a ModelInferRequest (raw or typed contents, or shared memory)."""
    raw = request.raw_input_contents
    shared = [shared_memory_ref(_parameters(t.parameters, f"inputs[{t.name[:128]!r}].parameters"),
                                f"inputs[{t.name[:128]!r}]") if t.parameters else None for t in request.inputs]
    expected = sum(ref is None for ref in shared)
    if raw and len(raw) != expected:
        raise InvalidArgumentError(f"raw_input_contents: {len(raw)} entries for {expected} inputs not in shared memory")
    inputs = []
    next_raw = 0
    for tensor, ref in zip(request.inputs, shared):
        if ref is not None:
            if tensor.HasField("contents"):
                raise InvalidArgumentError(f"inputs[{tensor.name[:128]!r}]: has contents although it is in shared "
                                           "memory")
            inputs.append(InferInput(tensor.name, tensor.datatype, tensor.shape, shared_memory=ref))
            continue
        values = None
        if tensor.HasField("contents"):
            if raw:
                raise InvalidArgumentError(f"inputs[{tensor.name[:128]!r}]: has contents although the request "
                                           "uses raw_input_contents")
            name = _CONTENTS.get(tensor.datatype)
            if name is None:
                raise InvalidArgumentError(f"inputs[{tensor.name[:128]!r}].contents: {tensor.datatype[:32]} "
                                           "travels only in raw_input_contents")
            values = getattr(tensor.contents, name)
        inputs.append(InferInput(tensor.name, tensor.datatype, tensor.shape, raw[next_raw] if raw else None, values))
        next_raw += 1
    output_shared = {}
    for o in request.outputs:
        if o.parameters:
            ref = shared_memory_ref(_parameters(o.parameters, f"outputs[{o.name[:128]!r}].parameters"),
                                    f"outputs[{o.name[:128]!r}]")
            if ref is not None:
                output_shared[o.name] = ref
    return InferRequest(request.model_name, request.model_version, request.id,
                        _parameters(request.parameters, "parameters"), inputs,
                        [o.name for o in request.outputs], output_shared)


def encode_response(model: str, version: int, request_id: str, tensors: list[tuple[str, np.ndarray]],
                    shared: frozenset[str] = frozenset()) -> Any:
    """A ModelInferResponse holding ``tensors`` in ``raw_output_contents`` (those in ``shared``, written
    into shared memory, with an empty entry)."""
    resp = _m.ModelInferResponse(model_name=model, model_version=str(version), id=request_id)
    for name, arr in tensors:
        resp.outputs.add(name=name, datatype=datatype_of(arr.dtype), shape=arr.shape)
        if name in shared:
            resp.raw_output_contents.append(b"")
            continue
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        resp.raw_output_contents.append(arr.tobytes())
    return resp


class InferenceServicer:
    """The RPCs of ``inference.GRPCInferenceService`` (the repository RPCs are UNIMPLEMENTED)."""

    def __init__(self, frontend: InferenceFrontEnd) -> None:
        self._fe = frontend

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _m.ServerLiveResponse(live=self._fe.live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _m.ServerReadyResponse(ready=self._fe.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return _m.ModelReadyResponse(ready=self._fe.model_ready(request.name, request.version))
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await context.abort(*status_for(exc))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _m.ServerMetadataResponse(name=SERVER_NAME, version=self._fe.version, extensions=self._fe.extensions)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            meta = self._fe.model_metadata(request.name, request.version)
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await context.abort(*status_for(exc))
        tensor = _m.ModelMetadataResponse.TensorMetadata
        return _m.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs])

    async def ModelInfer(self, data: bytes, context: grpc.aio.ServicerContext) -> Any:
        with self._fe.envelope.open(PROTOCOL, "ModelInfer", context.time_remaining()) as call:
            request = decode_request(rawbytes.parse(_INFER_REQUEST, data))
            result, tensors = await self._fe.infer(call, request, len(data))
            return encode_response(result.model, result.version, request.id, tensors,
                                   frozenset(request.output_shared_memory))
        await context.abort(call.code, call.message)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a ``grpc.aio`` server."""
        names = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata")
        handlers = {
            # Requests parsed by our code: malformed bytes are INVALID_ARGUMENT, not UNKNOWN.
            name: rawbytes.unary_unary(getattr(self, name), _m.message_class(f"{name}Request"),
                                       _m.message_class(f"{name}Response").SerializeToString)
            for name in names}
        # ModelInfer parses its bytes inside its call, so malformed ones count in the metrics too.
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            self.ModelInfer, response_serializer=_m.message_class("ModelInferResponse").SerializeToString)
        return grpc.method_handlers_generic_handler(_m.SERVICE, handlers)

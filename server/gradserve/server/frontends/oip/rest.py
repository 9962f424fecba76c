"""The OIP over HTTP/REST (``/v2/...``): a Starlette app served by uvicorn on the server's event loop.

JSON tensors and Triton's binary tensor extension: a body may start with a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw bytes of the inputs that carry a
``binary_data_size`` parameter, in order; outputs asked for with ``binary_data`` (or every
output, with the request parameter ``binary_data_output``) come back the same way.
tritonclient.http uses it by default.

Errors are an HTTP status and ``{"error": "..."}``; the status follows from the gRPC code the
native API gives the same failure (``HTTP_STATUS``). With ``--auth-token-file`` every route but
``/v2/health/*`` needs ``Authorization: Bearer <token>``.

What a request may cost before it is computed is bounded: its headers, the time it takes to
arrive and the connections open are the protocol's (``connections``); an inference's body is
held against the memory budget as it is read (``Content-Length`` before the first byte) and its
JSON decoded in steps that let the event loop run (``jsonbody``), each array's bytes held before
it is allocated. A client that goes away mid-body is logged once a minute with a count.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import mmap
import socket
import ssl
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gradserve.server.config import Limits
from gradserve.server.core.errors import CancelledError, InvalidArgumentError, ResourceExhaustedError
from gradserve.server.frontends.oip import jsonbody, shared_memory
from gradserve.server.frontends.oip.connections import Reporter, protocol_class
from gradserve.server.frontends.oip.frontend import SERVER_NAME, InferenceFrontEnd
from gradserve.server.frontends.oip.translate import (
    DATATYPES,
    InferInput,
    InferRequest,
    datatype_of,
    dims,
    shared_memory_ref,
)
from gradserve.server.frontends.tensors import check_shape
from gradserve.server.ops import auth
from gradserve.server.ops.budget import MemoryBudget
from gradserve.server.ops.status import status_for

__all__ = ["create_app", "RestServer", "HTTP_STATUS", "HEADER_LENGTH"]

_log = logging.getLogger("gradserve.server")

PROTOCOL = "oip-rest"
#: The header giving the length of the JSON part of a body with binary tensors.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: HTTP status of each gRPC status code.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class _TooLarge(ResourceExhaustedError):
    """A body over the size limit; answered 413 before it is read."""


#: Requests whose client went away before its body was read (logged once a minute).
_ABANDONED = Reporter("HTTP requests abandoned by their client before the whole body arrived")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status(code: grpc.StatusCode, message: str) -> JSONResponse:
    return _error(HTTP_STATUS.get(code, 500), message)


class _Hold:
    """Bytes held against the memory budget by one request while its body is read and decoded."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    def grow(self, total: int) -> None:
        """Hold ``total`` bytes in all; ResourceExhaustedError past the budget (a request that
        holds all that is held is admitted, as a lone request is)."""
        extra = total - self.held
        if extra <= 0:
            return
        budget = self._budget
        try:
            budget.take(extra)
        except ResourceExhaustedError:
            if not self.held or budget.held != self.held:
                raise
            budget.give(self.held)
            self.held = 0
            budget.take(total)
        self.held = total

    def reserve(self, nbytes: int) -> None:
        """Hold ``nbytes`` more."""
        self.grow(self.held + nbytes)

    def release(self) -> None:
        if self.held:
            self._budget.give(self.held)
            self.held = 0


def _length(value: str, name: str) -> int:
    """A header's length in bytes; InvalidArgumentError when it is not ASCII digits (at most 18)."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise InvalidArgumentError(f"{name}: {value[:32]!r} is not a length in bytes")
    return int(value)


#: A declared body of at least this many bytes is read into a mapping of its own, whose pages
#: the system takes back when it is freed (heap memory freed by a large body stayed resident).
_MAPPED_BYTES = 1 << 20


async def _body(request: Request, limit: int, hold: _Hold) -> bytes | bytearray | mmap.mmap:
    """The request body, refused with 413 past ``limit`` bytes (before reading it when declared),
    held against the memory budget before it is read (as it grows when its length is not declared)."""
    header = request.headers.get("content-length")
    declared = None if header is None else _length(header, "Content-Length")
    if declared is not None:
        if declared > limit:
            raise _TooLarge(f"request: the body of {declared} bytes exceeds the limit of {limit}")
        hold.grow(declared)
    body: bytearray | mmap.mmap = mmap.mmap(-1, declared) if declared and declared >= _MAPPED_BYTES else bytearray()
    size = 0
    try:
        async for chunk in request.stream():
            if isinstance(body, bytearray):
                body += chunk
            else:   # the parser keeps a body to its declared length
                body[size:size + len(chunk)] = chunk
            size += len(chunk)
            if size > limit:
                raise _TooLarge(f"request: the body exceeds the limit of {limit} bytes")
            if declared is None:
                hold.grow(size)
    except ClientDisconnect:
        _ABANDONED.note(f"{request.url.path[:128]!r}: {size} of {header or 'an undeclared number of'} bytes")
        raise CancelledError("request: the client closed the connection before its body arrived") from None
    return body


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{field}: expected a JSON object")
    return value


async def _values(data: Any, datatype: str, shape: list[int], field: str, limits: Limits,
                  reserve: Callable[[int], None]) -> Any:
    """An input's JSON ``data`` as a flat array of its datatype (``jsonbody.values``), when its
    datatype and shape are ones gradserve takes; as they are otherwise (``translate`` refuses them)."""
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        return data
    count = check_shape(shape, field, limits)
    return await jsonbody.array(data, datatype, dtype, count, f"{field}.data", reserve)


async def decode_request(model: str, version: str, body: bytes | bytearray | mmap.mmap, header_length: str | None,
                         limits: Limits | None = None, reserve: Callable[[int], None] = lambda nbytes: None
                         ) -> tuple[InferRequest, bool, dict[str, bool], int]:
    """An ``InferRequest`` of a JSON body, with binary tensors when ``header_length`` is given, and
    which outputs go back binary: (request, every output by default?, per-output choices, bytes
    the request keeps: its JSON arrays, and the body when inputs are views of its binary part).
    ``reserve(nbytes)`` is called before each JSON array is allocated."""
    limits = limits or Limits()
    json_end = len(body)
    if header_length is not None:
        json_end = _length(header_length, HEADER_LENGTH)
        if json_end > len(body):
            raise InvalidArgumentError(f"{HEADER_LENGTH}: {header_length[:32]!r} is not a length within the body "
                                       f"of {len(body)} bytes")
    doc = _object(await jsonbody.document(body, json_end, limits.http_max_json_outside_data_bytes), "request")
    kept = 0
    binary = memoryview(body)[json_end:]
    offset = 0
    inputs = []
    raw_inputs = doc.get("inputs", [])
    if not isinstance(raw_inputs, list):
        raise InvalidArgumentError("inputs: expected a JSON array")
    for i, item in enumerate(raw_inputs):
        item = _object(item, f"inputs[{i}]")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidArgumentError(f"inputs[{i}]: needs a string 'name', a string 'datatype' and a 'shape' array")
        shape = dims(shape, f"inputs[{name[:128]!r}]")
        params = _object(item.get("parameters", {}), f"inputs[{name[:128]!r}].parameters")
        size = params.get("binary_data_size")
        ref = shared_memory_ref(params, f"inputs[{name[:128]!r}]")
        if ref is not None:
            if size is not None or "data" in item:
                raise InvalidArgumentError(f"inputs[{name[:128]!r}]: has data although it is in shared memory; send "
                                           "one of 'data', 'binary_data_size' and 'shared_memory_region'")
            inputs.append(InferInput(name, datatype, shape, shared_memory=ref))
        elif size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise InvalidArgumentError(f"inputs[{name[:128]!r}].parameters.binary_data_size: {size!r:.32} is not "
                                  f"within the {len(binary) - offset} binary bytes left")
            inputs.append(InferInput(name, datatype, shape, raw=binary[offset:offset + size]))
            offset += size
        elif "data" in item:
            values = await _values(item["data"], datatype, shape, f"inputs[{name[:128]!r}]", limits, reserve)
            kept += getattr(values, "nbytes", 0)
            inputs.append(InferInput(name, datatype, shape, values=values))
        else:
            raise InvalidArgumentError(f"inputs[{name[:128]!r}]: has neither 'data' nor binary data")
    if offset != len(binary):
        raise InvalidArgumentError(f"request: {len(binary) - offset} binary bytes are not claimed by any input")
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgumentError("outputs: expected a JSON array")
    names = []
    for i, item in enumerate(outputs):
        name = _object(item, f"outputs[{i}]").get("name")
        if not isinstance(name, str):
            raise InvalidArgumentError(f"outputs[{i}]: needs a string 'name'")
        names.append(name)
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("id: expected a string")
    params = _object(doc.get("parameters", {}), "parameters")
    per_output = {}
    output_shared = {}
    for item in outputs:
        field = f"outputs[{item['name'][:128]!r}]"
        out_params = _object(item.get("parameters", {}), f"{field}.parameters")
        choice = out_params.get("binary_data")
        if isinstance(choice, bool):
            per_output[item["name"]] = choice
        ref = shared_memory_ref(out_params, field)
        if ref is not None:
            if choice is True:
                raise InvalidArgumentError(f"{field}.parameters: binary_data and shared_memory_region exclude "
                                           "each other")
            output_shared[item["name"]] = ref
    if offset:
        kept += len(body)   # its inputs are views of the body
    return (InferRequest(model, version, request_id, params, inputs, names, output_shared),
            params.get("binary_data_output") is True, per_output, kept)


def encode_response(model: str, version: int, request_id: str, tensors: list[tuple[str, np.ndarray]],
                    binary_default: bool, binary: dict[str, bool], shared: frozenset[str] = frozenset()) -> Response:
    """JSON, or a JSON header followed by the binary outputs; those in ``shared`` (written into
    shared memory) have no data."""
    outputs, blobs = [], []
    for name, arr in tensors:
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if name in shared:
            pass
        elif binary.get(name, binary_default):
            data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            # JSON has no 16-bit floats: FP16 and BF16 values are written as ordinary numbers.
            half = datatype_of(arr.dtype) in ("FP16", "BF16")
            values = arr.astype(np.float32) if half else arr
            entry["data"] = values.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request_id:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def create_app(frontend: InferenceFrontEnd, tokens: list[str] | None = None,
               max_body_bytes: int = 64 * 1024 * 1024) -> Starlette:
    """The ASGI app of the OIP REST endpoints (``tokens``: the accepted bearer tokens, if any)."""
    limits = frontend.dataplane.limits
    checker = auth.BearerTokenInterceptor(tokens) if tokens else None

    def authorized(request: Request) -> bool:
        return checker is None or checker.accepts([("authorization", request.headers.get("authorization", ""))])

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return _error(401, "authorization: a valid 'Authorization: Bearer <token>' header is required")
            try:
                response: Response = await handler(request)
                return response
            except _TooLarge as exc:
                return _error(413, str(exc))
            except ClientDisconnect:
                _ABANDONED.note(f"{request.url.path[:128]!r}: went away while its body was read")
                return _error(499, "request: the client closed the connection before its body arrived")
            except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
                return _status(*status_for(exc))
        return endpoint

    async def live(request: Request) -> Response:
        ok = frontend.live()
        return JSONResponse({"live": ok}, status_code=200 if ok else 503)

    async def ready(request: Request) -> Response:
        ok = frontend.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": frontend.version, "extensions": list(frontend.extensions)})

    def model_ref(request: Request) -> tuple[str, str]:
        return request.path_params["model"], request.path_params.get("version", "")

    async def model_metadata(request: Request) -> Response:
        meta = frontend.model_metadata(*model_ref(request))

        def tensors(items: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

        return JSONResponse({"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                             "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)})

    async def model_ready(request: Request) -> Response:
        name, version = model_ref(request)
        ok = frontend.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        name, version = model_ref(request)
        header_length = request.headers.get(HEADER_LENGTH)
        too_large = False
        with frontend.envelope.open(PROTOCOL, "infer") as call:
            hold = _Hold(frontend.envelope.memory)
            try:
                if header_length is not None:
                    _length(header_length, HEADER_LENGTH)   # before the body is read
                body = await _body(request, max_body_bytes, hold)
                req, binary_default, binary, kept = await decode_request(name, version, body, header_length, limits,
                                                                         hold.reserve)
                kept = kept or len(body)
                del body
            except (_TooLarge, jsonbody.OutsideDataTooLarge):
                too_large = True
                raise
            finally:
                # The call holds what the request keeps from here (``call.admit``, with no await
                # between): the body once decoded is its arrays, and the body itself only for
                # binary inputs, which are views of it.
                hold.release()
            result, tensors = await frontend.infer(call, req, kept)
            return encode_response(result.model, result.version, req.id, tensors, binary_default, binary,
                                   frozenset(req.output_shared_memory))
        return _error(413, call.message) if too_large else _status(call.code, call.message)

    model = "/v2/models/{model:str}"
    versioned = model + "/versions/{version:str}"
    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2", guarded(server_metadata))]
    for prefix in (model, versioned):
        routes += [Route(prefix, guarded(model_metadata)), Route(prefix + "/ready", guarded(model_ready)),
                   Route(prefix + "/infer", guarded(infer), methods=["POST"])]
    routes += shared_memory.rest_routes(frontend.shared_memory, guarded)
    app = Starlette(routes=routes)
    app.state.limits = limits   # the connections' limits (``RestServer``)
    return app


def _limits_of(app: Any) -> Limits:
    """The limits of the app ``create_app`` made, found through the middleware that wraps it."""
    while app is not None:
        limits = getattr(getattr(app, "state", None), "limits", None)
        if isinstance(limits, Limits):
            return limits
        app = getattr(app, "app", None)
    return Limits()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn on an event loop it does not own: the process's signals stay with the caller."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        pass


class RestServer:
    """Serves ``app`` over HTTP (HTTPS with a certificate; mutual TLS with a client CA) as a task
    of the running event loop, each connection under the ``http_*`` fields of ``limits``
    (``connections``; by default the limits ``create_app`` gave the app)."""

    def __init__(self, app: Any, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_client_ca: str | None = None, reuse_port: bool = False,
                 limits: Limits | None = None) -> None:
        tls: dict[str, Any] = {}
        if tls_cert and tls_key:
            tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
            if tls_client_ca:
                tls.update(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        limits = limits or _limits_of(app)
        idle = limits.http_idle_timeout_s
        # The protocol keeps its own idle timer; uvicorn's keep-alive one must not close sooner.
        keep_alive = math.ceil(idle) if idle > 0 else 1 << 30
        self._config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                      http=protocol_class(limits), ws="none", timeout_keep_alive=keep_alive, **tls)
        self._host, self._requested_port, self._reuse_port = host, port, reuse_port
        self._server = _EmbeddedServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0
        self.tls = bool(tls)

    async def start(self) -> int:
        """Bind and start serving; returns the port."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only when the listening
        # socket says TCP; without it each response's body waited 40 ms for the delayed ACK of its
        # headers (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:  # the workers of one supervisor share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._host, self._requested_port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {self._host}:{self.port} stopped while starting")
            await asyncio.sleep(0.005)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, give open requests ``grace`` seconds, then close what is left."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            await self._task
        self._task = None


"""Triton's system shared-memory extension of the Open Inference Protocol: register, status, unregister.

Over gRPC, the ``SystemSharedMemory{Status,Register,Unregister}`` RPCs of
``inference.GRPCInferenceService`` (``SystemSharedMemoryServicer``); over REST,
``/v2/systemsharedmemory[/region/{name}]/{status,register,unregister}`` (``rest_routes``). Both
are thin over the server's ``SharedMemoryRegistry``; which tensors of an inference travel
through a region is the inference's business (``translate``). Registration maps, allocates and
populates the region on a thread: a large one takes a while, and the event loop keeps serving.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gradserve.server.core.errors import InvalidArgumentError
from gradserve.server.frontends import rawbytes
from gradserve.server.frontends.oip import _messages as _m
from gradserve.server.frontends.shared_memory import RegionStatus, SharedMemoryRegistry
from gradserve.server.ops.status import status_for

__all__ = ["SystemSharedMemoryServicer", "rest_routes", "EXTENSION", "METHODS"]

#: The extension's name in ServerMetadata when shared memory is on.
EXTENSION = "system_shared_memory"
#: The RPCs, under ``inference.GRPCInferenceService``.
METHODS = ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister")

_RegionStatus = _m.message_class("SystemSharedMemoryStatusResponse").RegionStatus


class SystemSharedMemoryServicer:
    """The extension's RPCs; errors are the RPC status (``ops.status``)."""

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self._registry = registry

    async def SystemSharedMemoryStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            regions = self._registry.status(request.name)
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await context.abort(*status_for(exc))
        response = _m.message_class("SystemSharedMemoryStatusResponse")()
        for r in regions:
            response.regions[r.name].CopyFrom(_RegionStatus(name=r.name, key=r.key, offset=r.offset,
                                                            byte_size=r.byte_size))
        return response

    async def SystemSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._registry.register, request.name,
                                                             request.key, request.offset, request.byte_size)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
        return _m.message_class("SystemSharedMemoryRegisterResponse")()

    async def SystemSharedMemoryUnregister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            self._registry.unregister(request.name)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
        return _m.message_class("SystemSharedMemoryUnregisterResponse")()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a ``grpc.aio`` server, beside the other OIP RPCs."""
        return grpc.method_handlers_generic_handler(_m.SERVICE, {
            name: rawbytes.unary_unary(getattr(self, name), _m.message_class(f"{name}Request"),
                                       _m.message_class(f"{name}Response").SerializeToString)
            for name in METHODS})


def _status_json(regions: list[RegionStatus]) -> list[dict[str, Any]]:
    return [{"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size} for r in regions]


def _register_body(body: bytes) -> tuple[str, int, int]:
    """(key, offset, byte_size) of a register request's JSON body."""
    try:
        doc = json.loads(body or b"null")
    except (ValueError, RecursionError):
        raise InvalidArgumentError("request: the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError("request: expected a JSON object with 'key', 'offset' and 'byte_size'")
    key = doc.get("key")
    if not isinstance(key, str):
        raise InvalidArgumentError("key: expected a string")
    sizes = []
    for name, value in (("offset", doc.get("offset", 0)), ("byte_size", doc.get("byte_size"))):
        if type(value) is not int:
            raise InvalidArgumentError(f"{name}: expected an integer, got {value!r:.32}")
        sizes.append(value)
    return key, sizes[0], sizes[1]


Handler = Callable[[Request], Awaitable[Response]]


def rest_routes(registry: SharedMemoryRegistry, wrap: Callable[[Handler], Handler],
                max_body_bytes: int = 64 * 1024) -> list[Route]:
    """The extension's REST routes. ``wrap`` is the app's guard of every route (authentication, and
    domain errors to an HTTP status with ``{"error": ...}``)."""
    async def status(request: Request) -> Response:
        return JSONResponse(_status_json(registry.status(request.path_params.get("name", ""))))

    async def register(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise InvalidArgumentError(f"request: a register body is at most {max_body_bytes} bytes")
        key, offset, byte_size = _register_body(body)
        await asyncio.get_running_loop().run_in_executor(None, registry.register, request.path_params["name"],
                                                         key, offset, byte_size)
        return JSONResponse({})

    async def unregister(request: Request) -> Response:
        registry.unregister(request.path_params.get("name", ""))
        return JSONResponse({})

    root, region = "/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{name:str}"
    return [Route(root + "/status", wrap(status)), Route(region + "/status", wrap(status)),
            Route(region + "/register", wrap(register), methods=["POST"]),
            Route(root + "/unregister", wrap(unregister), methods=["POST"]),
            Route(region + "/unregister", wrap(unregister), methods=["POST"])]

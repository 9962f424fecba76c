"""The native ``SharedMemoryService``: sessions held by a stream, and their regions.

A caller opens a session (``OpenSession``, server-streaming): the server answers once with the
session's id and challenge and keeps the stream open; when the stream ends — the caller cancels
it, its connection closes because its process exited or was killed, or the server stops
(``close``) — the session's regions are unregistered, and unmapped once the calls using them
have finished. ``RegisterRegion`` maps a segment whose first bytes hold the challenge
(``SharedMemoryRegistry.register_session_region``) on a thread, so a large one does not stall
the event loop. Tensors then name the region in ``Tensor.shared_memory``; resolving them is the
Compute path's business.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc

from gradserve.server.frontends import rawbytes
from gradserve.server.frontends.shared_memory import SharedMemoryRegistry
from gradserve.server.ops.status import status_for
from gradserve.v1 import shared_memory_service_pb2 as _pb2

__all__ = ["SharedMemoryServicer", "SERVICE_NAME"]

SERVICE_NAME = _pb2.DESCRIPTOR.services_by_name["SharedMemoryService"].full_name


class SharedMemoryServicer:
    """OpenSession, RegisterRegion and UnregisterRegion over the server's registry."""

    def __init__(self, registry: SharedMemoryRegistry) -> None:
        self._registry = registry
        self._open: dict[str, asyncio.Event] = {}   # session id -> set to end its stream

    async def OpenSession(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            session = self._registry.open_session()
        except Exception as exc:  # noqa: BLE001 - mapped to a status in one place
            await context.abort(*status_for(exc))
        ended = self._open[session.id] = asyncio.Event()
        try:
            yield _pb2.OpenSessionResponse(session_id=session.id, challenge=session.challenge)
            # Held until the caller goes away (CancelledError here) or the server stops.
            await ended.wait()
        finally:
            del self._open[session.id]
            self._registry.close_session(session.id)

    async def RegisterRegion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            region = await asyncio.get_running_loop().run_in_executor(
                None, self._registry.register_session_region, request.session_id, request.key, request.byte_size)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
        return _pb2.RegisterRegionResponse(region=region)

    async def UnregisterRegion(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._registry.unregister_session_region(request.session_id, request.region)
        return _pb2.UnregisterRegionResponse()

    def close(self) -> None:
        """End every session's stream (with OK), so that shutdown does not wait for them."""
        for ended in self._open.values():
            ended.set()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a ``grpc.aio`` server (requests parsed by ``rawbytes``)."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "OpenSession": rawbytes.unary_stream(self.OpenSession, _pb2.OpenSessionRequest,
                                                 _pb2.OpenSessionResponse.SerializeToString),
            "RegisterRegion": rawbytes.unary_unary(self.RegisterRegion, _pb2.RegisterRegionRequest,
                                                   _pb2.RegisterRegionResponse.SerializeToString),
            "UnregisterRegion": rawbytes.unary_unary(self.UnregisterRegion, _pb2.UnregisterRegionRequest,
                                                     _pb2.UnregisterRegionResponse.SerializeToString),
        })

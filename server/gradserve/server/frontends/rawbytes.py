"""Method handlers that parse their request bytes in our code, not in gRPC's.

A request deserializer that raises makes grpc.aio answer UNKNOWN with the exception class in the
message and log a traceback per request. The handlers built here take the bytes instead
(``request_deserializer=None``) and parse them first thing: malformed bytes are INVALID_ARGUMENT
with a short message, logged at most once per ``LOG_INTERVAL_S`` with a count, never per
request. For the services whose handlers are otherwise generated or built by gRPC's helpers
(the global sensitivity analysis, the Open Inference Protocol).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from gradserve.server.core.errors import InvalidArgumentError

__all__ = ["LOG_INTERVAL_S", "parse", "unary_unary", "unary_stream"]

_log = logging.getLogger("gradserve.server")

#: Malformed requests are logged at most once per this many seconds, with a count.
LOG_INTERVAL_S = 60.0
_lock = threading.Lock()
_refused = {"count": 0, "next": 0.0}


def parse(cls: Any, data: bytes) -> Any:
    """``cls`` parsed from ``data``; InvalidArgumentError (short, no exception class) when it is not one."""
    try:
        return cls.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or a nesting the parser refuses
        name = cls.DESCRIPTOR.full_name
        with _lock:
            _refused["count"] += 1
            now = time.monotonic()
            report = now >= _refused["next"]
            if report:
                count, _refused["count"], _refused["next"] = _refused["count"], 0, now + LOG_INTERVAL_S
        if report:
            _log.warning("refused %d malformed request message(s) since the last report (latest: %s, %d bytes)",
                         count, name, len(data))
        raise InvalidArgumentError(f"request: not a valid {name} message") from None


def unary_unary(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request_class: Any,
                response_serializer: Callable[[Any], bytes]) -> grpc.RpcMethodHandler:
    """A unary-unary handler for ``behavior`` that parses ``request_class`` itself."""
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            request = parse(request_class, data)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(handle, response_serializer=response_serializer)


def unary_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]], request_class: Any,
                 response_serializer: Callable[[Any], bytes]) -> grpc.RpcMethodHandler:
    """A unary-stream handler for ``behavior`` (an async generator) that parses ``request_class`` itself."""
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            request = parse(request_class, data)
        except InvalidArgumentError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        responses = behavior(request, context)
        try:
            async for response in responses:
                yield response
        finally:
            aclose = getattr(responses, "aclose", None)  # an async generator: close it with the call
            if aclose is not None:
                await aclose()

    return grpc.unary_stream_rpc_method_handler(handle, response_serializer=response_serializer)

"""The asyncio SDK client: the methods of ``Client`` as coroutines, over ``grpc.aio``."""
from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc

from gradserve import _shm
from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES
from gradserve._core import (
    COMPUTE_PATH,
    COMPUTE_STREAM_PATH,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_WINDOW,
    DEFAULT_RETRIES,
    DEFAULT_WINDOW,
    ClientCore,
    serialize_request,
)
from gradserve._exceptions import GradserveError, from_grpc_error
from gradserve._explain import AsyncExplanationMethods
from gradserve._gsa import AsyncGlobalSensitivityMethods, Metadata
from gradserve._models import Inputs, ModelInfo
from gradserve._options import ComputeOptions, Operands, Selection, Target, quadrature_of
from gradserve._options import IntegratedGradientsOptions as _IG
from gradserve._options import SmoothGradOptions as _SG
from gradserve._requests import Call, ComputeResult, decode_response
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc

__all__ = ["AsyncClient"]

_NO_OPERANDS = Operands()


class AsyncClient(ClientCore, AsyncGlobalSensitivityMethods, AsyncExplanationMethods):
    """asyncio client for a gradserve server; the same methods as ``Client``, as coroutines.

    Parameters are those of ``Client``; ``channel`` is a ``grpc.aio.Channel``.

    Examples
    --------
    >>> async with gradserve.AsyncClient("127.0.0.1:50051") as c:    # doctest: +SKIP
    ...     g = await c.gradient("dense2", np.ones((2, 4)))
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.aio.Channel | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW, max_batch_rows: int = 65536,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, shared_memory: bool = False,
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD) -> None:
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, token=token,
                         retries=retries, window=window, max_batch_rows=max_batch_rows, chunk_bytes=chunk_bytes,
                         shared_memory=shared_memory, shared_memory_threshold=shared_memory_threshold)
        self._credentials = credentials
        self._channel: Any = channel
        self._stubs: tuple[Any, Any, Any] | None = None
        self._shm: _shm.AsyncSharedMemoryTransport | None = None

    def _connect(self) -> tuple[Any, Any, Any]:
        # A grpc.aio channel belongs to the event loop it is created on: create it on first use,
        # inside the caller's loop, so that a client may be constructed before asyncio.run().
        if self._stubs is None:
            if self._channel is None:
                self._channel = (grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
                                 if self._credentials is not None
                                 else grpc.aio.insecure_channel(self._target, options=self._options))
            # Answers read as bytes and decoded with their tensors as views (decode_response).
            self._stubs = (self._channel.unary_unary(COMPUTE_PATH, request_serializer=serialize_request,
                                                     response_deserializer=None, _registered_method=True),
                           self._channel.stream_stream(COMPUTE_STREAM_PATH, request_serializer=serialize_request,
                                                       response_deserializer=None, _registered_method=True),
                           _model_grpc.ModelServiceStub(self._channel))
            if self._shm_core is not None:
                self._shm = _shm.AsyncSharedMemoryTransport(self._channel, self._metadata, self._shm_core)
        return self._stubs

    def _gsa_transport(self) -> tuple[grpc.aio.Channel, Metadata]:
        self._connect()  # the channel is made in the running loop
        return self._channel, self._metadata

    # -- lifecycle ------------------------------------------------------------------------------
    async def close(self) -> None:
        """The coroutine of [`Client.close`][gradserve.Client.close]."""
        if self._shm is not None:
            await self._shm.close()
        elif self._shm_core is not None:
            self._shm_core.close()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- models ---------------------------------------------------------------------------------
    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The coroutine of [`Client.models`][gradserve.Client.models]."""
        resp = await self._unary(self._connect()[2].ListModels, _model_pb2.ListModelsRequest(), timeout)
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        self._meta.store(infos)
        return infos

    async def model_info(self, name: str, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """The coroutine of [`Client.model_info`][gradserve.Client.model_info]."""
        cached = self._meta.get(name)
        if cached is not None and not refresh:
            return cached
        resp = await self._unary(self._connect()[2].GetModel, _model_pb2.GetModelRequest(name=name), timeout)
        info = ModelInfo.from_proto(resp.model)
        self._meta.store([info])
        return info

    # -- methods --------------------------------------------------------------------------------
    async def compute(self, model: str, method: str, inputs: Inputs, *, timeout: float | None = None,
                **options: Any) -> ComputeResult:
        """The coroutine of [`Client.compute`][gradserve.Client.compute]."""
        operands = Operands(options.pop("baseline", 0.0), options.pop("tangents", None),
                            options.pop("cotangents", None))
        opts = ComputeOptions.of(method, **options)
        info, timeout = await self._info_for_call(model, timeout)
        return await self._send(self._plan(info, model, opts, inputs, operands), timeout)

    async def predict(self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None) -> Any:
        """The coroutine of [`Client.predict`][gradserve.Client.predict]."""
        return await self._run(model, inputs, ComputeOptions("predict", version), timeout)

    async def gradient(self, model: str, inputs: Inputs, *, target: Target = None, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, return_outputs: bool = False, layer: str | None = None,
                 transform: str | None = None, logits: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """The coroutine of [`Client.gradient`][gradserve.Client.gradient]."""
        options = ComputeOptions("gradient", version, Selection(target, output, transform, logits), wrt or (),
                                 return_outputs, layer)
        return await self._run(model, inputs, options, timeout)

    async def input_x_gradient(self, model: str, inputs: Inputs, *, target: Target = None,
                         output: str | int | None = None, wrt: Sequence[str] | None = None,
                         return_outputs: bool = False, layer: str | None = None,
                         transform: str | None = None, logits: bool = False, version: int = 0,
                         timeout: float | None = None) -> Any:
        """The coroutine of [`Client.input_x_gradient`][gradserve.Client.input_x_gradient]."""
        return await self._run(model, inputs, ComputeOptions("input_x_gradient", version,
                                                       Selection(target, output, transform, logits),
                                                       wrt or (), return_outputs, layer), timeout)

    async def integrated_gradients(self, model: str, inputs: Inputs, *, baseline: Any = 0.0, steps: int | None = None,
                             quadrature: str = "gausslegendre", target: Target = None,
                             output: str | int | None = None, wrt: Sequence[str] | None = None,
                             return_delta: bool = False, return_outputs: bool = False,
                             layer: str | None = None, transform: str | None = None, logits: bool = False,
                             version: int = 0, timeout: float | None = None, method: str | None = None) -> Any:
        """The coroutine of [`Client.integrated_gradients`][gradserve.Client.integrated_gradients]."""
        ig = _IG(steps, quadrature_of(quadrature, method), return_delta)
        return await self._run(model, inputs, ComputeOptions("integrated_gradients", version,
                                                       Selection(target, output, transform, logits), wrt or (),
                                                       return_outputs, layer, ig), timeout, Operands(baseline))

    async def smoothgrad(self, model: str, inputs: Inputs, *, samples: int | None = None, noise: float | None = None,
                   stdev: float | None = None, kind: str = "mean", seed: int | None = None,
                   base_method: str = "gradient", target: Target = None, output: str | int | None = None,
                   wrt: Sequence[str] | None = None, baseline: Any = 0.0, steps: int | None = None,
                   transform: str | None = None, logits: bool = False, version: int = 0,
                   timeout: float | None = None) -> Any:
        """The coroutine of [`Client.smoothgrad`][gradserve.Client.smoothgrad]."""
        ig = _IG(steps)   # checked even when base_method does not use it
        options = ComputeOptions("smoothgrad", version, Selection(target, output, transform, logits), wrt or (),
                                 integrated_gradients=ig if base_method == "integrated_gradients" else None,
                                 smoothgrad=_SG(samples, noise, stdev, kind, seed, base_method))
        return await self._run(model, inputs, options, timeout, Operands(baseline))

    async def jacobian(self, model: str, inputs: Inputs, *, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """The coroutine of [`Client.jacobian`][gradserve.Client.jacobian]."""
        return await self._run(model, inputs, ComputeOptions("jacobian", version, Selection(output=output), wrt or ()),
                         timeout)

    async def jvp(self, model: str, inputs: Inputs, tangents: Any, *, output: str | int | None = None,
            version: int = 0, timeout: float | None = None) -> Any:
        """The coroutine of [`Client.jvp`][gradserve.Client.jvp]."""
        return await self._run(model, inputs, ComputeOptions("jvp", version, Selection(output=output)), timeout,
                         Operands(tangents=tangents))

    async def vjp(self, model: str, inputs: Inputs, cotangents: Any, *, output: str | int | None = None,
            wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """The coroutine of [`Client.vjp`][gradserve.Client.vjp]."""
        return await self._run(model, inputs, ComputeOptions("vjp", version, Selection(output=output), wrt or ()),
                         timeout, Operands(cotangents=cotangents))

    async def hvp(self, model: str, inputs: Inputs, v: Any, *, target: Target = None,
            output: str | int | None = None, wrt: Sequence[str] | None = None, version: int = 0,
            timeout: float | None = None) -> Any:
        """The coroutine of [`Client.hvp`][gradserve.Client.hvp]."""
        return await self._run(model, inputs, ComputeOptions("hvp", version, Selection(target, output), wrt or ()),
                         timeout, Operands(tangents=v))

    async def grad_cam(self, model: str, inputs: Inputs, *, layer: str | None = None, target: Target = None,
                 output: str | int | None = None, upsample: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """The coroutine of [`Client.grad_cam`][gradserve.Client.grad_cam]."""
        options = ComputeOptions("grad_cam", version, Selection(target, output), layer=layer, upsample=upsample)
        return await self._run(model, inputs, options, timeout)

    async def stream(self, model: str, batches: Iterable[Inputs] | AsyncIterable[Inputs], *,
                     method: str = "gradient", window: int | None = None, timeout: float | None = None,
                     **options: Any) -> AsyncIterator[Any]:
        """The async iterator of [`Client.stream`][gradserve.Client.stream] (``async for r in
        client.stream(...)``); ``batches`` may also be an async iterable."""
        operands = Operands(options.pop("baseline", 0.0), options.pop("tangents", None),
                            options.pop("cotangents", None))
        opts = ComputeOptions.of(method, **options)
        deadline = self._deadline_for(timeout)
        info, _ = await self._info_for_call(model, timeout)
        book = self._stream_book(info, model, opts, operands, window)
        source = _aiter(batches)
        cond = asyncio.Condition()

        async def write(call: Any, generation: int) -> None:
            # Written here rather than by grpc.aio from a request iterator, so that a failed write
            # is seen (``StreamBook.restart_delay``); grpc.aio swallows it.
            try:
                async with cond:
                    replay = book.replay()
                for resent in replay:
                    await call.write(resent)
                while True:
                    async with cond:
                        await cond.wait_for(lambda: not book.must_wait(generation) or call.done())
                        if not book.sending(generation) or call.done():
                            break
                        try:
                            batch = await source.__anext__()
                        except StopAsyncIteration:
                            book.end()
                            break
                        except Exception as exc:  # noqa: BLE001 - the caller's iterator failed: raised in order
                            book.fail(exc)
                            break
                        request = book.pull(batch)
                    if request is None:
                        break
                    await call.write(request)
                if generation == book.generation and not book.closed:
                    await call.done_writing()
            except grpc.RpcError:
                async with cond:
                    book.write_failed = generation == book.generation
            except asyncio.InvalidStateError:
                pass   # the call had ended already: its status says why

        call: Any = None
        writer: asyncio.Future[None] | None = None
        try:
            while True:
                call = self._connect()[1](timeout=self._remaining(deadline), metadata=self._metadata)
                writer = asyncio.ensure_future(write(call, book.generation))
                try:
                    while (response := await call.read()) is not grpc.aio.EOF:
                        async with cond:
                            book.answer(response)
                            cond.notify_all()
                        for result in book.results():
                            yield result
                    for result in book.results():
                        yield result
                    book.check_complete()
                    return
                except grpc.RpcError as exc:
                    async with cond:
                        cond.notify_all()   # a writer waiting for room sees the call ended
                    await writer           # and finishes at once: whether its write failed counts
                    async with cond:
                        delay = book.restart_delay(exc.code())
                    if delay is None:
                        raise from_grpc_error(exc) from exc
                    await asyncio.sleep(delay)
                    async with cond:
                        book.restart()
                        cond.notify_all()
        finally:
            async with cond:
                book.close()
                cond.notify_all()
            if call is not None:
                call.cancel()
            if writer is not None and not writer.done():
                writer.cancel()

    # -- plumbing -------------------------------------------------------------------------------
    async def _info_for_call(self, model: str, timeout: float | None) -> tuple[ModelInfo | None, float | None]:
        """The coroutine of ``Client._info_for_call``."""
        info = self._meta.get(model)
        if info is not None or not self._meta.due(model):
            return info, timeout
        deadline = self._deadline_for(timeout)
        try:
            info = await self.model_info(model, timeout=self._timeout_for(timeout))
        except GradserveError as exc:
            if not self._meta.failed(model, exc):
                raise
        return info, self._remaining(deadline)

    async def _run(self, model: str, inputs: Inputs, options: ComputeOptions, timeout: float | None,
                   operands: Operands = _NO_OPERANDS) -> Any:
        info, timeout = await self._info_for_call(model, timeout)
        call = self._plan(info, model, options, inputs, operands)
        return call.finish(await self._send(call, timeout))

    async def _send(self, call: Call, timeout: float | None) -> ComputeResult:
        """The coroutine of ``Client._send``."""
        compute = self._connect()[0]
        if self._shm is not None:
            result = await self._shm.send(call.as_one_request(), compute, self._timeout_for(timeout))
            if result is not None:
                return result
        if len(call.bounds) == 1:
            return decode_response(await self._unary(compute, call.request, timeout))
        deadline = self._deadline_for(timeout)
        in_flight: deque[Any] = deque()
        assembled = call.assembler()
        try:
            for request in call.payloads():
                in_flight.append(asyncio.ensure_future(compute(request, timeout=self._remaining(deadline),
                                                               metadata=self._metadata)))
                if len(in_flight) >= DEFAULT_CHUNK_WINDOW:
                    assembled.add(decode_response(await in_flight.popleft(), aligned=False))
            while in_flight:
                assembled.add(decode_response(await in_flight.popleft(), aligned=False))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for task in in_flight:
                task.cancel()
        return assembled.result()

    async def _unary(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await rpc(request, timeout=self._timeout_for(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc


async def _aiter(batches: Iterable[Inputs] | AsyncIterable[Inputs]) -> AsyncIterator[Inputs]:
    """Iterate a sync or async iterable of batches asynchronously."""
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            yield batch
    else:
        for batch in batches:
            yield batch

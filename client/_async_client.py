"""The asyncio SDK client: the methods of ``Client`` as coroutines, over ``grpc.aio``."""
from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Sequence

import grpc

from gradserve._base import (COMPUTE_PATH, DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_WINDOW, DEFAULT_RETRIES, DEFAULT_WINDOW,
                             RETRYABLE_CODES, ClientBase, StreamBook, backoff_seconds, decode_response_bytes,
                             serialize_request)
from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES
from gradserve._exceptions import Internal, from_grpc_error
from gradserve._models import Inputs, ModelInfo
from gradserve._requests import Call, ComputeResult, Target
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc
from gradserve.v1 import sensitivity_service_pb2 as _pb2
from gradserve.v1 import sensitivity_service_pb2_grpc as _grpc

__all__ = ["AsyncClient"]


class AsyncClient(ClientBase):
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
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, token=token,
                         retries=retries, window=window, max_batch_rows=max_batch_rows, chunk_bytes=chunk_bytes)
        self._credentials = credentials
        self._channel: Any = channel
        self._stubs: tuple[Any, Any, Any] | None = None

    def _connect(self) -> tuple[Any, Any, Any]:
        # A grpc.aio channel belongs to the event loop it is created on: create it on first use,
        # inside the caller's loop, so that a client may be constructed before asyncio.run().
        if self._stubs is None:
            if self._channel is None:
                self._channel = (grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
                                 if self._credentials is not None
                                 else grpc.aio.insecure_channel(self._target, options=self._options))
            # The third: Compute answers read as bytes, decoded with their tensors as views.
            self._stubs = (_grpc.SensitivityServiceStub(self._channel), _model_grpc.ModelServiceStub(self._channel),
                           self._channel.unary_unary(COMPUTE_PATH,
                                                     request_serializer=serialize_request,
                                                     response_deserializer=None))
        return self._stubs

    @property
    def _compute(self) -> Any:
        return self._connect()[0]

    @property
    def _models(self) -> Any:
        return self._connect()[1]

    @property
    def _compute_bytes(self) -> Any:
        return self._connect()[2]

    # -- lifecycle ------------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- models ---------------------------------------------------------------------------------
    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server hosts, with its versions."""
        resp = await self._unary(self._models.ListModels, _model_pb2.ListModelsRequest(), timeout)
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        self._remember(infos)
        return infos

    async def model_info(self, name: str, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """Names, dtypes, shapes, versions and states of one model (cached per client)."""
        cached = self._cached(name)
        if cached is not None and not refresh:
            return cached
        resp = await self._unary(self._models.GetModel, _model_pb2.GetModelRequest(name=name), timeout)
        info = ModelInfo.from_proto(resp.model)
        self._remember([info])
        return info

    # -- methods --------------------------------------------------------------------------------
    async def compute(self, model: str, method: str, inputs: Inputs, *, timeout: float | None = None,
                            **options: Any) -> ComputeResult:
        """Low-level call: every field of the response, decoded. ``options`` as in ``gradient``."""
        call = self._build(await self._info_or_none(model), model, method, inputs, options)
        return await self._send(call, timeout)

    async def predict(self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None) -> Any:
        """Model outputs: an array for a single-output model, else a dict by output name."""
        return await self._run(model, "predict", inputs, timeout, version=version)

    async def gradient(self, model: str, inputs: Inputs, *, target: Target = None, output: str | int | None = None,
                       wrt: Sequence[str] | None = None, return_outputs: bool = False, layer: str | None = None,
                       transform: str | None = None, logits: bool = False, version: int = 0,
                       timeout: float | None = None) -> Any:
        """d target / d inputs per example, shaped like the inputs (array, list or dict).

        With ``return_outputs=True`` returns ``(outputs, gradients)`` from one forward pass.
        """
        return await self._run(model, "gradient", inputs, timeout, target=target, output=output, wrt=wrt,
                               return_outputs=return_outputs, layer=layer, transform=transform,
                               logits=logits, version=version)

    async def input_x_gradient(self, model: str, inputs: Inputs, *, target: Target = None,
                               output: str | int | None = None, wrt: Sequence[str] | None = None,
                               return_outputs: bool = False, layer: str | None = None,
                               transform: str | None = None, logits: bool = False, version: int = 0,
                               timeout: float | None = None) -> Any:
        """inputs * gradient, per element."""
        return await self._run(model, "input_x_gradient", inputs, timeout, target=target, output=output,
                               wrt=wrt, return_outputs=return_outputs, layer=layer, transform=transform,
                               logits=logits, version=version)

    async def integrated_gradients(self, model: str, inputs: Inputs, *, baseline: Any = 0.0, steps: int = 50,
                                   method: str = "gausslegendre", target: Target = None,
                                   output: str | int | None = None, wrt: Sequence[str] | None = None,
                                   return_delta: bool = False, return_outputs: bool = False,
                                   layer: str | None = None, transform: str | None = None, logits: bool = False,
                                   version: int = 0, timeout: float | None = None) -> Any:
        """Integrated gradients from ``baseline``; with ``return_delta`` also the per-example
        convergence delta (returns ``(attributions, delta)``)."""
        return await self._run(model, "integrated_gradients", inputs, timeout, baseline=baseline, steps=steps,
                               quadrature=method, target=target, output=output, wrt=wrt,
                               return_delta=return_delta, return_outputs=return_outputs, layer=layer,
                               transform=transform, logits=logits, version=version)

    async def smoothgrad(self, model: str, inputs: Inputs, *, samples: int = 50, noise: float | None = None,
                         stdev: float | None = None, kind: str = "mean", seed: int | None = None,
                         base_method: str = "gradient", target: Target = None, output: str | int | None = None,
                         wrt: Sequence[str] | None = None, baseline: Any = 0.0, steps: int = 50,
                         transform: str | None = None, logits: bool = False, version: int = 0,
                         timeout: float | None = None) -> Any:
        """SmoothGrad: ``base_method`` attributions averaged over noisy copies of the inputs."""
        return await self._run(model, "smoothgrad", inputs, timeout, samples=samples, noise=noise, stdev=stdev,
                               kind=kind, seed=seed, base_method=base_method, target=target, output=output,
                               wrt=wrt, baseline=baseline, steps=steps, transform=transform, logits=logits,
                               version=version)

    async def jacobian(self, model: str, inputs: Inputs, *, output: str | int | None = None,
                       wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Per-example Jacobian, shape (batch, *output_shape, *input_shape), per input."""
        return await self._run(model, "jacobian", inputs, timeout, output=output, wrt=wrt, version=version)

    async def jvp(self, model: str, inputs: Inputs, tangents: Any, *, output: str | int | None = None,
                  version: int = 0, timeout: float | None = None) -> Any:
        """Jacobian-vector product J·v of the selected output, shaped like that output."""
        return await self._run(model, "jvp", inputs, timeout, tangents=tangents, output=output, version=version)

    async def vjp(self, model: str, inputs: Inputs, cotangents: Any, *, output: str | int | None = None,
                  wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Vector-Jacobian product uᵀ·J, shaped like the inputs."""
        return await self._run(model, "vjp", inputs, timeout, cotangents=cotangents, output=output, wrt=wrt,
                               version=version)

    async def hvp(self, model: str, inputs: Inputs, v: Any, *, target: Target = None,
                  output: str | int | None = None, wrt: Sequence[str] | None = None, version: int = 0,
                  timeout: float | None = None) -> Any:
        """Hessian-vector product of the target with ``v``, shaped like the inputs."""
        return await self._run(model, "hvp", inputs, timeout, tangents=v, target=target, output=output,
                               wrt=wrt, version=version)

    async def grad_cam(self, model: str, inputs: Inputs, *, layer: str | None = None, target: Target = None,
                       output: str | int | None = None, upsample: bool = False, version: int = 0,
                       timeout: float | None = None) -> Any:
        """Grad-CAM map of a convolutional layer (default: the last 4-D layer output)."""
        return await self._run(model, "grad_cam", inputs, timeout, layer=layer, target=target, output=output,
                               upsample=upsample, version=version)

    async def stream(self, model: str, batches: Iterable[Inputs] | AsyncIterable[Inputs], *,
                     method: str = "gradient", window: int | None = None, timeout: float | None = None,
                     **options: Any) -> AsyncIterator[Any]:
        """Results for many batches (an iterable or async iterable) over one ComputeStream, in order.

        Pipelined with up to ``window`` requests in flight; restarted from the first unanswered
        request after its server went away. ``async for r in client.stream(...)``.
        """
        info = await self._info_or_none(model)
        book = StreamBook(self._stream_builder(info, model, method, options), window or self._window)
        source = _aiter(batches)
        cond = asyncio.Condition()
        state = {"generation": 0, "closed": False}

        async def requests(generation: int) -> AsyncIterator[_pb2.ComputeStreamRequest]:
            async with cond:
                replay = book.replay()
            for resent in replay:
                yield resent
            while True:
                async with cond:
                    await cond.wait_for(lambda: not book.full or state["generation"] != generation
                                        or bool(state["closed"]))
                    if state["generation"] != generation or state["closed"] or book.finished_sending:
                        return
                    try:
                        batch = await source.__anext__()
                    except StopAsyncIteration:
                        book.end()
                        return
                    except Exception as exc:  # noqa: BLE001 - the caller's iterator failed: raised in order
                        book.fail(exc)
                        return
                    request = book.pull(batch)
                if request is None:
                    return
                yield request

        deadline = self._deadline_for(timeout)
        attempts = 0
        call: Any = None
        try:
            while True:
                call = self._compute.ComputeStream(requests(state["generation"]),
                                                   timeout=self._remaining(deadline),
                                                   metadata=self._metadata or None)
                try:
                    async for response in call:
                        async with cond:
                            book.answer(response)
                            cond.notify_all()
                        attempts = 0
                        for result in book.results():
                            yield result
                    for result in book.results():
                        yield result
                    if not book.complete:
                        raise Internal(f"stream: the server ended the stream with {len(book.unanswered)} "
                                       "requests unanswered")
                    return
                except grpc.RpcError as exc:
                    if not _stream_broken(exc) or attempts >= self._retries:
                        raise from_grpc_error(exc) from exc
                    await asyncio.sleep(backoff_seconds(attempts))
                    attempts += 1
                    async with cond:
                        state["generation"] += 1
                        cond.notify_all()
        finally:
            state["closed"] = True
            if call is not None:
                call.cancel()

    # -- plumbing -------------------------------------------------------------------------------
    async def _info_or_none(self, model: str) -> ModelInfo | None:
        try:
            return await self.model_info(model)
        except Exception:  # noqa: BLE001 - metadata is an optimisation; the server validates anyway
            return None

    async def _run(self, model: str, method: str, inputs: Inputs, timeout: float | None,
                   **options: Any) -> Any:
        call = self._build(await self._info_or_none(model), model, method, inputs, options)
        return call.finish(await self._send(call, timeout))

    async def _send(self, call: Call, timeout: float | None) -> ComputeResult:
        """Send a call's requests: one unary call, or its row chunks a few at a time."""
        if len(call.bounds) == 1:
            return decode_response_bytes(await self._unary(self._compute_bytes, call.request, timeout))
        deadline = self._deadline_for(timeout)
        in_flight: deque[Any] = deque()
        assembled = call.assembler()
        try:
            for request in call.payloads():
                in_flight.append(asyncio.ensure_future(self._compute_bytes(
                    request, timeout=self._remaining(deadline), metadata=self._metadata or None)))
                if len(in_flight) >= DEFAULT_CHUNK_WINDOW:
                    assembled.add(decode_response_bytes(await in_flight.popleft(), aligned=False))
            while in_flight:
                assembled.add(decode_response_bytes(await in_flight.popleft(), aligned=False))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for task in in_flight:
                task.cancel()
        return assembled.result()

    async def _unary(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await rpc(request, timeout=self._timeout_for(timeout), metadata=self._metadata or None)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc


def _stream_broken(exc: grpc.RpcError) -> bool:
    """Whether a stream ended because the server went away, and so is restarted.

    grpc.aio reports a stream that the server ended while a request was being written as
    INTERNAL "Internal error from Core" (a failed SendMessageOperation) instead of the server's
    status (grpc/grpc#36066). Our server answers every request error in-band, so a stream ends
    early only when the transport or the server goes away: that INTERNAL is treated as UNAVAILABLE.
    """
    code = getattr(exc, "code", None)
    status = code() if callable(code) else None
    if status in RETRYABLE_CODES:
        return True
    details = getattr(exc, "details", None)
    debug = getattr(exc, "debug_error_string", None)
    return (status == grpc.StatusCode.INTERNAL and callable(details) and details() == "Internal error from Core"
            and callable(debug) and "execute_batch" in str(debug()))


async def _aiter(batches: Iterable[Inputs] | AsyncIterable[Inputs]) -> AsyncIterator[Inputs]:
    """Iterate a sync or async iterable of batches asynchronously."""
    if isinstance(batches, AsyncIterable):
        async for batch in batches:
            yield batch
    else:
        for batch in batches:
            yield batch

"""The synchronous SDK client: blocking calls over a ``grpc.Channel``."""
from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType
from typing import Any, Iterable, Iterator, Sequence

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

__all__ = ["Client"]


class Client(ClientBase):
    """Blocking client for a gradserve server.

    Parameters
    ----------
    target
        ``"host:port"``, a list of them (balanced round robin), or any gRPC target
        (``dns:///name:port``).
    timeout
        Default deadline in seconds for every call; ``None`` waits forever.
    max_message_bytes
        Largest message sent or received; larger batches are sent in row chunks.
    channel
        A ready ``grpc.Channel`` to use instead of creating one (custom credentials, tests).
    credentials
        ``grpc.ChannelCredentials`` for TLS; ``None`` connects in plaintext.
    token
        Bearer token sent as ``authorization`` metadata.
    retries
        Retries when the server goes away (see ``ClientBase``).
    window
        Default stream requests in flight.
    max_batch_rows
        Most examples in one request.
    chunk_bytes
        Batches larger than this go in pipelined row chunks of about this size (``None``: only
        what exceeds ``max_message_bytes``).

    Examples
    --------
    >>> with gradserve.Client("127.0.0.1:50051") as c:      # doctest: +SKIP
    ...     g = c.gradient("dense2", np.ones((2, 4)))
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.Channel | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW, max_batch_rows: int = 65536,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, token=token,
                         retries=retries, window=window, max_batch_rows=max_batch_rows, chunk_bytes=chunk_bytes)
        if channel is None:
            channel = (grpc.secure_channel(self._target, credentials, options=self._options)
                       if credentials is not None
                       else grpc.insecure_channel(self._target, options=self._options))
        self._channel = channel
        self._compute = _grpc.SensitivityServiceStub(channel)
        # Compute answers read as bytes, decoded with their tensors as views (decode_response_bytes).
        self._compute_bytes = channel.unary_unary(COMPUTE_PATH, request_serializer=serialize_request,
                                                  response_deserializer=None)
        self._models = _model_grpc.ModelServiceStub(channel)

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------------
    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model the server hosts, with its versions."""
        resp = self._unary(self._models.ListModels, _model_pb2.ListModelsRequest(), timeout)
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        self._remember(infos)
        return infos

    def model_info(self, name: str, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """Names, dtypes, shapes, versions and states of one model (cached per client)."""
        cached = self._cached(name)
        if cached is not None and not refresh:
            return cached
        resp = self._unary(self._models.GetModel, _model_pb2.GetModelRequest(name=name), timeout)
        info = ModelInfo.from_proto(resp.model)
        self._remember([info])
        return info

    # -- methods --------------------------------------------------------------------------------
    def compute(self, model: str, method: str, inputs: Inputs, *, timeout: float | None = None,
                **options: Any) -> ComputeResult:
        """Low-level call: every field of the response, decoded. ``options`` as in ``gradient``."""
        call = self._build(self._info_or_none(model), model, method, inputs, options)
        return self._send(call, timeout)

    def predict(self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None) -> Any:
        """Model outputs: an array for a single-output model, else a dict by output name."""
        return self._run(model, "predict", inputs, timeout, version=version)

    def gradient(self, model: str, inputs: Inputs, *, target: Target = None, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, return_outputs: bool = False, layer: str | None = None,
                 transform: str | None = None, logits: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """d target / d inputs per example, shaped like the inputs (array, list or dict).

        With ``return_outputs=True`` returns ``(outputs, gradients)`` from one forward pass.
        """
        return self._run(model, "gradient", inputs, timeout, target=target, output=output, wrt=wrt,
                         return_outputs=return_outputs, layer=layer, transform=transform,
                         logits=logits, version=version)

    def input_x_gradient(self, model: str, inputs: Inputs, *, target: Target = None,
                         output: str | int | None = None, wrt: Sequence[str] | None = None,
                         return_outputs: bool = False, layer: str | None = None,
                         transform: str | None = None, logits: bool = False, version: int = 0,
                         timeout: float | None = None) -> Any:
        """inputs * gradient, per element."""
        return self._run(model, "input_x_gradient", inputs, timeout, target=target, output=output,
                         wrt=wrt, return_outputs=return_outputs, layer=layer, transform=transform,
                         logits=logits, version=version)

    def integrated_gradients(self, model: str, inputs: Inputs, *, baseline: Any = 0.0, steps: int = 50,
                             method: str = "gausslegendre", target: Target = None,
                             output: str | int | None = None, wrt: Sequence[str] | None = None,
                             return_delta: bool = False, return_outputs: bool = False,
                             layer: str | None = None, transform: str | None = None, logits: bool = False,
                             version: int = 0, timeout: float | None = None) -> Any:
        """Integrated gradients from ``baseline``; with ``return_delta`` also the per-example
        convergence delta (returns ``(attributions, delta)``)."""
        return self._run(model, "integrated_gradients", inputs, timeout, baseline=baseline, steps=steps,
                         quadrature=method, target=target, output=output, wrt=wrt,
                         return_delta=return_delta, return_outputs=return_outputs, layer=layer,
                         transform=transform, logits=logits, version=version)

    def smoothgrad(self, model: str, inputs: Inputs, *, samples: int = 50, noise: float | None = None,
                   stdev: float | None = None, kind: str = "mean", seed: int | None = None,
                   base_method: str = "gradient", target: Target = None, output: str | int | None = None,
                   wrt: Sequence[str] | None = None, baseline: Any = 0.0, steps: int = 50,
                   transform: str | None = None, logits: bool = False, version: int = 0,
                   timeout: float | None = None) -> Any:
        """SmoothGrad: ``base_method`` attributions averaged over noisy copies of the inputs."""
        return self._run(model, "smoothgrad", inputs, timeout, samples=samples, noise=noise, stdev=stdev,
                         kind=kind, seed=seed, base_method=base_method, target=target, output=output,
                         wrt=wrt, baseline=baseline, steps=steps, transform=transform, logits=logits,
                         version=version)

    def jacobian(self, model: str, inputs: Inputs, *, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Per-example Jacobian, shape (batch, *output_shape, *input_shape), per input."""
        return self._run(model, "jacobian", inputs, timeout, output=output, wrt=wrt, version=version)

    def jvp(self, model: str, inputs: Inputs, tangents: Any, *, output: str | int | None = None,
            version: int = 0, timeout: float | None = None) -> Any:
        """Jacobian-vector product J·v of the selected output, shaped like that output."""
        return self._run(model, "jvp", inputs, timeout, tangents=tangents, output=output, version=version)

    def vjp(self, model: str, inputs: Inputs, cotangents: Any, *, output: str | int | None = None,
            wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Vector-Jacobian product uᵀ·J, shaped like the inputs."""
        return self._run(model, "vjp", inputs, timeout, cotangents=cotangents, output=output, wrt=wrt,
                         version=version)

    def hvp(self, model: str, inputs: Inputs, v: Any, *, target: Target = None,
            output: str | int | None = None, wrt: Sequence[str] | None = None, version: int = 0,
            timeout: float | None = None) -> Any:
        """Hessian-vector product of the target with ``v``, shaped like the inputs."""
        return self._run(model, "hvp", inputs, timeout, tangents=v, target=target, output=output,
                         wrt=wrt, version=version)

    def grad_cam(self, model: str, inputs: Inputs, *, layer: str | None = None, target: Target = None,
                 output: str | int | None = None, upsample: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """Grad-CAM map of a convolutional layer (default: the last 4-D layer output)."""
        return self._run(model, "grad_cam", inputs, timeout, layer=layer, target=target, output=output,
                         upsample=upsample, version=version)

    def stream(self, model: str, batches: Iterable[Inputs], *, method: str = "gradient",
               window: int | None = None, timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """Results for many batches over one ComputeStream, in the order of ``batches``.

        Pipelined: up to ``window`` requests are sent before their answers arrive, and the next
        batch is pulled from ``batches`` as soon as an answer frees a slot. A stream broken
        because its server went away is restarted from the first unanswered request. ``timeout``
        bounds the whole stream. A batch that fails raises its error when the iteration reaches it.
        """
        info = self._info_or_none(model)
        book = StreamBook(self._stream_builder(info, model, method, options), window or self._window)
        source = iter(batches)
        cond = threading.Condition()
        state = {"generation": 0, "closed": False}

        def requests(generation: int) -> Iterator[_pb2.ComputeStreamRequest]:
            with cond:
                replay = book.replay()
            yield from replay
            while True:
                with cond:
                    while book.full and state["generation"] == generation and not state["closed"]:
                        cond.wait()
                    if state["generation"] != generation or state["closed"] or book.finished_sending:
                        return
                    try:
                        batch = next(source)
                    except StopIteration:
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
                    for response in call:
                        with cond:
                            book.answer(response)
                            cond.notify_all()
                        attempts = 0
                        yield from book.results()
                    yield from book.results()
                    if not book.complete:
                        raise Internal(f"stream: the server ended the stream with {len(book.unanswered)} "
                                       "requests unanswered")
                    return
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE_CODES or attempts >= self._retries:
                        raise from_grpc_error(exc) from exc
                    time.sleep(backoff_seconds(attempts))
                    attempts += 1
                    with cond:
                        state["generation"] += 1
                        cond.notify_all()
        finally:
            with cond:
                state["closed"] = True
                cond.notify_all()
            if call is not None:
                call.cancel()

    # -- plumbing -------------------------------------------------------------------------------
    def _info_or_none(self, model: str) -> ModelInfo | None:
        try:
            return self.model_info(model)
        except Exception:  # noqa: BLE001 - metadata is an optimisation; the server validates anyway
            return None

    def _run(self, model: str, method: str, inputs: Inputs, timeout: float | None, **options: Any) -> Any:
        call = self._build(self._info_or_none(model), model, method, inputs, options)
        return call.finish(self._send(call, timeout))

    def _send(self, call: Call, timeout: float | None) -> ComputeResult:
        """Send a call's requests: one unary call, or its row chunks a few at a time."""
        if len(call.bounds) == 1:
            return decode_response_bytes(self._unary(self._compute_bytes, call.request, timeout))
        deadline = self._deadline_for(timeout)
        in_flight: deque[Any] = deque()
        assembled = call.assembler()
        try:
            for request in call.payloads():
                in_flight.append(self._compute_bytes.future(
                    request, timeout=self._remaining(deadline), metadata=self._metadata or None))
                if len(in_flight) >= DEFAULT_CHUNK_WINDOW:
                    assembled.add(decode_response_bytes(in_flight.popleft().result(), aligned=False))
            while in_flight:
                assembled.add(decode_response_bytes(in_flight.popleft().result(), aligned=False))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for future in in_flight:
                future.cancel()
        return assembled.result()

    def _unary(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return rpc(request, timeout=self._timeout_for(timeout), metadata=self._metadata or None)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc

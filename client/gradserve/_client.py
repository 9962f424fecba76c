"""The synchronous SDK client: blocking calls over a ``grpc.Channel``."""
from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType
from typing import Any, Iterable, Iterator, Sequence

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
from gradserve._explain import ExplanationMethods
from gradserve._gsa import GlobalSensitivityMethods, Metadata
from gradserve._models import Inputs, ModelInfo
from gradserve._options import ComputeOptions, Operands, Selection, Target, quadrature_of
from gradserve._options import IntegratedGradientsOptions as _IG
from gradserve._options import SmoothGradOptions as _SG
from gradserve._requests import Call, ComputeResult, decode_response
from gradserve.v1 import model_service_pb2 as _model_pb2
from gradserve.v1 import model_service_pb2_grpc as _model_grpc
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["Client"]

_NO_OPERANDS = Operands()


class Client(ClientCore, GlobalSensitivityMethods, ExplanationMethods):
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
        Retries when the server goes away (see ``ClientCore``).
    window
        Default stream requests in flight.
    max_batch_rows
        Most examples in one request.
    chunk_bytes
        Batches larger than this go in pipelined row chunks of about this size (``None``: only
        what exceeds ``max_message_bytes``).
    shared_memory
        Send calls whose inputs have at least ``shared_memory_threshold`` bytes (default 1 MiB)
        through POSIX shared memory that the client owns, when the server is on this host and
        proves it; otherwise through the socket, with the same answers (see ``ClientCore``).
    shared_memory_threshold
        Input bytes from which a call goes through shared memory.

    Examples
    --------
    >>> with gradserve.Client("127.0.0.1:50051") as c:      # doctest: +SKIP
    ...     g = c.gradient("dense2", np.ones((2, 4)))
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, channel: grpc.Channel | None = None,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW, max_batch_rows: int = 65536,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, shared_memory: bool = False,
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD) -> None:
        super().__init__(target, timeout=timeout, max_message_bytes=max_message_bytes, token=token,
                         retries=retries, window=window, max_batch_rows=max_batch_rows, chunk_bytes=chunk_bytes,
                         shared_memory=shared_memory, shared_memory_threshold=shared_memory_threshold)
        if channel is None:
            channel = (grpc.secure_channel(self._target, credentials, options=self._options)
                       if credentials is not None
                       else grpc.insecure_channel(self._target, options=self._options))
        self._channel = channel
        # Answers read as bytes and decoded with their tensors as views (decode_response).
        self._compute = channel.unary_unary(COMPUTE_PATH, request_serializer=serialize_request,
                                            response_deserializer=None, _registered_method=True)
        self._compute_stream = channel.stream_stream(COMPUTE_STREAM_PATH, request_serializer=serialize_request,
                                                     response_deserializer=None, _registered_method=True)
        self._models = _model_grpc.ModelServiceStub(channel)
        self._shm = (_shm.SharedMemoryTransport(channel, self._metadata, self._shm_core)
                     if self._shm_core is not None else None)

    def _gsa_transport(self) -> tuple[grpc.Channel, Metadata]:
        return self._channel, self._metadata

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel (and unmap and unlink the shared-memory segments, if any)."""
        if self._shm is not None:
            self._shm.close()
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
        self._meta.store(infos)
        return infos

    def model_info(self, name: str, *, refresh: bool = False, timeout: float | None = None) -> ModelInfo:
        """Names, dtypes, shapes, versions and states of one model (cached per client)."""
        cached = self._meta.get(name)
        if cached is not None and not refresh:
            return cached
        resp = self._unary(self._models.GetModel, _model_pb2.GetModelRequest(name=name), timeout)
        info = ModelInfo.from_proto(resp.model)
        self._meta.store([info])
        return info

    # -- methods --------------------------------------------------------------------------------
    def compute(self, model: str, method: str, inputs: Inputs, *, timeout: float | None = None,
                **options: Any) -> ComputeResult:
        """Low-level call: every field of the response, decoded. ``options`` as in ``gradient``
        and the other methods (``tangents``/``cotangents`` for jvp, hvp and vjp)."""
        operands = Operands(options.pop("baseline", 0.0), options.pop("tangents", None),
                            options.pop("cotangents", None))
        opts = ComputeOptions.of(method, **options)
        info, timeout = self._info_for_call(model, timeout)
        return self._send(self._plan(info, model, opts, inputs, operands), timeout)

    def predict(self, model: str, inputs: Inputs, *, version: int = 0, timeout: float | None = None) -> Any:
        """Model outputs: an array for a single-output model, else a dict by output name."""
        return self._run(model, inputs, ComputeOptions("predict", version), timeout)

    def gradient(self, model: str, inputs: Inputs, *, target: Target = None, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, return_outputs: bool = False, layer: str | None = None,
                 transform: str | None = None, logits: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """d target / d inputs per example, shaped like the inputs (array, list or dict).

        With ``return_outputs=True`` returns ``(outputs, gradients)`` from one forward pass.
        """
        options = ComputeOptions("gradient", version, Selection(target, output, transform, logits), wrt or (),
                                 return_outputs, layer)
        return self._run(model, inputs, options, timeout)

    def input_x_gradient(self, model: str, inputs: Inputs, *, target: Target = None,
                         output: str | int | None = None, wrt: Sequence[str] | None = None,
                         return_outputs: bool = False, layer: str | None = None,
                         transform: str | None = None, logits: bool = False, version: int = 0,
                         timeout: float | None = None) -> Any:
        """inputs * gradient, per element."""
        return self._run(model, inputs, ComputeOptions("input_x_gradient", version,
                                                       Selection(target, output, transform, logits),
                                                       wrt or (), return_outputs, layer), timeout)

    def integrated_gradients(self, model: str, inputs: Inputs, *, baseline: Any = 0.0, steps: int | None = None,
                             quadrature: str = "gausslegendre", target: Target = None,
                             output: str | int | None = None, wrt: Sequence[str] | None = None,
                             return_delta: bool = False, return_outputs: bool = False,
                             layer: str | None = None, transform: str | None = None, logits: bool = False,
                             version: int = 0, timeout: float | None = None, method: str | None = None) -> Any:
        """Integrated gradients from ``baseline`` in ``steps`` (None: the server's default, 50)
        with the ``quadrature`` rule; with ``return_delta`` also the per-example convergence delta
        (returns ``(attributions, delta)``). ``method`` is the deprecated name of ``quadrature``."""
        ig = _IG(steps, quadrature_of(quadrature, method), return_delta)
        return self._run(model, inputs, ComputeOptions("integrated_gradients", version,
                                                       Selection(target, output, transform, logits), wrt or (),
                                                       return_outputs, layer, ig), timeout, Operands(baseline))

    def smoothgrad(self, model: str, inputs: Inputs, *, samples: int | None = None, noise: float | None = None,
                   stdev: float | None = None, kind: str = "mean", seed: int | None = None,
                   base_method: str = "gradient", target: Target = None, output: str | int | None = None,
                   wrt: Sequence[str] | None = None, baseline: Any = 0.0, steps: int | None = None,
                   transform: str | None = None, logits: bool = False, version: int = 0,
                   timeout: float | None = None) -> Any:
        """SmoothGrad: ``base_method`` attributions averaged over ``samples`` noisy copies of the
        inputs (None: the server's default, 50)."""
        ig = _IG(steps)   # checked even when base_method does not use it
        options = ComputeOptions("smoothgrad", version, Selection(target, output, transform, logits), wrt or (),
                                 integrated_gradients=ig if base_method == "integrated_gradients" else None,
                                 smoothgrad=_SG(samples, noise, stdev, kind, seed, base_method))
        return self._run(model, inputs, options, timeout, Operands(baseline))

    def jacobian(self, model: str, inputs: Inputs, *, output: str | int | None = None,
                 wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Per-example Jacobian, shape (batch, *output_shape, *input_shape), per input."""
        return self._run(model, inputs, ComputeOptions("jacobian", version, Selection(output=output), wrt or ()),
                         timeout)

    def jvp(self, model: str, inputs: Inputs, tangents: Any, *, output: str | int | None = None,
            version: int = 0, timeout: float | None = None) -> Any:
        """Jacobian-vector product J·v of the selected output, shaped like that output."""
        return self._run(model, inputs, ComputeOptions("jvp", version, Selection(output=output)), timeout,
                         Operands(tangents=tangents))

    def vjp(self, model: str, inputs: Inputs, cotangents: Any, *, output: str | int | None = None,
            wrt: Sequence[str] | None = None, version: int = 0, timeout: float | None = None) -> Any:
        """Vector-Jacobian product uᵀ·J, shaped like the inputs."""
        return self._run(model, inputs, ComputeOptions("vjp", version, Selection(output=output), wrt or ()),
                         timeout, Operands(cotangents=cotangents))

    def hvp(self, model: str, inputs: Inputs, v: Any, *, target: Target = None,
            output: str | int | None = None, wrt: Sequence[str] | None = None, version: int = 0,
            timeout: float | None = None) -> Any:
        """Hessian-vector product of the target with ``v``, shaped like the inputs."""
        return self._run(model, inputs, ComputeOptions("hvp", version, Selection(target, output), wrt or ()),
                         timeout, Operands(tangents=v))

    def grad_cam(self, model: str, inputs: Inputs, *, layer: str | None = None, target: Target = None,
                 output: str | int | None = None, upsample: bool = False, version: int = 0,
                 timeout: float | None = None) -> Any:
        """Grad-CAM map of a convolutional layer (default: the last 4-D layer output)."""
        options = ComputeOptions("grad_cam", version, Selection(target, output), layer=layer, upsample=upsample)
        return self._run(model, inputs, options, timeout)

    def stream(self, model: str, batches: Iterable[Inputs], *, method: str = "gradient",
               window: int | None = None, timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """Results for many batches over one ComputeStream, in the order of ``batches``.

        Pipelined: up to ``window`` requests are sent before their answers arrive, and the next
        batch is pulled from ``batches`` as soon as an answer frees a slot. A stream broken
        because its server went away is restarted from the first unanswered request. ``timeout``
        bounds the whole stream. A batch that fails raises its error when the iteration reaches it.
        ``options`` as in ``compute``.
        """
        operands = Operands(options.pop("baseline", 0.0), options.pop("tangents", None),
                            options.pop("cotangents", None))
        opts = ComputeOptions.of(method, **options)
        deadline = self._deadline_for(timeout)
        info, _ = self._info_for_call(model, timeout)
        book = self._stream_book(info, model, opts, operands, window)
        source = iter(batches)
        cond = threading.Condition()

        def requests(generation: int) -> Iterator[_pb2.ComputeStreamRequest]:
            with cond:
                replay = book.replay()
            yield from replay
            while True:
                with cond:
                    cond.wait_for(lambda: not book.must_wait(generation))
                    if not book.sending(generation):
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

        call: Any = None
        try:
            while True:
                call = self._compute_stream(requests(book.generation), timeout=self._remaining(deadline),
                                            metadata=self._metadata)
                try:
                    for response in call:
                        with cond:
                            book.answer(response)
                            cond.notify_all()
                        yield from book.results()
                    yield from book.results()
                    book.check_complete()
                    return
                except grpc.RpcError as exc:
                    with cond:
                        delay = book.restart_delay(exc.code())
                    if delay is None:
                        raise from_grpc_error(exc) from exc
                    time.sleep(delay)
                    with cond:
                        book.restart()
                        cond.notify_all()
        finally:
            with cond:
                book.close()
                cond.notify_all()
            if call is not None:
                call.cancel()

    # -- plumbing -------------------------------------------------------------------------------
    def _info_for_call(self, model: str, timeout: float | None) -> tuple[ModelInfo | None, float | None]:
        """The model's metadata, fetched if due (see ``MetadataCache``), and the timeout left for the call."""
        info = self._meta.get(model)
        if info is not None or not self._meta.due(model):
            return info, timeout
        deadline = self._deadline_for(timeout)
        try:
            info = self.model_info(model, timeout=self._timeout_for(timeout))
        except GradserveError as exc:
            if not self._meta.failed(model, exc):
                raise
        return info, self._remaining(deadline)

    def _run(self, model: str, inputs: Inputs, options: ComputeOptions, timeout: float | None,
             operands: Operands = _NO_OPERANDS) -> Any:
        info, timeout = self._info_for_call(model, timeout)
        call = self._plan(info, model, options, inputs, operands)
        return call.finish(self._send(call, timeout))

    def _send(self, call: Call, timeout: float | None) -> ComputeResult:
        """Send a call's requests: through shared memory, one unary call, or its row chunks a few at a time."""
        if self._shm is not None:
            result = self._shm.send(call.as_one_request(), self._compute, self._timeout_for(timeout))
            if result is not None:
                return result
        if len(call.bounds) == 1:
            return decode_response(self._unary(self._compute, call.request, timeout))
        deadline = self._deadline_for(timeout)
        in_flight: deque[Any] = deque()
        assembled = call.assembler()
        try:
            for request in call.payloads():
                in_flight.append(self._compute.future(request, timeout=self._remaining(deadline),
                                                      metadata=self._metadata))
                if len(in_flight) >= DEFAULT_CHUNK_WINDOW:
                    assembled.add(decode_response(in_flight.popleft().result(), aligned=False))
            while in_flight:
                assembled.add(decode_response(in_flight.popleft().result(), aligned=False))
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc
        finally:
            for future in in_flight:
                future.cancel()
        return assembled.result()

    def _unary(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        try:
            return rpc(request, timeout=self._timeout_for(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_grpc_error(exc) from exc

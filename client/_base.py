"""What ``Client`` and ``AsyncClient`` share: settings, the metadata cache, call building and the
bookkeeping of pipelined streams. The two clients add only I/O.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import grpc
import numpy as np

from gradserve import _codec
from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options, channel_target
from gradserve._codec import tune_allocator
from gradserve._exceptions import GradserveError, Internal, ResourceExhausted, from_status
from gradserve._models import Inputs, ModelInfo
from gradserve._requests import Call, ComputeResult, build_call, decode_response
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["ClientBase", "StreamBook", "DEFAULT_WINDOW", "DEFAULT_CHUNK_WINDOW", "DEFAULT_CHUNK_BYTES", "DEFAULT_RETRIES",
           "RETRYABLE_CODES", "COMPUTE_PATH", "backoff_seconds", "decode_response_bytes",
           "serialize_request"]

#: Requests of a stream sent ahead of their answers.
DEFAULT_WINDOW = 32
#: Row chunks of one large call in flight at once.
DEFAULT_CHUNK_WINDOW = 4
#: A batch larger than this is sent in row chunks of about this size, pipelined: chunks
#: encode, travel, run and decode at once on both sides (measured on loopback, 256 MiB through
#: predict: 16 MiB chunks ~1.4x the throughput of 64 MiB ones).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
#: Stream restarts without any answer in between (gRPC allows 4 retries of a unary call).
DEFAULT_RETRIES = 4
#: Status codes after which a call is retried or a stream restarted: the server went away.
#: CANCELLED here is the server's (one that shuts down drops calls it had not started, and
#: cancels streams still open when its grace period ends); a local cancel is never retried.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


#: Path of the unary Compute method (its answers are read as bytes: ``decode_response_bytes``).
COMPUTE_PATH = "/gradserve.v1.SensitivityService/Compute"
_TENSOR_MAPS = {4: "outputs", 5: "attributions", 6: "extras"}   # ComputeResponse's map<string, Tensor> fields


def serialize_request(request: _pb2.ComputeRequest | bytes) -> bytes:
    """Request serializer that passes already serialized requests (``Call.payloads``) through."""
    return request if isinstance(request, bytes) else request.SerializeToString()


def decode_response_bytes(buf: bytes, aligned: bool = True) -> ComputeResult:
    """Decode a serialized ComputeResponse with its tensors as views of ``buf``.

    Parsing with protobuf and then reading each tensor's ``data`` copies every tensor twice; here
    the arrays share the received bytes. ``aligned=False`` leaves tensors whose data is misaligned
    for their dtype as misaligned views (row chunks: they are copied into the result anyway).
    """
    try:
        rest, tensors = _codec.split_tensor_maps(buf, _TENSOR_MAPS, aligned)
    except _codec.TensorError as exc:
        raise Internal(f"response: {exc}") from None
    resp = _pb2.ComputeResponse.FromString(rest)
    return ComputeResult(model=resp.model, version=resp.version, request_id=resp.request_id,
                         outputs=tensors["outputs"], attributions=tensors["attributions"],
                         extras=tensors["extras"], target_indices=np.asarray(resp.target_indices, dtype=np.int64))


def backoff_seconds(attempt: int, initial: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with full jitter (as gRPC's retry policy does) for restart ``attempt``."""
    return random.uniform(0.0, min(cap, initial * 2.0 ** attempt))


class ClientBase:
    """Constructor arguments, channel settings, the metadata cache and argument -> ``Call``.

    Parameters
    ----------
    target
        ``"host:port"``, a list of them (balanced round robin), or any gRPC target
        (``dns:///name:port`` resolves to every address and balances round robin).
    timeout
        Default deadline in seconds for every call; ``None`` waits forever. Each method's
        ``timeout=`` overrides it for that call.
    max_message_bytes
        Largest message sent or received. Larger batches are sent in row chunks.
    token
        Bearer token sent as ``authorization`` metadata.
    retries
        Retries of a call whose server went away (``RETRYABLE_CODES``): unary calls through
        gRPC's retry policy (at most 4), streams restarted from the first unanswered request.
    window
        Default number of stream requests in flight before their answers arrive.
    max_batch_rows
        Most examples sent in one request (the server's ``max_batch`` limit).
    chunk_bytes
        A batch larger than this is sent in pipelined row chunks of about this size, even when
        it would fit one message; ``None``: split only what exceeds ``max_message_bytes``.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW, max_batch_rows: int = 65536,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes: must be positive")
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError("chunk_bytes: must be positive or None")
        if window < 1:
            raise ValueError("window: must be at least 1")
        # Large messages copy through several fresh buffers: let the process reuse freed ones.
        tune_allocator()
        self._target, self._round_robin = channel_target(target)
        self._options = channel_options(max_message_bytes, self._round_robin, min(retries, 4))
        self._timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._chunk_bytes = chunk_bytes
        self._max_batch_rows = max_batch_rows
        self._retries = retries
        self._window = window
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._info: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()

    # -- settings -------------------------------------------------------------------------------
    def _timeout_for(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _deadline_for(self, timeout: float | None) -> float | None:
        t = self._timeout_for(timeout)
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # -- metadata cache -------------------------------------------------------------------------
    def _cached(self, name: str) -> ModelInfo | None:
        with self._lock:
            return self._info.get(name)

    def _remember(self, infos: Sequence[ModelInfo]) -> None:
        with self._lock:
            self._info.update({i.name: i for i in infos})

    # -- building -------------------------------------------------------------------------------
    def _build(self, info: ModelInfo | None, model: str, method: str, inputs: Inputs,
               options: dict[str, Any]) -> Call:
        return build_call(info, model, method, inputs, max_message_bytes=self._max_message_bytes,
                          max_rows=self._max_batch_rows, chunk_bytes=self._chunk_bytes, **options)

    def _stream_builder(self, info: ModelInfo | None, model: str, method: str,
                        options: dict[str, Any]) -> Callable[[Inputs, int], Call]:
        def build(batch: Inputs, index: int) -> Call:
            call = build_call(info, model, method, batch, request_id=str(index), **options)
            size = call.request.ByteSize()
            if size > self._max_message_bytes:
                raise ResourceExhausted(f"batches[{index}]: {size} bytes, more than max_message_bytes="
                                        f"{self._max_message_bytes}; send smaller batches")
            return call
        return build


class StreamBook:
    """Bookkeeping of one pipelined stream, shared by the sync and async clients.

    Requests are numbered in the order they are pulled from the caller's batches; each carries
    its number as ``request_id``. A request stays ``unanswered`` until its response arrives, so
    a restarted stream resends exactly those, in order. Results are handed back in request order
    whatever order responses arrive in. Callers hold their own lock around ``pull`` and
    ``answer`` (the request side and the response side run concurrently).
    """

    def __init__(self, build: Callable[[Inputs, int], Call], window: int) -> None:
        self.window = window
        self._build = build
        self.unanswered: dict[int, _pb2.ComputeStreamRequest] = {}
        self._calls: dict[int, Call] = {}
        self._done: dict[int, ComputeResult | GradserveError] = {}
        self.pulled = 0          # requests built so far
        self.next_out = 0        # index of the next result the caller gets
        self.exhausted = False   # the caller's batches are used up
        self.error_at: int | None = None
        self.error: BaseException | None = None

    @property
    def full(self) -> bool:
        return len(self.unanswered) >= self.window

    @property
    def finished_sending(self) -> bool:
        return self.exhausted or self.error_at is not None

    def pull(self, batch: Inputs) -> _pb2.ComputeStreamRequest | None:
        """Build the next request from ``batch``; a bad batch ends the sending (raised in order)."""
        index = self.pulled
        try:
            call = self._build(batch, index)
            request = _pb2.ComputeStreamRequest(request=call.request)
        except Exception as exc:  # noqa: BLE001 - raised to the caller at this batch's position
            self.error_at, self.error = index, exc
            return None
        self.pulled += 1
        self.unanswered[index] = request
        self._calls[index] = call
        return request

    def end(self) -> None:
        self.exhausted = True

    def fail(self, error: BaseException) -> None:
        """The caller's batches raised ``error``: end the sending; it is raised in order."""
        self.error_at, self.error = self.pulled, error

    def replay(self) -> list[_pb2.ComputeStreamRequest]:
        """The unanswered requests in order: what a restarted stream sends first."""
        return [self.unanswered[i] for i in sorted(self.unanswered)]

    def answer(self, response: _pb2.ComputeStreamResponse) -> None:
        """Record a response (matched by request_id); an in-band error is raised at its position."""
        try:
            index = int(response.request_id)
        except ValueError:
            raise Internal(f"stream: response with unknown request_id {response.request_id[:64]!r}") from None
        if self.unanswered.pop(index, None) is None:
            return  # a duplicate after a restart: already answered
        if response.HasField("error"):
            self._done[index] = from_status(response.error.code, response.error.message)
            return
        try:
            self._done[index] = decode_response(response.response)
        except GradserveError as exc:
            self._done[index] = exc

    def results(self) -> Iterator[Any]:
        """Results that are ready, in request order; raises a batch's error at its position."""
        while True:
            index = self.next_out
            if index in self._done:
                got = self._done.pop(index)
                call = self._calls.pop(index)
                self.next_out += 1
                if isinstance(got, GradserveError):
                    raise got
                yield call.finish(got)
            elif index == self.error_at and self.error is not None:
                raise self.error
            else:
                return

    @property
    def complete(self) -> bool:
        """Every batch was sent and every answer handed back."""
        return self.finished_sending and not self.unanswered and self.next_out == self.pulled

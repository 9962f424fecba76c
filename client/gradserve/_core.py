"""The SDK core without I/O, shared by ``Client`` and ``AsyncClient``: settings, the metadata
cache and when to fetch again, call planning, and the bookkeeping and retry decisions of
pipelined streams. The two clients add only I/O (threads or ``await``).
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from gradserve import _shm
from gradserve._channel import DEFAULT_MAX_MESSAGE_BYTES, RETRYABLE_CODES, channel_options, channel_target
from gradserve._codec import tune_allocator
from gradserve._exceptions import GradserveError, Internal, ResourceExhausted
from gradserve._models import Inputs, ModelInfo
from gradserve._options import ComputeOptions, Operands
from gradserve._requests import Call, ComputeResult, Limits, decode_stream_response, plan_call
from gradserve.v1 import sensitivity_service_pb2 as _pb2

__all__ = ["ClientCore", "MetadataCache", "StreamBook", "DEFAULT_WINDOW", "DEFAULT_CHUNK_WINDOW",
           "DEFAULT_CHUNK_BYTES", "DEFAULT_RETRIES", "COMPUTE_PATH", "COMPUTE_STREAM_PATH", "backoff_seconds",
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

#: Compute and ComputeStream, whose answers are read as bytes (``decode_response``: tensors as
#: views of the received bytes, no protobuf parse of the tensors).
COMPUTE_PATH = "/gradserve.v1.SensitivityService/Compute"
COMPUTE_STREAM_PATH = "/gradserve.v1.SensitivityService/ComputeStream"


def serialize_request(request: Any) -> bytes:
    """Request serializer that passes already serialized requests (``Call.payloads``) through."""
    return request if isinstance(request, bytes) else bytes(request.SerializeToString())


def backoff_seconds(attempt: int, initial: float = 0.05, cap: float = 2.0) -> float:
    """Exponential backoff with full jitter (as gRPC's retry policy does) for restart ``attempt``."""
    return random.uniform(0.0, min(cap, initial * 2.0 ** attempt))


class MetadataCache:
    """Model metadata by name, and when a call should ask the server for it again.

    Calls use metadata to convert and check inputs before sending and to size row chunks; the
    server validates everything anyway. So a call whose metadata fetch answers NOT_FOUND (the
    model may appear later: model directories are polled) or UNAVAILABLE (after the channel's
    own retries) goes on without it, and the next fetch of that name waits a backoff that doubles
    per failure (``initial`` up to ``cap`` seconds) instead of costing every call a round trip.
    Any other error (UNAUTHENTICATED, PERMISSION_DENIED, DEADLINE_EXCEEDED, ...) is the caller's.
    """

    #: Metadata errors after which a call proceeds without metadata.
    TOLERATED = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE})

    def __init__(self, initial: float = 0.5, cap: float = 30.0) -> None:
        self._info: dict[str, ModelInfo] = {}
        self._retry: dict[str, tuple[float, int]] = {}   # name -> (monotonic time of the next try, failures)
        self._initial, self._cap = initial, cap
        self._lock = threading.Lock()

    def get(self, name: str) -> ModelInfo | None:
        return self._info.get(name)   # a dict read is atomic; writers hold the lock

    def due(self, name: str) -> bool:
        """Whether a call should fetch ``name``'s metadata now (not known, and not backing off)."""
        retry = self._retry.get(name)
        return retry is None or time.monotonic() >= retry[0]

    def store(self, infos: Sequence[ModelInfo]) -> None:
        with self._lock:
            for info in infos:
                self._info[info.name] = info
                self._retry.pop(info.name, None)

    def failed(self, name: str, error: GradserveError) -> bool:
        """Record a failed fetch; True if the call goes on without metadata, False if it raises."""
        if error.code not in self.TOLERATED:
            return False
        with self._lock:
            failures = self._retry.get(name, (0.0, 0))[1]
            delay = min(self._cap, self._initial * 2.0 ** failures)
            self._retry[name] = (time.monotonic() + delay, failures + 1)
        return True


class ClientCore:
    """Constructor arguments, channel settings, the metadata cache and calls -> ``Call`` plans.

    Parameters
    ----------
    target
        ``"host:port"``, a list of them (balanced round robin), or any gRPC target
        (``dns:///name:port`` resolves to every address and balances round robin). Over
        several servers a call that finds none ready (SERVING) waits for one within its
        deadline (a rolling restart); to one address it fails fast with ``Unavailable``.
    timeout
        Default deadline in seconds for every call (metadata fetch included); ``None`` waits
        forever. Each method's ``timeout=`` overrides it for that call.
    max_message_bytes
        Largest message sent or received. Larger batches are sent in row chunks.
    token
        Bearer token sent as ``authorization`` metadata.
    retries
        Retries of a call whose server went away (``RETRYABLE_CODES``): unary calls through
        gRPC's retry policy (at most 4), streams restarted from the first unanswered request.
        ``0`` also makes calls over several servers fail fast instead of waiting for one.
    window
        Default number of stream requests in flight before their answers arrive.
    max_batch_rows
        Most examples sent in one request (the server's ``max_batch`` limit).
    chunk_bytes
        A batch larger than this is sent in pipelined row chunks of about this size, even when
        it would fit one message; ``None``: split only what exceeds ``max_message_bytes``.
    shared_memory
        Send calls whose inputs have at least ``shared_memory_threshold`` bytes through POSIX
        shared memory when the server is on this host (it proves it; otherwise, and with a list
        of targets, everything goes through the socket with the same answers). See
        ``gradserve._shm`` and the "Same-host shared memory" page of the documentation.
    shared_memory_threshold
        Input bytes from which a call goes through shared memory.
    """

    def __init__(self, target: str | Sequence[str] = "127.0.0.1:50051", *, timeout: float | None = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, token: str | None = None,
                 retries: int = DEFAULT_RETRIES, window: int = DEFAULT_WINDOW, max_batch_rows: int = 65536,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, shared_memory: bool = False,
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes: must be positive")
        if chunk_bytes is not None and chunk_bytes <= 0:
            raise ValueError("chunk_bytes: must be positive or None")
        if window < 1:
            raise ValueError("window: must be at least 1")
        if retries < 0:
            raise ValueError("retries: must be 0 or more")
        # Large messages copy through several fresh buffers: let the process reuse freed ones.
        tune_allocator()
        self._target, self._round_robin = channel_target(target)
        self._options = channel_options(max_message_bytes, self._round_robin, min(retries, 4))
        self._timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._limits = Limits(max_message_bytes, max_batch_rows, chunk_bytes)
        self._retries = retries
        self._window = window
        self._metadata: tuple[tuple[str, str], ...] | None = \
            (("authorization", f"Bearer {token}"),) if token else None
        self._meta = MetadataCache()
        #: Same-host shared memory: what the two clients share (each adds its transport), or None.
        self._shm_core = (_shm.SharedMemoryCore(shared_memory_threshold, max_rows=max_batch_rows)
                          if shared_memory and not self._round_robin else None)

    # -- deadlines --------------------------------------------------------------------------------
    def _timeout_for(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else timeout

    def _deadline_for(self, timeout: float | None) -> float | None:
        t = self._timeout_for(timeout)
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # -- planning ---------------------------------------------------------------------------------
    def _plan(self, info: ModelInfo | None, model: str, options: ComputeOptions, inputs: Inputs,
              operands: Operands) -> Call:
        # With shared memory a large call goes as one request, encoded by the shared-memory transport.
        return plan_call(info, model, options, inputs, operands, self._limits, encode_first=self._shm_core is None)

    def _stream_book(self, info: ModelInfo | None, model: str, options: ComputeOptions, operands: Operands,
                     window: int | None) -> StreamBook:
        limit = self._max_message_bytes

        def build(batch: Inputs, index: int) -> Call:
            call = plan_call(info, model, options, batch, operands, request_id=str(index))
            size = call.request.ByteSize()
            if size > limit:
                raise ResourceExhausted(f"batches[{index}]: {size} bytes, more than max_message_bytes={limit}; "
                                        "send smaller batches")
            return call
        return StreamBook(build, window or self._window, self._retries)


class StreamBook:
    """Bookkeeping and retry decisions of one pipelined stream, shared by the sync and async clients.

    Requests are numbered in the order they are pulled from the caller's batches; each carries
    its number as ``request_id``. A request stays ``unanswered`` until its response arrives, so
    a restarted stream resends exactly those, in order. Results are handed back in request order
    whatever order responses arrive in, and a batch's error (bad input, in-band error, the
    caller's iterator failing) is raised at its position. Each restart starts a new
    ``generation``: the request side of an older one stops. Callers hold their own lock (a
    ``threading.Condition`` or an ``asyncio.Condition``) around everything but ``results``.
    """

    def __init__(self, build: Callable[[Inputs, int], Call], window: int, retries: int) -> None:
        self.window = window
        self.retries = retries
        self._build = build
        self.unanswered: dict[int, _pb2.ComputeStreamRequest] = {}
        self._calls: dict[int, Call] = {}
        self._done: dict[int, ComputeResult | GradserveError] = {}
        self.pulled = 0          # requests built so far
        self.next_out = 0        # index of the next result the caller gets
        self.exhausted = False   # the caller's batches are used up
        self.error_at: int | None = None
        self.error: BaseException | None = None
        self.generation = 0      # bumped by each restart
        self.closed = False      # the caller's iteration ended
        self.attempts = 0        # restarts since the last answer
        self.write_failed = False   # a write of this generation failed (AsyncClient; see restart_delay)

    # -- the request side ---------------------------------------------------------------------------
    def must_wait(self, generation: int) -> bool:
        """Whether the request side of ``generation`` waits: the window is full (and it is current)."""
        return len(self.unanswered) >= self.window and generation == self.generation and not self.closed

    def sending(self, generation: int) -> bool:
        """Whether the request side of ``generation`` goes on pulling batches."""
        return generation == self.generation and not self.closed and not self.finished_sending

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
        """The caller's batches are used up."""
        self.exhausted = True

    def fail(self, error: BaseException) -> None:
        """The caller's batches raised ``error``: end the sending; it is raised in order."""
        self.error_at, self.error = self.pulled, error

    def replay(self) -> list[_pb2.ComputeStreamRequest]:
        """The unanswered requests in order: what a restarted stream sends first."""
        return [self.unanswered[i] for i in sorted(self.unanswered)]

    # -- the response side --------------------------------------------------------------------------
    def answer(self, response: bytes | _pb2.ComputeStreamResponse) -> None:
        """Record a serialized response (matched by request_id); an in-band error is kept for its position."""
        buf = response if isinstance(response, bytes) else response.SerializeToString()
        request_id, result = decode_stream_response(buf)
        try:
            index = int(request_id)
        except ValueError:
            raise Internal(f"stream: response with unknown request_id {request_id[:64]!r}") from None
        if self.unanswered.pop(index, None) is None:
            return  # a duplicate after a restart: already answered
        self._done[index] = result
        self.attempts = 0

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

    def check_complete(self) -> None:
        """The server ended the stream: every batch must have been sent and answered."""
        if not (self.finished_sending and not self.unanswered and self.next_out == self.pulled):
            raise Internal(f"stream: the server ended the stream with {len(self.unanswered)} requests unanswered")

    @property
    def complete(self) -> bool:
        """Every batch was sent and every answer handed back."""
        return self.finished_sending and not self.unanswered and self.next_out == self.pulled

    # -- restarts -----------------------------------------------------------------------------------
    def restart_delay(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to wait before restarting a stream that ended with ``code``; None: raise it.

        A stream is restarted when its server went away (``RETRYABLE_CODES``), at most
        ``retries`` times without an answer in between. A failed write counts too when it left
        INTERNAL: grpc.aio reports a stream that ended while a request was being written as
        INTERNAL instead of the server's status (grpc/grpc#36066), and our server answers every
        request error in-band, so a stream ends early only when the transport or the server goes
        away. Never after the caller's iteration ended (a local cancel).
        """
        broken = code in RETRYABLE_CODES or (code == grpc.StatusCode.INTERNAL and self.write_failed)
        if self.closed or not broken or self.attempts >= self.retries:
            return None
        delay = backoff_seconds(self.attempts)
        self.attempts += 1
        return delay

    def restart(self) -> int:
        """Start a new generation: the old request side stops; returns the new generation."""
        self.generation += 1
        self.write_failed = False
        return self.generation

    def close(self) -> None:
        """The caller's iteration ended (finished, raised or abandoned): every request side stops."""
        self.closed = True
